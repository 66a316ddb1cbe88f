"""Reading what a Messages answer costs: its `usage` object, and its stream's typed events.

A stream says who answered in `message_start` (the generation id and provider) and what it cost
in `message_delta`, whose usage is cumulative and final. OpenRouter's `message_start` may carry
zeros (or nulls) for the input, which its `message_delta` then gives; Anthropic's own may give
the input only there. So the start's figures are kept, and the delta's non-null ones win.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core.record import RequestRecord, Usage

# The delta fields whose strings are generated text (billed by length when a stream is cut short).
TEXT_FIELDS = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}


def count(value: Any) -> int:
    """A token count as reported: a whole number >= 0, else 0 (null, absent or nonsense)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def messages_usage(usage: Any) -> Usage | None:
    """The proxy's usage from a Messages `usage` object. Anthropic counts cached input apart:
    the prompt is `input_tokens` + `cache_read_input_tokens` + `cache_creation_input_tokens`
    (the last two may be null); OpenRouter adds its `cost`."""
    if not isinstance(usage, dict):
        return None
    cached = count(usage.get("cache_read_input_tokens"))
    written = count(usage.get("cache_creation_input_tokens"))
    cost = usage.get("cost")
    return Usage(
        count(usage.get("input_tokens")) + cached + written,
        count(usage.get("output_tokens")),
        float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
        cached,
        written,
    )


class MessagesMeter:
    """Reads each event of a Messages stream into the request's record as it passes. Every event
    goes on to the client (pings included: Anthropic's clients expect them); the usage is set only
    from `message_delta`, so a stream cut before it is billed from its text, never from the start's
    partial figures (whose input count, when it gives one, replaces the prompt's estimate)."""

    __slots__ = ("_record", "_start", "_started")

    def __init__(self, record: RequestRecord, started: float) -> None:
        self._record = record
        self._started = started  # the monotonic time the request came in: TTFT counts from there
        self._start: dict[str, Any] = {}  # the usage `message_start` gave

    def forward(self, chunk: dict[str, Any] | None) -> bool:
        return True

    def see(self, data: bytes, now: float) -> dict[str, Any] | None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(event, dict):
            return None
        record = self._record
        if record.ttft_s is None:
            record.ttft_s = now - self._started
        kind = event.get("type")
        if kind == "content_block_delta":  # the hot path: most events are these
            record.streamed_text_bytes += _delta_bytes(event.get("delta"))
        elif kind == "message_start":
            self._started_message(event.get("message"))
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                merged = {**self._start, **{name: value for name, value in usage.items() if value is not None}}
                record.usage = messages_usage(merged)
        elif kind == "content_block_start":
            block = event.get("content_block")
            text = block.get("text") if isinstance(block, dict) else None
            if isinstance(text, str):
                record.streamed_text_bytes += _utf8_len(text)
        elif kind == "error":
            record.error = "upstream_stream_error"
        return event

    def _started_message(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        self._record.note_origin(message)
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._start = {name: value for name, value in usage.items() if value is not None}
            counted = messages_usage(self._start)
            if counted is not None and counted.prompt_tokens:  # Anthropic's count beats any estimate
                self._record.prompt_estimate = counted.prompt_tokens


def _delta_bytes(delta: Any) -> int:
    if not isinstance(delta, dict):
        return 0
    kind = delta.get("type")
    field = TEXT_FIELDS.get(kind) if isinstance(kind, str) else None
    text = delta.get(field) if field is not None else None
    return _utf8_len(text) if isinstance(text, str) else 0


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())
