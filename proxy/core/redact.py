"""Pure: keep the proxy's own upstream keys out of anything a client or a log may read.

Upstreams sometimes echo the request's Authorization header back in an error message, in an
HTTP error body or in an error event in the middle of a stream; every such message passes
through `redact` before it is stored or sent. The relay forwards stream bytes untouched, so
`redact` takes bytes as well as text: there is one function for every error path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import overload

REDACTED = "[redacted]"
_REDACTED_BYTES = REDACTED.encode()


@overload
def redact(text: str, secrets: Iterable[str]) -> str: ...
@overload
def redact(text: bytes, secrets: Iterable[str]) -> bytes: ...
def redact(text: str | bytes, secrets: Iterable[str]) -> str | bytes:
    """`text` with every occurrence of every secret replaced by `[redacted]`."""
    # Longest first: were one key a prefix of another, replacing the short one first
    # would leave the long one's tail readable.
    for secret in sorted(secrets, key=len, reverse=True):
        if not secret:  # an empty secret would match between every character
            continue
        if isinstance(text, bytes):
            needle = secret.encode()
            if needle in text:
                text = text.replace(needle, _REDACTED_BYTES)
        elif secret in text:
            text = text.replace(secret, REDACTED)
    return text


def leaks(data: bytes, secrets: tuple[bytes, ...]) -> bool:
    """Whether any of the (pre-encoded) secrets occurs in `data`: the relay's per-read check,
    one substring search per secret, before it pays for a copy."""
    # find, not `in`: for bytes, `in` first tries its operand as an int (and formats that error)
    return any(data.find(secret) >= 0 for secret in secrets)
