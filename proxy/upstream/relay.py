"""Relay an upstream SSE stream to the client as it arrives, bytes untouched.

IO only: read the upstream, feed `proxy.core.sse` (the decoder cuts reads into
events, the meter bills them), write. Each network read is forwarded in one
write, once the events in it are whole. Before the final `[DONE]` goes out,
`finish` runs, so the ledger row of a stream is committed before the client
has the whole answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import orjson
from aiohttp import web

from proxy.cache.replay import StreamAssembler
from proxy.core.record import RequestRecord
from proxy.core.sse import StreamMeter
from proxy.upstream.client import UpstreamError, iter_batches

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # keep nginx and friends from buffering the stream
}
DONE = b"data: [DONE]\n\n"
Finish = Callable[[], Awaitable[None]]


def error_event(message: str, code: str) -> bytes:
    """OpenAI's in-stream error form; the SDKs raise APIError on it."""
    return (
        b"data: "
        + orjson.dumps({"error": {"message": message, "type": "upstream_error", "param": None, "code": code}})
        + b"\n\n"
    )


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: Mapping[str, str],
    record: RequestRecord,
    started: float,
    finish: Finish,
    assembler: StreamAssembler | None = None,
) -> web.StreamResponse:
    """Forward the stream and fill `record` from it (and `assembler`, for the cache). The upstream
    response is always closed."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    try:
        await response.prepare(request)
        error = await _forward(upstream, response, record, started, assembler)
        if error and assembler is not None:
            assembler.failed = True
        upstream.close()
        await finish()
        await response.write(error + DONE if error else DONE)
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


async def _forward(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    record: RequestRecord,
    started: float,
    assembler: StreamAssembler | None,
) -> bytes:
    """Copy events up to (not including) [DONE]; return an error event to send if the stream broke.
    The meter writes into `record` as events pass, so a client hanging up mid-way is billed for
    the text that reached the proxy by then."""
    meter = StreamMeter(record, started)
    try:
        async for batch in iter_batches(upstream):
            now = time.monotonic()
            for data in batch.events:
                chunk = meter.see(data, now)
                if assembler is not None:
                    assembler.add_chunk(chunk)
            if batch.raw:
                await response.write(batch.raw)
            if batch.done:
                return b""
        if assembler is not None:
            assembler.failed = True  # the stream ended without [DONE]
    except UpstreamError as exc:
        # After the first byte there is no falling back: say what broke, then end cleanly.
        record.error = "stream_interrupted"
        return error_event(f"The upstream stream broke off: {exc.failure.message}", "stream_interrupted")
    return b""
