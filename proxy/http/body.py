"""Reading and checking a request body: whatever a client sends, the answer is a 4xx in OpenAI's
error shape, never an exception that escapes to aiohttp.

The limits: the snapshot's `max_body_bytes` (counted after decoding), `server.body_timeout_s` for
the whole body once the headers are in, MAX_DEPTH levels of JSON nesting (orjson itself refuses to
serialise deeper than 254, which the proxy does when it forwards the body), and header values that
are valid UTF-8 (aiohttp keeps undecodable bytes as surrogates, which no JSON encoder accepts).
Content-Encoding is handled deliberately: identity, gzip and deflate are decoded (aiohttp's decoder,
which bounds each decompressed chunk); any other coding is refused with 415.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from proxy.core.body import JsonBody
from proxy.core.errors import BodyTooLarge, InvalidRequest
from proxy.http.server import GuardedHandler

# From this size on a body is read as a `JsonBody`, which keeps the JSON of its messages for the
# upstream body: below it, serialising them twice costs less than keeping them (a small chat
# request: ~8 k instructions more as a `JsonBody`; a 58 kB one: ~120 k fewer).
KEEP_JSON_BYTES = 8_192
MAX_DEPTH = 64  # deeper than any real chat request; far below orjson's own limit of 254
ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


class RequestTimeout(InvalidRequest):
    status = 408
    code = "request_timeout"


class UnsupportedEncoding(InvalidRequest):
    status = 415
    code = "unsupported_content_encoding"


async def read_body(request: web.Request, limit: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """The request's JSON object (what each API requires of it is checked by `Api.check`); from
    KEEP_JSON_BYTES on, a `JsonBody`: what is serialised of it to measure the prompt is reused for
    the upstream body."""
    check_headers(request.headers)
    raw = await read_raw(request, limit, timeout_s)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {_clip(str(exc))}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    check_depth(body)
    return JsonBody(body) if len(raw) >= KEEP_JSON_BYTES else body


async def read_raw(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The decoded body bytes, within `limit` bytes and `timeout_s` seconds."""
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding not in ENCODINGS:
        raise UnsupportedEncoding(
            f"Content-Encoding '{_clip(coding, 40)}' is not supported: send the body as is, or with gzip or deflate.",
            param="Content-Encoding",
        )
    too_large = BodyTooLarge(
        f"The request body is larger than this proxy accepts ({limit} bytes); "
        "raise `max_body_bytes` in the config if this is expected."
    )
    if not coding and request.content_length is not None and request.content_length > limit:
        _abandon(request)
        raise too_large
    content = request.content
    try:
        if content.is_eof():  # the whole body came with the headers (most do): no waiting, no timer
            raw = content.read_nowait()
            if len(raw) > limit:
                _abandon(request)
                raise too_large
            return raw
        chunks: list[bytes] = []  # joined once at the end: one copy of the body
        size = 0
        async with asyncio.timeout(timeout_s):
            while chunk := await content.readany():
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    _abandon(request)
                    raise too_large
    except TimeoutError:
        _abandon(request)
        raise RequestTimeout(
            f"The request body did not arrive within {timeout_s:g} s (server.body_timeout_s)."
        ) from None
    except (HttpProcessingError, RequestPayloadError) as exc:
        _abandon(request)
        # A body that does not decode as its Content-Encoding says, or a broken chunked encoding.
        cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
        reason = getattr(cause, "message", "") or str(cause)
        raise InvalidRequest(f"The request body could not be read: {_clip(reason)}", code="invalid_body") from None
    return b"".join(chunks)


def _abandon(request: web.Request) -> None:
    """The rest of this body is not worth reading: the connection closes after the answer."""
    if isinstance(request.protocol, GuardedHandler):
        request.protocol.close_after_response()


def check_headers(headers: Mapping[str, str]) -> None:
    """Refuse a header value that is not valid UTF-8 (aiohttp keeps its bytes as surrogates)."""
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise InvalidRequest(
                    f"The value of the header {_clip(name.encode(errors='replace').decode(), 60)!r} "
                    "is not valid UTF-8.",
                    code="invalid_header",
                ) from None


def check_depth(body: Any) -> None:
    """Refuse JSON nested deeper than MAX_DEPTH: a container inside MAX_DEPTH others. The parsed
    body is walked a level at a time by `gc.get_referents`, which lists in one C call what the
    containers of a level hold (a dict's values, a list's items) and holds nothing of a string or
    number: a call per level, whatever the size. A 58 kB body with 20 tools costs ~50 k
    instructions, against ~1 M for counting its brackets (`bytes.count`, a byte at a time) and
    then gathering each level in a comprehension."""
    level: list[Any] = [body]  # the values at the depth being looked at (1: the body itself)
    for _ in range(MAX_DEPTH):
        level = gc.get_referents(*level)
        if not level:
            return
    # `level` holds the values inside MAX_DEPTH containers: too deep if one is a container itself.
    if any(type(value) is dict or type(value) is list for value in level):
        raise InvalidRequest(f"The request body is nested deeper than {MAX_DEPTH} levels.", code="too_deep")


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
