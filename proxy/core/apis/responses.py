"""POST /v1/responses: OpenAI's Responses API, which OpenRouter serves at /api/v1/responses.

What differs from chat: the prompt is `instructions` plus `input` (a string, or a list of items:
messages with typed content parts, function calls and their outputs, reasoning items), the limit
is `max_output_tokens`, JSON mode lives in `text.format`, usage says `input_tokens` /
`output_tokens` with `input_tokens_details.cached_tokens` (OpenRouter adds `cost` and
`cache_write_tokens`), and a stream is typed events (`response.created` …
`response.output_text.delta` … `response.completed`, whose response carries the usage), with no
end marker: OpenRouter ends with `data: [DONE]`, OpenAI just closes, and the proxy, like OpenAI,
sends nothing after the last event.

The proxy serves it statelessly, as OpenRouter does: a response that builds on one stored at an
upstream (`previous_response_id`, `conversation`, a stored `prompt`) cannot fall back to another
member, nor be reserved for (its prompt is not in the request), and a `background` one finishes
after the request, unbilled; all are refused with a 400 naming the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.core.apis.base import Api, Meter, check_model, check_stream, positive_int, task_of
from proxy.core.errors import InvalidRequest
from proxy.core.features import (
    CHARS_PER_TOKEN,
    IMAGE_PART_TYPES,
    IMAGE_TOKENS,
    IMAGE_TYPICAL_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    TOOL_OVERHEAD_TOKENS,
    PromptSize,
    RequestFeatures,
)
from proxy.core.record import RequestRecord, Usage

# Parameters that make a response depend on state kept at one upstream, or outlive the request.
STATEFUL = {
    "previous_response_id": "builds on a response stored at one upstream",
    "conversation": "builds on a conversation stored at one upstream",
    "prompt": "uses a prompt template stored at one upstream",
}
# Lifecycle events: they carry the response object (id, status, and in the last one the usage).
# A stream's first token is the first event that is not one of the opening ones.
OPENING_EVENTS = frozenset(("response.created", "response.in_progress", "response.queued"))
FAILED_EVENTS = frozenset(("error", "response.failed"))
TEXT_PART_TYPES = frozenset(("input_text", "output_text", "text"))


class ResponsesApi(Api):
    name = "responses"
    routes = ("/v1/responses",)
    path = "/responses"
    content_key = "output"  # a 200 body with `error` and no output is a failed response
    done = None  # OpenAI's Responses streams have no end marker (OpenRouter's `[DONE]` is not passed on)

    def check(self, body: dict[str, Any]) -> None:
        check_model(body)
        check_input(body.get("input"))
        for name, why in STATEFUL.items():
            if body.get(name) is not None:
                raise InvalidRequest(
                    f"'{name}' is not supported: the request {why}, and this proxy, like OpenRouter's Responses "
                    "API, is stateless (another model of the chain would not have it, and its cost could not be "
                    "reserved). Send the whole conversation in 'input', with 'store': false.",
                    param=name,
                    code="unsupported_parameter",
                )
        if body.get("background") is True:
            raise InvalidRequest(
                "'background': true is not supported: a background response finishes after the request, where "
                "the proxy can neither fall back nor bill it. Use 'stream': true for long responses.",
                param="background",
                code="unsupported_parameter",
            )
        check_stream(body)

    def features(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> RequestFeatures:
        items = input_items(body.get("input"))
        tools = body.get("tools")
        text_format = text_format_of(body)
        images = count_images(items)
        size = prompt_size(body.get("instructions"), body.get("input"), items, tools, text_format, images)
        return RequestFeatures(
            task=task_of(body, headers),
            has_tools=bool(tools),
            has_images=images > 0,
            json_mode=text_format is not None and text_format.get("type") in ("json_object", "json_schema"),
            stream=body.get("stream") is True,
            prompt_tokens=size.bound,
            last_user_text=last_user_text(items),
            max_tokens=positive_int(body.get("max_output_tokens")),
            prompt_estimate=size.estimate,
        )

    def usage(self, payload: Mapping[str, Any]) -> Usage | None:
        return responses_usage(payload.get("usage"))

    def meter(self, record: RequestRecord, started: float, body: Mapping[str, Any]) -> ResponsesMeter:
        return ResponsesMeter(record, started)

    def stream_error(self, message: str, code: str) -> bytes:
        return error_event(message, code, 0)

    def stream_error_after(self, meter: Meter, message: str, code: str) -> bytes:
        # Numbered after the last event the client had, as the upstream would have numbered it.
        sequence = meter.sequence + 1 if isinstance(meter, ResponsesMeter) else 0
        return error_event(message, code, sequence)


def error_event(message: str, code: str, sequence: int) -> bytes:
    """OpenAI's in-stream `error` event (`ResponseErrorEvent`) as a bare `data:` line, as OpenRouter
    sends every event. Without an `event: error` line on purpose: openai-python 1.x reads a named
    event other than `response.*` as `{"data": ..., "event": ...}`, so would not see this one as
    an error event; every client, old or new, dispatches on the data's `type`."""
    event = {"type": "error", "code": code, "message": message, "param": None, "sequence_number": sequence}
    return b"data: " + orjson.dumps(event) + b"\n\n"


