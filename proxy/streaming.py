"""Relay an upstream SSE stream to the client, event by event, bytes untouched.

Only a few events are looked into (the first, the one with `usage`, an
`error`); the rest are forwarded after a substring check, so a long answer
costs one write per event and nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import aiohttp
import orjson
from aiohttp import web

from .accounting import RequestRecord, Usage
from .upstream import UpstreamError, iter_events

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # keep nginx and friends from buffering the stream
}
DONE = b"data: [DONE]\n\n"


def error_event(message: str, code: str) -> bytes:
    """OpenAI's in-stream error form; the SDKs raise APIError on it."""
    return b"data: " + orjson.dumps({"error": {"message": message, "type": "upstream_error",
                                               "param": None, "code": code}}) + b"\n\n"


async def relay(request: web.Request, upstream: aiohttp.ClientResponse, headers: Mapping[str, str],
                record: RequestRecord, started: float) -> web.StreamResponse:
    """Forward the stream; fill `record` with what it carried. The upstream response is always closed."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    try:
        await response.prepare(request)
        if not await _forward(upstream, response, record, started):
            await response.write(DONE)
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        # The client went away: drop the upstream connection now, so no more tokens are generated.
        upstream.close()
        record.error, record.status = "client_disconnected", 499
        if isinstance(exc, asyncio.CancelledError):
            raise
    finally:
        upstream.close()
    return response


async def _forward(upstream: aiohttp.ClientResponse, response: web.StreamResponse, record: RequestRecord,
                   started: float) -> bool:
    """Copy events until [DONE] or the end; return whether [DONE] was forwarded."""
    try:
        async for event in iter_events(upstream):
            data = event.data
            if data is not None:
                if data == b"[DONE]":
                    await response.write(event.raw)
                    return True
                if record.ttft_s is None or b'"usage"' in data or b'"error"' in data:
                    _observe(data, record, started)
            await response.write(event.raw)
    except UpstreamError as exc:
        # After the first byte there is no falling back: say what broke, then end cleanly.
        record.error = "stream_interrupted"
        await response.write(error_event(f"The upstream stream broke off: {exc.failure.message}",
                                         "stream_interrupted"))
    return False


def _observe(data: bytes, record: RequestRecord, started: float) -> None:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if not isinstance(chunk, dict):
        return
    if record.ttft_s is None:
        record.ttft_s = time.monotonic() - started
        record.generation_id = chunk.get("id") if isinstance(chunk.get("id"), str) else None
        provider = chunk.get("provider")
        record.provider = provider if isinstance(provider, str) else None
    usage = Usage.from_payload(chunk.get("usage"))
    if usage is not None:
        record.usage = usage
    error = chunk.get("error")
    if error:
        record.error = "upstream_stream_error"
