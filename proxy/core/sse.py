"""A server-sent event stream without IO: network reads in, whole events out.

`SseDecoder` cuts the bytes of each network read into whole server-sent events and says which
bytes may be forwarded now: the whole events, untouched (CRLF framing and comments included), so
the relay still makes one write per read. What is left of an unfinished event waits for the next
read. `data: [DONE]` ends the stream: the decoder stops in front of it, and the relay sends its own
`[DONE]` once the request has been settled. What the events say for the bill is
`proxy.core.stream_meter`'s (a decoder may hand it runs of ordinary events whole: `Skim`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

DONE = b"[DONE]"
# (buffer, start, event size limit) -> where the run of ordinary events at `start` ends (`StreamMeter.skim`)
Skim = Callable[[bytes, int, int], int]


class EventTooLarge(ValueError):
    """An event grew past the decoder's limit; holding more of it would let one upstream use
    unbounded memory, so the stream is given up."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a stream event exceeded the size limit ({size} bytes, the limit is {limit})")
        self.size = size
        self.limit = limit


class Batch(NamedTuple):
    """What one network read completed."""

    raw: bytes  # the whole events, byte for byte as they came: forward them in one write
    events: list[bytes]  # the `data` of each of those events; comments and data-less events have none
    done: bool  # `data: [DONE]` came: `raw` stops in front of it, and nothing after it is read
    spans: tuple[tuple[int, int], ...] | list[tuple[int, int]] = ()  # where in `raw` each event lies, to drop one

    def without(self, dropped: list[int]) -> bytes:
        """`raw` without the events at these indexes (into `events`), the rest byte for byte."""
        kept, at = [], 0
        for index in dropped:
            start, end = self.spans[index]
            kept.append(self.raw[at:start])
            at = end
        kept.append(self.raw[at:])
        return b"".join(kept)


def _batch(raw: bytes, events: list[bytes], done: bool, spans: list[tuple[int, int]] | tuple[()]) -> Batch:
    return tuple.__new__(Batch, (raw, events, done, spans))  # not Batch(...): its __new__ is Python code


class SseDecoder:
    """Incremental SSE framing (the WHATWG event-stream format): lines end in LF or CRLF, a blank
    line ends an event, `data:` lines are joined with LF, comment and other field lines are kept in
    `raw` but carry no data. A lone CR as a line end is legal SSE but sent by no LLM API, and is
    not treated as one.

    `skim`, when set, is offered each event start (LF framing): it meters the run of ordinary
    events there from their bytes (`StreamMeter.skim`), and they go into `raw` but not `events`."""

    __slots__ = ("_carry", "_crlf", "_done", "_limit", "_resume", "skim")

    def __init__(self, max_event_bytes: int) -> None:
        self._limit = max_event_bytes
        self._carry = b""  # the start of an event whose end has not come yet
        self._resume = 0  # where in `_carry` the search for its end goes on (no byte is searched twice)
        self._crlf = False  # CR seen: from then on, lines are scanned one by one
        self._done = False
        self.skim: Skim | None = None

    @property
    def pending(self) -> bool:
        """Part of an event is waiting for its end: a stream ending now was cut mid-event."""
        return bool(self._carry.strip())

    def feed(self, piece: bytes) -> Batch:
        """The events `piece` completes, with the exact bytes to forward for them. Raises
        EventTooLarge when an event is, or grows, larger than the limit."""
        if self._done:
            return _batch(b"", [], True, ())
        carry = self._carry
        buffer = carry + piece if carry else piece
        start, search, skim = 0, self._resume, self.skim
        if skim is not None and not self._crlf and (start := skim(buffer, 0, self._limit)) > 0:
            if start == len(buffer):  # ordinary text chunks alone (no CR in them): a long stream's read
                self._carry, self._resume = b"", 0
                return _batch(buffer, [], False, ())
            search = start
        # (find, not `in`: for bytes, `in` first tries the needle as an int, and formats an error)
        if not self._crlf and piece.find(b"\r") >= 0:
            self._crlf, search = True, start  # lines of the carry were not tracked: scan it again
        crlf = self._crlf
        if crlf:
            skim = None
        events: list[bytes] = []
        spans: list[tuple[int, int]] = []
        while True:
            if crlf:
                body_end, end = _crlf_event_end(buffer, search)
            else:  # the hot path: a plain search, no call
                body_end = buffer.find(b"\n\n", search)
                end = body_end + 2
            if body_end < 0:
                break
            if end - start > self._limit:
                raise EventTooLarge(end - start, self._limit)
            data = _event_data(buffer[start:body_end])
            if data == DONE:
                self._done, self._carry = True, b""
                return _batch(buffer[:start], events, True, spans)
            if data is not None:
                events.append(data)
                spans.append((start, end))
            start = search = end
            if skim is not None and (run_end := skim(buffer, start, self._limit)) > start:
                start = search = run_end
        self._keep(buffer, start, search)
        return _batch(buffer[:start], events, False, spans)

    def _keep(self, buffer: bytes, start: int, search: int) -> None:
        """Hold the unfinished event back for the next read; it may not outgrow the limit."""
        self._carry = carry = buffer[start:]
        if len(carry) > self._limit:
            raise EventTooLarge(len(carry), self._limit)
        if self._crlf:
            self._resume = _last_line_start(buffer, search) - start
        else:  # a blank line may straddle the two reads: look at the carry's last byte again
            self._resume = max(0, len(carry) - 1)


def _crlf_event_end(buffer: bytes, at: int) -> tuple[int, int]:
    """(end of the event's own lines, end of its closing blank line) of the first event that ends
    at or after `at` (a line start), or (-1, -1), for lines ending in LF or CRLF."""
    line = at
    while (newline := buffer.find(b"\n", line)) >= 0:
        if newline == line or (newline == line + 1 and buffer[line] == 0x0D):  # a blank line
            return line, newline + 1
        line = newline + 1
    return -1, -1


def _last_line_start(buffer: bytes, at: int) -> int:
    """Where the line that is still open at the end of `buffer` starts (searching from `at`)."""
    return buffer.rfind(b"\n", at) + 1 or at


def _event_data(body: bytes) -> bytes | None:
    """The `data` of one event's lines (multi-line data joined by LF, per the SSE spec), or None
    when it has none (a comment such as `: OPENROUTER PROCESSING`). A body with a CR always has
    an LF too (the decoder cuts CRLF events with their last line end), so takes the long way."""
    if body.startswith(b"data: ") and body.find(b"\n") < 0:  # the common case: one line, LF framing
        return body[6:] or None
    values = []
    for line in body.split(b"\n"):
        line = line.removesuffix(b"\r")
        if line.startswith(b"data:"):
            value = line[5:]
            values.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":  # a field name alone has an empty value
            values.append(b"")
    return b"\n".join(values) or None  # an empty data buffer dispatches nothing