def check_input(value: Any) -> None:
    if isinstance(value, str) and value:
        return
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return
    raise InvalidRequest(
        "'input' must be a non-empty string or a non-empty array of input items (objects).",
        param="input",
        code="missing_required_parameter" if value is None else "invalid_type",
    )


def input_items(value: Any) -> list[Any]:
    """`input` as a list of items: a string is one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return value if isinstance(value, list) else []


def text_format_of(body: Mapping[str, Any]) -> dict[str, Any] | None:
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    return fmt if isinstance(fmt, dict) else None


def _parts(item: Any) -> list[Any] | None:
    """The list of content parts an item carries (a message's `content`, a function call output's
    `output`), or None."""
    if not isinstance(item, dict):
        return None
    parts = item.get("content")
    if parts is None and item.get("type") == "function_call_output":
        parts = item.get("output")
    return parts if isinstance(parts, list) else None


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def count_images(items: list[Any]) -> int:
    total = 0
    for item in items:
        parts = _parts(item)
        if parts:
            total += sum(1 for part in parts if _is_image(part))
    return total


def _without_images(item: Any) -> Any:
    parts = _parts(item)
    if not parts or not any(_is_image(part) for part in parts):
        return item
    kept = [part for part in parts if not _is_image(part)]
    return {**item, "content": kept} if "content" in item else {**item, "output": kept}


def prompt_size(
    instructions: Any, raw_input: Any, items: list[Any], tools: Any, text_format: dict[str, Any] | None, images: int
) -> PromptSize:
    """The prompt's upper bound and typical size, by the rules of `proxy.core.features.prompt_size`:
    a token per UTF-8 byte of the prompt as JSON (`instructions`, `input` without its image parts,
    `tools`), `IMAGE_TOKENS` per image part (in a message, or in a function call's output), a few
    tokens per input item (instructions count as one) and per tool, and a JSON schema's bytes.
    An encrypted reasoning item is counted by the bytes of its base64 ciphertext, like any text:
    an assumption (its plaintext is not known) that the ciphertext is no shorter than the
    reasoning tokens it carries."""
    # The common case (no image): the input as sent, serialised once.
    sent = [_without_images(item) for item in items] if images else raw_input
    text = len(orjson.dumps(sent))
    turns = len(items)
    if instructions:
        text += len(orjson.dumps(instructions))
        turns += 1
    if tools:
        text += len(orjson.dumps(tools))
    bound = text + MESSAGE_OVERHEAD_TOKENS * turns + IMAGE_TOKENS * images
    if tools:
        bound += TOOL_OVERHEAD_TOKENS * (len(tools) if isinstance(tools, list) else 1)
    if text_format is not None and text_format.get("type") == "json_schema":
        bound += len(orjson.dumps(text_format))
    estimate = -(-text // CHARS_PER_TOKEN) + IMAGE_TYPICAL_TOKENS * images
    return PromptSize(bound, estimate)


def last_user_text(items: list[Any]) -> str:
    """The text of the last user message (what `last_user_message_matches` rules read)."""
    for item in reversed(items):
        if not isinstance(item, dict) or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(
                part["text"]
                for part in content
                if isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES and isinstance(part.get("text"), str)
            )
        return ""
    return ""


def responses_usage(usage: Any) -> Usage | None:
    """A Responses usage object (`input_tokens`, `output_tokens`, `input_tokens_details`, and
    OpenRouter's `cost`) as the proxy's `Usage`. Cached and cache-write tokens are part of
    `input_tokens`, as `prompt_tokens_details`' are of chat's `prompt_tokens`."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}
    cost = usage.get("cost")
    return Usage(
        _count(usage.get("input_tokens")),
        _count(usage.get("output_tokens")),
        float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None,
        _count(details.get("cached_tokens")),
        _count(details.get("cache_write_tokens")),
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class ResponsesMeter:
    """Reads a Responses stream's events into the request's record as they pass: the response id
    (OpenRouter's generation id) from the first lifecycle event, the time to the first output
    event, the usage of the final response (`response.completed`, `.incomplete` or `.failed`), an
    `error` or `response.failed` event, and the UTF-8 bytes of every `*.delta` (text, refusals,
    reasoning, function-call arguments), which bill a stream cut before its usage came. Every
    event goes on to the client."""

    __slots__ = ("_record", "_started", "sequence")

    def __init__(self, record: RequestRecord, started: float) -> None:
        self._record = record
        self._started = started  # the monotonic time the request came in: TTFT counts from there
        self.sequence = -1  # the last event's sequence_number: the proxy's own error event follows it

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
        kind = event.get("type")
        sequence = event.get("sequence_number")
        if isinstance(sequence, int) and not isinstance(sequence, bool):
            self.sequence = sequence
        if not isinstance(kind, str):
            return event
        delta = event.get("delta")
        if isinstance(delta, str) and kind.endswith(".delta"):
            record.streamed_text_bytes += len(delta) if delta.isascii() else len(delta.encode())
        response = event.get("response")
        if isinstance(response, dict):
            if record.generation_id is None:
                record.note_origin(response)
            usage = response.get("usage")
            if usage is not None:
                parsed = responses_usage(usage)
                if parsed is not None:
                    record.usage = parsed
        if kind in FAILED_EVENTS:
            record.error = "upstream_stream_error"
        elif record.ttft_s is None and kind not in OPENING_EVENTS:
            record.ttft_s = now - self._started
        return event
