"""What every emulated stream (chat, Responses, Messages, legacy completions) does alike: its
headers, the keep-alive comments while the model "thinks" and its bill (`StreamTally`); and, but
for Messages (Anthropic's error event), its break under a mid-stream fault.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from .billing import Charge, text_tokens
from .completions import ModelInfo
from .faults import Fault
from .replies import drop_connection
from .state import EmulatorState

PROCESSING_INTERVAL_S = 0.1  # how often `: OPENROUTER PROCESSING` is sent while "thinking"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamTally:
    """One stream's counters and bill, as OpenRouter bills: whole once it ran to its end
    (`completed`), else its prompt (the model read it) and the text of the content frames written
    so far (`sent`, counted by the handler): by `cut` where the emulator broke the stream itself,
    and on leaving the `with` block when the client went away mid-stream (counted as cancelled; a
    reset connection ends the block quietly, a cancellation goes on up)."""

    __slots__ = ("_charge", "_gen_id", "_model", "_pieces", "_state", "sent")

    def __init__(self, state: EmulatorState, gen_id: str, model: ModelInfo, charge: Charge, pieces: list[str]) -> None:
        self._state = state
        self._gen_id = gen_id
        self._model = model
        self._charge = charge
        self._pieces = pieces  # the text of each content frame, in order
        self.sent = 0  # content frames written: what a stream cut short is billed for

    def __enter__(self) -> StreamTally:
        self._state.stats["streams_started"] += 1
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        if kind is None or not issubclass(kind, (ConnectionResetError, asyncio.CancelledError)):
            return False
        self._state.stats["streams_cancelled"] += 1
        self.cut(cancelled=True)
        return issubclass(kind, ConnectionResetError)  # the client went away: nothing more to send

    def cut(self, *, cancelled: bool = False) -> None:
        """A stream cut short: its prompt and the text it had sent, no more."""
        state = self._state
        if self._gen_id in state.bills:  # billed already (the stream had ended before the cut was noticed)
            return
        charge = self._charge
        completion = text_tokens(sum(len(piece.encode()) for piece in self._pieces[: self.sent]))
        partial = Charge(charge.prompt_tokens, completion, charge.cached_tokens, charge.cache_write_tokens)
        finish_reason = None if cancelled else "error"
        state.bill(self._gen_id, self._model, partial, streamed=True, cancelled=cancelled, finish_reason=finish_reason)

    def completed(self, finish_reason: str | None) -> None:
        """The stream ran to its end: billed whole, usage chunk or not."""
        stats = self._state.stats
        self._state.bill(self._gen_id, self._model, self._charge, streamed=True, finish_reason=finish_reason)
        stats["streams_completed"] += 1
        stats["completions"] += 1


async def keep_alive(response: web.StreamResponse, latency_s: float, comment: bytes | None) -> None:
    """Wait `latency_s`, sending `comment` (if any) every PROCESSING_INTERVAL_S."""
    if comment is None:
        await asyncio.sleep(latency_s)
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + latency_s
    while (remaining := deadline - loop.time()) > 0:
        await asyncio.sleep(min(PROCESSING_INTERVAL_S, remaining))
        if deadline - loop.time() > 0:
            await response.write(comment)


async def break_stream(
    request: web.Request,
    state: EmulatorState,
    response: web.StreamResponse,
    fault: Fault,
    error_event: Callable[[int | str, str], bytes],
) -> web.StreamResponse:
    """End a stream as a mid-stream fault says: the connection dropped, or `error_event(code, message)`
    and nothing after it (no usage chunk, no completed response, no [DONE])."""
    state.stats["streams_failed"] += 1
    if fault.drop_midstream:
        drop_connection(request)
        return response
    message = fault.message or "Provider disconnected unexpectedly"
    await response.write(error_event(fault.code if fault.code is not None else "server_error", message))
    await response.write_eof()
    return response
