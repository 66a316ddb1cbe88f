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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import orjson
from aiohttp import web

from proxy.cache.replay import StreamAssembler
from proxy.core.record import RequestRecord
from proxy.core.redact import leaks, redact
from proxy.core.sse import Batch, StreamMeter
from proxy.upstream.client import OpenedStream, UpstreamError

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
    stream: OpenedStream,
    headers: Mapping[str, str],
    record: RequestRecord,
    started: float,
    finish: Finish,
    assembler: StreamAssembler | None = None,
    secrets: tuple[str, ...] = (),
) -> web.StreamResponse:
    """Forward the stream and fill `record` from it (and `assembler`, for the cache). The upstream
    response is always closed. `secrets` (the proxy's upstream keys) never reach the client: an
    upstream may echo one in an error event, which is forwarded with it redacted."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    upstream = stream.response
    try:
        await response.prepare(request)
        error = await _forward(stream, response, record, started, assembler, secrets)
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
    stream: OpenedStream,
    response: web.StreamResponse,
    record: RequestRecord,
    started: float,
    assembler: StreamAssembler | None,
    secrets: tuple[str, ...],
) -> bytes:
    """Copy events up to (not including) [DONE]; return an error event to send if the stream broke.
    The meter writes into `record` as events pass, so a client hanging up mid-way is billed for
    the text that reached the proxy by then."""
    meter = StreamMeter(record, started)
    encoded = tuple(secret.encode() for secret in secrets if secret)
    try:
        async for batch in _batches(stream):
            now = time.monotonic()
            for data in batch.events:
                chunk = meter.see(data, now)
                if assembler is not None:
                    assembler.add_chunk(chunk)
            if batch.raw:
                # One substring search per key and read; a copy only when a key is really there.
                await response.write(redact(batch.raw, secrets) if leaks(batch.raw, encoded) else batch.raw)
            if batch.done:
                return b""
        if assembler is not None:
            assembler.failed = True  # the stream ended without [DONE]
    except UpstreamError as exc:
        # After the first byte there is no falling back: say what broke, then end cleanly.
        record.error = "stream_interrupted"
        message = redact(exc.failure.message, secrets)
        return error_event(f"The upstream stream broke off: {message}", "stream_interrupted")
    return b""


async def _batches(stream: OpenedStream) -> AsyncIterator[Batch]:
    if stream.first is None:
        return
    yield stream.first
    if not stream.first.done:
        async for batch in stream.batches:
            yield batch
