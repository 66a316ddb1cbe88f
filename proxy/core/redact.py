"""Pure: keep the proxy's own upstream keys out of anything a client or a log may read.

Upstreams sometimes echo the request's Authorization header back in an error
message; every such message passes through `redact` before it is stored or sent.
"""

from __future__ import annotations

from collections.abc import Iterable

REDACTED = "[redacted]"


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of every secret replaced by `[redacted]`."""
    # Longest first: were one key a prefix of another, replacing the short one first
    # would leave the long one's tail readable.
    for secret in sorted(secrets, key=len, reverse=True):
        if secret and secret in text:  # an empty secret would match between every character
            text = text.replace(secret, REDACTED)
    return text
