"""Relay an upstream SSE stream to the client as it arrives, bytes untouched.

IO only: read the upstream, feed `proxy.core.sse` (the decoder cuts reads into
events) and the API's meter (which bills them, and says which the client gets),
write. Each network read is forwarded in one write, once the events in it are
whole. Before the stream's end goes out (chat's `[DONE]`; for APIs without an
end marker, the end of the body), `finish` runs, so the ledger row of a stream
is committed before the client has the whole answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from proxy.cache.replay import StreamAssembler
from proxy.core.apis import Api, Meter
from proxy.core.overhead import HEADER, Overhead, milliseconds
from proxy.core.record import RequestRecord
from proxy.core.redact import leaks, redact
from proxy.core.stream_meter import StreamMeter
from proxy.upstream.client import OpenedStream, UpstreamError, decode, read_piece

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # keep nginx and friends from buffering the stream
}
Finish = Callable[[], Awaitable[None]]


async def relay(
    request: web.Request,
    stream: OpenedStream,
    headers: Mapping[str, str],
    meter: Meter,
    finish: Finish,
    *,
    api: Api,
    record: RequestRecord,
    assembler: StreamAssembler | None = None,
    secrets: tuple[str, ...] = (),
    overhead: Overhead | None = None,
) -> web.StreamResponse:
    """Forward the stream, `meter` filling the record from it (and `assembler`, for the cache). The
    upstream response is always closed. `secrets` (the proxy's upstream keys) never reach the
    client: an upstream may echo one in an error event, which is forwarded with it redacted.
    `overhead`: the request's, published in the headers and added to by the work on each read."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    upstream = stream.response
    try:
        if overhead is not None:
            overhead.at_headers_s = overhead.until(time.perf_counter())
            response.headers[HEADER] = milliseconds(overhead.at_headers_s)
        await response.prepare(request)
        error = await _forward(stream, response, meter, api, record, assembler, secrets, overhead)
        if error and assembler is not None:
            assembler.failed = True
        upstream.close()
        finishing = time.perf_counter()
        await finish()
        if overhead is not None:
            overhead.streaming_s += time.perf_counter() - finishing
        end = error + (api.done or b"")
        if end:
            await response.write(end)
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
    meter: Meter,
    api: Api,
    record: RequestRecord,
    assembler: StreamAssembler | None,
    secrets: tuple[str, ...],
    overhead: Overhead | None,
) -> bytes:
    """Copy events up to (not including) chat's [DONE]; return an error event to send if the stream
    broke. The meter writes into the record as events pass, so a client hanging up mid-way is
    billed for the text that reached the proxy by then."""
    encoded = tuple(secret.encode() for secret in secrets if secret)
    # Chat's and legacy completions' meter skips cutting and parsing ordinary text chunks; the
    # cache's assembler needs every chunk parsed, and other APIs' meters parse each event.
    skimming = meter if assembler is None and isinstance(meter, StreamMeter) else None
    content, decoder = stream.response.content, stream.decoder
    if skimming is not None:  # the decoder leaves runs of ordinary text chunks to it, uncut
        decoder.skim = skimming.skim
    batch, began = stream.first, time.perf_counter()
    try:
        while batch is not None:
            # `began`: the read came in. Cutting it into events, metering and inspecting them is
            # the proxy's work; the write is left out, as it may wait on the client.
            if not batch.events:  # comments, part of an event, or text chunks the skim has metered
                raw = batch.raw
            else:
                if skimming is not None:
                    dropped = skimming.see_events(batch.events, time.monotonic(), batch.raw, batch.spans)
                else:
                    dropped = _see(meter, batch.events, assembler)
                raw = batch.without(dropped) if dropped else batch.raw
            if overhead is not None:
                overhead.streaming_s += time.perf_counter() - began
            if raw:
                # One substring search per key and read; a copy only when a key is really there.
                await response.write(redact(raw, secrets) if leaks(raw, encoded) else raw)
            if batch.done:
                return b""
            piece = await read_piece(content)
            began = time.perf_counter()
            batch = decode(decoder, piece)
        if assembler is not None and api.done is not None:
            assembler.failed = True  # the stream ended without [DONE]
    except UpstreamError as exc:
        # After the first byte there is no falling back: say what broke, then end cleanly.
        record.error = "stream_interrupted"
        message = redact(exc.failure.message, secrets)
        return api.stream_error_after(meter, f"The upstream stream broke off: {message}", "stream_interrupted")
    return b""


def _see(meter: Meter, events: list[bytes], assembler: StreamAssembler | None) -> list[int]:
    """Parse and meter each event (and feed the assembler); the indexes of those the client does not get."""
    now = time.monotonic()
    dropped: list[int] = []
    for index, data in enumerate(events):
        chunk = meter.see(data, now)
        if assembler is not None:
            assembler.add_chunk(chunk)
        if not meter.forward(chunk):
            dropped.append(index)
    return dropped
