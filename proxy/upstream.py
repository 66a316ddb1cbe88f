"""The OpenAI-compatible client for one upstream: one place where aiohttp's
exceptions and the upstream's error bodies become `Failure`s, and where the
SSE byte stream is cut into events without being re-encoded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp.http_exceptions import LineTooLong

from .config import Upstream
from .failures import Failure, classify_status, connection_failure, dropped_failure, timeout_failure

MAX_ERROR_BODY = 64 * 1024
MAX_EVENT_BYTES = 8 * 1024 * 1024
# Fields only OpenRouter understands; an OpenAI-style upstream rejects them with a 400,
# which would turn a fallback into a client error.
OPENROUTER_ONLY_FIELDS = ("provider", "transforms", "models", "route", "usage", "plugins")


class UpstreamError(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass(frozen=True, slots=True)
class SSEEvent:
    raw: bytes            # the event exactly as received, terminator included: what the client gets
    data: bytes | None    # the joined `data:` payload; None for a comment-only event

    @property
    def is_done(self) -> bool:
        return self.data == b"[DONE]"


class UpstreamClient:
    def __init__(self, name: str, config: Upstream, session: aiohttp.ClientSession, api_key: str | None) -> None:
        self.name = name
        self.kind = config.flavour
        self.api_key = api_key
        self.key_env = config.api_key_env
        self.url = f"{config.base_url}/chat/completions"
        self._session = session
        self._headers = {"Content-Type": "application/json", **config.headers}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s, connect=config.connect_timeout_s)
        # A stream may run long; what must not happen is a silence longer than timeout_s.
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout_s,
                                                     sock_read=config.timeout_s)

    def prepare_body(self, body: dict[str, Any], model: str) -> bytes:
        """The request for this upstream: the client's body with only `model` rewritten."""
        if self.kind == "openrouter":
            return orjson.dumps({**body, "model": model})
        out = {k: v for k, v in body.items() if k not in OPENROUTER_ONLY_FIELDS}
        out["model"] = model
        if out.get("stream") is True:
            # Without it an OpenAI-style upstream sends no usage on streams, and the stream would go unbilled.
            options = out.get("stream_options")
            out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return orjson.dumps(out)

    async def post(self, payload: bytes, *, stream: bool) -> aiohttp.ClientResponse:
        """Send a chat request; return a 2xx response (the caller closes it) or raise UpstreamError."""
        try:
            response = await self._session.post(self.url, data=payload, headers=self._headers,
                                                timeout=self._stream_timeout if stream else self._timeout)
        except asyncio.TimeoutError:
            raise UpstreamError(timeout_failure(f"connecting to upstream {self.name}")) from None
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamError(connection_failure(f"{type(exc).__name__}: {exc}")) from None
        if response.status < 300:
            return response
        try:
            raw = await response.content.read(MAX_ERROR_BODY)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            raw = b""
        finally:
            response.close()
        raise UpstreamError(classify_status(response.status, error_object(raw), response.headers))

    async def read_json(self, response: aiohttp.ClientResponse) -> tuple[bytes, dict[str, Any]]:
        """Read a non-streamed answer; an `error` in a 200 body counts as a failure too."""
        try:
            raw = await response.read()
        except asyncio.TimeoutError:
            raise UpstreamError(timeout_failure(f"waiting for upstream {self.name}")) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(dropped_failure(f"{type(exc).__name__}: {exc}")) from None
        finally:
            response.release()
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(dropped_failure("the upstream answered with invalid JSON")) from None
        if not isinstance(payload, dict):
            raise UpstreamError(dropped_failure("the upstream answered with a non-object JSON body"))
        error = payload.get("error")
        if error and not payload.get("choices"):
            status = error.get("code") if isinstance(error, dict) else None
            raise UpstreamError(classify_status(status if isinstance(status, int) else 502,
                                                error if isinstance(error, dict) else None, response.headers))
        return raw, payload


def error_object(raw: bytes) -> dict[str, Any] | None:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()
        return {"message": text[:300]} if text else None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    return None


async def iter_events(response: aiohttp.ClientResponse) -> AsyncIterator[SSEEvent]:
    """Yield the upstream's SSE events one by one, as they arrive, bytes untouched.

    Raises UpstreamError when the stream breaks (connection dropped, read timeout).
    """
    content = response.content
    while True:
        try:
            block = await content.readuntil(b"\n\n", max_size=MAX_EVENT_BYTES)
        except asyncio.TimeoutError:
            raise UpstreamError(timeout_failure("waiting for the next stream event")) from None
        except LineTooLong:
            raise UpstreamError(dropped_failure("a stream event exceeded the size limit")) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(dropped_failure(f"stream broken: {type(exc).__name__}")) from None
        if not block:
            return
        if not block.endswith(b"\n\n"):
            if block.strip():  # EOF in the middle of an event: the connection was cut
                raise UpstreamError(dropped_failure("the upstream closed the stream mid-event"))
            return
        yield SSEEvent(block, parse_data(block))


def parse_data(block: bytes) -> bytes | None:
    """The `data:` payload of one event (multi-line data joined by newlines, per the SSE spec)."""
    if block.startswith(b"data: ") and block.count(b"\n") == 2:  # the common single-line case
        return block[6:-2]
    lines = []
    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines) if lines else None
