"""What a chat-completion stream says for the bill, read from its events as they pass (pure).

`StreamMeter` reads the `data` of each event for accounting: the time to the first chunk, the
generation id and provider, the usage object when a real one comes (OpenAI sends `"usage": null`
in every chunk until the last), an upstream error chunk, and the text that was generated, as UTF-8
bytes, for when the stream is cut before any usage comes. Most events of a long stream are ordinary
text chunks that differ from each other in their text alone; `see_events` parses one (`orjson`),
and then measures the next ones' text straight from their bytes while they keep its shape byte for
byte (see `_shape_of`). Anything else (the first chunk, usage, errors, tool calls, a new shape) is
parsed as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from proxy.core.record import RequestRecord, Usage

# Delta fields whose strings are generated text: answer, refusal, and reasoning (OpenRouter's
# `reasoning`, `reasoning_content` of DeepSeek-style upstreams).
TEXT_FIELDS = frozenset(("content", "refusal", "reasoning", "reasoning_content"))
# The body of a JSON string (between its quotes) as JSON allows it: without escapes, and with the
# escapes that decode to one byte each (`\uXXXX` ones are left to orjson).
_NOT_PLAIN = b'"\\' + bytes(range(0x20))  # a string body without these has no escape (translate() finds them)
_ESCAPED = re.compile(rb'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt])*')


class StreamMeter:
    """Reads each chunk of a chat-completion stream into the request's record, as it passes, and
    says which chunks the client gets: the final usage chunk (`"choices": []`) only when the client
    asked for it (`stream_options.include_usage`), as OpenAI does. OpenRouter sends it always; the
    proxy asks OpenAI-style upstreams for it always, since a stream without usage is billed blind."""

    __slots__ = ("_include_usage", "_record", "_shape", "_started")

    def __init__(self, record: RequestRecord, started: float, *, include_usage: bool = True) -> None:
        self._record = record
        self._started = started  # the monotonic time the request came in: TTFT counts from there
        self._include_usage = include_usage
        self._shape: _Shape | None = None  # an ordinary text chunk's bytes around its text

    def see_events(
        self, events: list[bytes], now: float, raw: bytes = b"", spans: Sequence[tuple[int, int]] = ()
    ) -> list[int]:
        """`see` the events of one read (`now`: the monotonic time it arrived), and return the
        indexes of those the client does not get (`forward`). `raw` and `spans`: the read's bytes
        and where each event lies in them (a `Batch`'s), to `skim` runs of events in them.

        An event with the shape of the last ordinary text chunk parsed (the same bytes before and
        after its text, so the same keys and values: no usage, no error, one choice, the text in
        the same field) is not parsed: its text's UTF-8 bytes are counted from its JSON string,
        which must be one JSON allows (else it is parsed, and orjson decides as before)."""
        dropped: list[int] = []
        record, index, count = self._record, 0, len(events)
        while index < count:
            data, shape = events[index], self._shape
            if shape is not None:
                # (a run, when there is one, holds this event whole: the loop below moves on)
                if spans and (run_end := self.skim(raw, spans[index][0], len(raw))) >= spans[index][1]:
                    while index < count and spans[index][1] <= run_end:
                        index += 1
                    continue
                counted = _text_in(shape, data)
                if counted is not None:
                    record.streamed_text_bytes += counted
                    index += 1
                    continue
            chunk = self.see(data, now)
            if not self.forward(chunk):
                dropped.append(index)
            elif chunk is not None:
                sole = self._sole_text(chunk)
                if sole is not None:
                    self._shape = _shape_of(data, chunk, *sole) or shape
            index += 1
        return dropped

    def skim(self, buffer: bytes, start: int, limit: int) -> int:
        """Where the run of whole events at `start` in `buffer` (SSE bytes, LF framing) that have the
        shape of the last ordinary text chunk parsed ends (`start`: none); their text is counted.
        `SseDecoder` calls it, so that such events are neither cut apart one by one nor parsed:
        each text ends at the next quote, after which come the same bytes each time (`joint`, or
        the last one's `closing`), and one check of the texts joined tells they are JSON strings as
        `see_events` requires (else the run stops before the first that is not). Events over
        `limit` bytes are left to the decoder."""
        shape = self._shape
        if shape is None:
            return start
        opening, closing, joint = shape.opening, shape.closing, shape.joint
        first = start + len(opening)
        if buffer[start:first] != opening:  # (a slice compared: cheaper than startswith's arguments)
            return start
        end = len(buffer) - len(closing)
        if end >= first and buffer[end:] == closing and len(buffer) - start <= limit:
            # One event to the end of the read (the common read), if its text has no quote: then
            # it has no line end either, and this is the whole event.
            counted = _plain_bytes(buffer[first:end])
            if counted is not None:
                self._record.streamed_text_bytes += counted
                return len(buffer)
        texts: list[bytes] = []
        at, find, step, last = first, buffer.find, len(joint), len(closing)
        while (quote := find(b'"', at)) >= 0:
            if buffer[quote : quote + step] == joint:  # this event is whole, and the next has the opening
                texts.append(buffer[at:quote])
                at = quote + step
                continue
            if buffer[quote : quote + last] == closing:
                texts.append(buffer[at:quote])
            break
        if not texts:
            return start
        framing = len(opening) + last
        joined = b" ".join(texts)  # a space between two texts: no escape runs on from one to the next
        counted = _string_bytes(joined)
        if counted is None or max(map(len, texts)) > limit - framing:
            for index, text in enumerate(texts):
                if _string_bytes(text) is None or len(text) > limit - framing:
                    texts = texts[:index]
                    break
            if not texts:
                return start
            joined = b" ".join(texts)
            counted = _string_bytes(joined)
            if counted is None:  # cannot be: each is a JSON string
                return start
        spaces = len(texts) - 1
        self._record.streamed_text_bytes += counted - spaces
        return start + len(texts) * framing + len(joined) - spaces

    def _sole_text(self, chunk: dict[str, Any]) -> tuple[str, str] | None:
        """(field, text) when all the text `see` counts in this chunk is that one string of its
        one choice's delta, else None."""
        choices = chunk.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            return None
        delta = choices[0].get("delta")
        if not isinstance(delta, dict):
            return None
        texts = [(name, value) for name, value in delta.items() if name in TEXT_FIELDS and isinstance(value, str)]
        if len(texts) != 1 or text_bytes(choices) != _utf8_len(texts[0][1]):
            return None
        return texts[0]

    def forward(self, chunk: dict[str, Any] | None) -> bool:
        return self._include_usage or chunk is None or chunk.get("choices") != []

    def see(self, data: bytes, now: float) -> dict[str, Any] | None:
        """Note what one event's data says; `now` is the monotonic time it arrived. Returns the
        parsed chunk (None when it is not a JSON object), so nothing else parses it again."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict):
            return None
        record = self._record
        if record.ttft_s is None:
            record.ttft_s = now - self._started
            record.note_origin(chunk)
        usage = chunk.get("usage")
        if usage is not None:  # OpenAI's `"usage": null` in every chunk is no usage
            parsed = Usage.from_payload(usage)
            if parsed is not None:
                record.usage = parsed
        if chunk.get("error"):
            record.error = "upstream_stream_error"
        choices = chunk.get("choices")
        if choices:
            # Counted always, used only when no usage comes: a stream cut short is billed from it.
            record.streamed_text_bytes += text_bytes(choices)
        return chunk


class _Shape(NamedTuple):
    """An ordinary text chunk's data: `before` its text's JSON string (up to its opening quote),
    the text, then `after` (from its closing quote); as an SSE event, `opening`, the text, then
    `closing`; and `joint`, the bytes between the texts of two such events in a row."""

    before: bytes
    after: bytes
    opening: bytes
    closing: bytes
    joint: bytes


def _shape_of(data: bytes, chunk: dict[str, Any], field: str, text: str) -> _Shape | None:
    """The bytes before and after the JSON string of `text` in `data`, which parsed as `chunk`:
    the shape of the chunks that differ from it in that text alone. Only for a chunk whose counted
    text is all in `field` (`_sole_text`), without usage or error, on one line, without any escape
    (so every key is spelt as it reads), and with one `"field"` in it: that one is the field's key."""
    if b"\\" in data or b"\n" in data or b"\r" in data or chunk.get("usage") is not None or chunk.get("error"):
        return None
    key = b'"' + field.encode() + b'"'
    if data.count(key) != 1:
        return None
    start = data.find(key + b':"')
    if start < 0:
        return None
    start += len(key) + 2
    end = data.find(b'"', start)
    if data[start:end] != text.encode():
        return None
    before, after = data[:start], data[end:]
    opening, closing = b"data: " + before, after + b"\n\n"
    return _Shape(before, after, opening, closing, closing + opening)


def _text_in(shape: _Shape, data: bytes) -> int | None:
    """The UTF-8 bytes of the text in `data` if it is a chunk of this shape, with a JSON string
    as `_string_bytes` requires, else None."""
    before, after = shape.before, shape.after
    end = len(data) - len(after)
    if end < len(before) or not data.startswith(before) or not data.endswith(after):
        return None
    return _string_bytes(data[len(before) : end])


def _string_bytes(text: bytes) -> int | None:
    """The UTF-8 bytes of the text of this JSON string body (between its quotes) if orjson would
    read it (no control characters, no unescaped quote, known escapes, valid UTF-8) and it has no
    `\\u` escape, else None."""
    counted = _plain_bytes(text)
    if counted is not None or _ESCAPED.fullmatch(text) is None:
        return counted
    if not text.isascii():
        try:
            text.decode()
        except UnicodeDecodeError:
            return None
    return len(text) - text.count(b"\\") + text.count(b"\\\\")  # an escaped backslash is two of them


def _plain_bytes(text: bytes) -> int | None:
    """`_string_bytes` of a string body without escapes (else None: it may still be a JSON string)."""
    if len(text.translate(None, _NOT_PLAIN)) != len(text):
        return None
    if text.isascii():
        return len(text)
    try:
        text.decode()
    except UnicodeDecodeError:
        return None
    return len(text)


def text_bytes(choices: Any) -> int:
    """UTF-8 bytes of the text generated in these delta choices: content, refusal, reasoning and
    tool-call arguments (names and ids are not generated text worth billing by length)."""
    if not isinstance(choices, list):
        return 0
    total = 0
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        # A delta has one to three keys: walking them is cheaper than looking up every text field.
        for name, value in delta.items():
            if isinstance(value, str):
                if name in TEXT_FIELDS:
                    total += _utf8_len(value)
            elif name == "tool_calls" and isinstance(value, list):
                for call in value:
                    total += _arguments_len(call.get("function") if isinstance(call, dict) else None)
            elif name == "function_call":  # the deprecated single-function form
                total += _arguments_len(value)
    return total


def _arguments_len(function: Any) -> int:
    arguments = function.get("arguments") if isinstance(function, dict) else None
    return _utf8_len(arguments) if isinstance(arguments, str) else 0


def _utf8_len(text: str) -> int:
    # isascii() is O(1) in CPython (the string knows its kind), so ASCII text is never encoded.
    return len(text) if text.isascii() else len(text.encode())
