"""Relay an upstream SSE stream to the client as it arrives, bytes untouched.

Each network read is forwarded in one write, once the events in it are whole.
Only a few events are looked into (the first, one carrying `usage` or
`error`, `[DONE]`); the rest cost a substring check. Before the final
`[DONE]` goes out, `finish` runs, so the ledger row of a stream is committed
before the client has the whole answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import orjson
from aiohttp import web

from proxy.cache.replay import StreamAssembler
from proxy.core.record import RequestRecord, Usage
from proxy.upstream.client import UpstreamError, event_data, iter_batches

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
    """Copy events up to (not including) [DONE]; return an error event to send if the stream broke."""
    tracker = _Tracker(record, started)
    try:
        async for batch, events in iter_batches(upstream):
            for index, event in enumerate(events):
                if event == b"data: [DONE]":
                    head = b"".join(e + b"\n\n" for e in events[:index])
                    if head:
                        await response.write(head)
                    return b""
                data = tracker.see(event)
                if assembler is not None and data is not None:
                    assembler.add(data)
            await response.write(batch)
        if assembler is not None:
            assembler.failed = True  # the stream ended without [DONE]
    except UpstreamError as exc:
        # After the first byte there is no falling back: say what broke, then end cleanly.
        record.error = "stream_interrupted"
        return error_event(f"The upstream stream broke off: {exc.failure.message}", "stream_interrupted")
    finally:
        tracker.close()  # also when the client hangs up: the text it was sent is billed
    return b""


class _Tracker:
    """What the stream tells accounting: first-token time, ids, usage, and a size estimate of
    the answer for when no usage ever comes (a stream cut short must still be billed)."""

    __slots__ = ("envelope", "extra_bytes", "record", "started")

    def __init__(self, record: RequestRecord, started: float) -> None:
        self.record = record
        self.started = started
        self.envelope = 0  # the byte size of an empty chunk: the first (role) chunk
        self.extra_bytes = 0  # bytes beyond the envelope, summed: roughly the generated text

    def see(self, event: bytes) -> bytes | None:
        """Note what the event says; return its data payload (None for a comment)."""
        if event.startswith(b":"):
            return None  # a comment, e.g. ": OPENROUTER PROCESSING"
        data = event_data(event)
        if data is None:
            return None
        record = self.record
        if record.ttft_s is None or b'"usage"' in data or b'"error"' in data:
            self._parse(data)
        elif self.envelope:
            self.extra_bytes += max(0, len(data) - self.envelope)
        return data

    def _parse(self, data: bytes) -> None:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(chunk, dict):
            return
        record = self.record
        if record.ttft_s is None:
            record.ttft_s = time.monotonic() - self.started
            self.envelope = len(data)
            record.note_origin(chunk)
        usage = Usage.from_payload(chunk.get("usage"))
        if usage is not None:
            record.usage = usage
        if chunk.get("error"):
            record.error = "upstream_stream_error"

    def close(self) -> None:
        if self.record.usage is None:
            self.record.streamed_text_bytes = self.extra_bytes
