"""Pure: OpenRouter's Anthropic Messages wire shape (`POST /api/v1/messages`) for the emulator.

What the emulator's Messages answers look like, as taken off OpenRouter's wire (captures of
2026-09): the message `id` is the generation id (`gen-...`) and the message names its `provider`;
usage follows Anthropic's convention (`input_tokens` excludes the cached input, reported as
`cache_read_input_tokens` and `cache_creation_input_tokens`) and carries OpenRouter's `cost`.
A stream is Anthropic's typed events, each with its `event:` line, after a `: OPENROUTER
PROCESSING` comment: `message_start` (whose usage holds the input only for Anthropic's own
models, zeros and nulls for the others), `content_block_start`, a `ping`, the deltas,
`content_block_stop`, `message_delta` with the whole usage and the cost, `message_stop`, then
OpenRouter's own `event: data` / `data: [DONE]`, which Anthropic never sends. Errors are
Anthropic's envelope with OpenRouter's `error_type` beside the type, mid-stream too.

The reply itself (its text, tool call and counts) is planned by `completions.plan_reply` from a
chat view of the request; the prompt is counted here, from the Messages body as sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import orjson

from .billing import IMAGE_TOKENS, Charge, text_tokens
from .completions import ARGUMENT_FRAGMENTS, ModelInfo, Reply, plan_reply, split_even, split_words

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# Anthropic's error type and OpenRouter's `error_type` by HTTP status (OpenRouter's errors page).
ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "authentication"),
    402: ("billing_error", "payment_required"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "not_found"),
    408: ("timeout_error", "timeout"),
    413: ("request_too_large", "payload_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    502: ("api_error", "provider_unavailable"),
    503: ("overloaded_error", "provider_overloaded"),
    504: ("timeout_error", "timeout"),
}
_IMAGE_TYPES = ("image",)
COMMENT = b": OPENROUTER PROCESSING\n\n"
DONE = b"event: data\ndata: [DONE]\n\n"
NO_CONTEXT = {"context_management": None}  # OpenRouter's message_delta has it, null


def error_body(status: int, message: str, request_id: str | None = None) -> bytes:
    return orjson.dumps({**error_event(status, message), "request_id": request_id})


def error_event(status: int | str, message: str) -> dict[str, Any]:
    kind, error_type = ERROR_TYPES.get(status, ("api_error", "server")) if isinstance(status, int) else ERROR_TYPES[502]
    return {"type": "error", "error": {"type": kind, "message": message, "error_type": error_type}}


def event(name: str, payload: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


# ---------------------------------------------------------------- the request


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """The emulator's count of a Messages prompt: a token per four bytes of the system prompt,
    messages and tools as JSON, image blocks (tool results' included) at `IMAGE_TOKENS` each."""
    messages = body["messages"]
    images = 0
    kept: list[Any] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            found, content = _without_images(content)
            if found:
                images += found
                message = {**message, "content": content}
        kept.append(message)
    size = len(orjson.dumps(kept))
    for field in ("system", "tools"):
        if body.get(field):
            size += len(orjson.dumps(body[field]))
    return text_tokens(size) + IMAGE_TOKENS * images


def _without_images(blocks: list[Any]) -> tuple[int, list[Any]]:
    images, kept = 0, []
    for block in blocks:
        if isinstance(block, dict) and block.get("type") in _IMAGE_TYPES:
            images += 1
            continue
        if isinstance(block, dict) and block.get("type") == "tool_result" and isinstance(block.get("content"), list):
            found, inner = _without_images(block["content"])
            images += found
            block = {**block, "content": inner}
        kept.append(block)
    return images, kept


def chat_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request as a chat body, for `plan_reply` and the prompt cache: the system prompt as
    the first message, a user turn of tool results as a `tool` message, tools as functions."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system)})
    for message in body["messages"]:
        content = message.get("content")
        results = _tool_results(content)
        if message.get("role") == "user" and results is not None:
            messages.append({"role": "tool", "content": results})
        else:
            messages.append({"role": message.get("role"), "content": content})
    view: dict[str, Any] = {"messages": messages, "max_tokens": body.get("max_tokens")}
    tools = [tool for tool in body.get("tools") or () if isinstance(tool, dict) and "name" in tool]
    if tools:
        view["tools"] = [
            {"type": "function", "function": {"name": t["name"], "parameters": t.get("input_schema")}} for t in tools
        ]
        view["tool_choice"] = _tool_choice(body.get("tool_choice"))
    config = body.get("output_config")
    found = config.get("format") if isinstance(config, dict) else body.get("output_format")
    if isinstance(found, dict) and found.get("type") == "json_schema":
        view["response_format"] = {"type": "json_schema"}
    return view


def _tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "none":
        return "none"
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return None  # auto, or not given


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _tool_results(content: Any) -> str | None:
    """The text of a user turn made of tool results (None when it is not one)."""
    if not isinstance(content, list) or not content:
        return None
    if not all(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
        return None
    return " ".join(_text(block.get("content")) for block in content)


def plan(body: Mapping[str, Any], model: ModelInfo, call_id: str) -> tuple[Reply, dict[str, Any]]:
    """The reply to a Messages body (its prompt counted from the body as sent), and the chat view."""
    view = chat_view(body)
    reply = plan_reply(view, model, call_id)
    return dataclasses.replace(reply, prompt_tokens=prompt_tokens(body)), view


# ---------------------------------------------------------------- the answer


def usage_of(charge: Charge, model: ModelInfo, *, start: bool = False) -> dict[str, Any]:
    """Anthropic's usage with OpenRouter's cost. `start`: as `message_start` has it (the input
    for Anthropic's own models, zeros and nulls for the others; no cost yet)."""
    written = charge.cache_write_tokens if model.cache_write_price is not None else None
    fresh = charge.prompt_tokens - charge.cached_tokens - charge.cache_write_tokens
    usage: dict[str, Any] = {
        "input_tokens": fresh,
        "output_tokens": charge.completion_tokens,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": charge.cached_tokens,
        "cache_creation": None
        if written is None
        else {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0},
        "inference_geo": None,
        "server_tool_use": None,
        "service_tier": "standard",
    }
    if start:
        if model.provider == "Anthropic":
            return {**usage, "output_tokens": 1}
        return {
            **usage,
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": None,
            "cache_read_input_tokens": None,
            "cache_creation": None,
            "service_tier": None,
        }
    cost, prompt_cost, completion_cost = charge.cost(model.prices)
    return {
        **usage,
        "cost": cost,
        "is_byok": False,
        "cost_details": {
            "upstream_inference_cost": cost,
            "upstream_inference_prompt_cost": prompt_cost,
            "upstream_inference_completions_cost": completion_cost,
        },
    }


def _head(gen_id: str) -> dict[str, Any]:
    return {"id": gen_id, "type": "message", "role": "assistant", "container": None}


def message_body(reply: Reply, model: ModelInfo, gen_id: str, usage: dict[str, Any]) -> bytes:
    """The serialised non-streamed `message`."""
    if reply.tool_call is None:
        content: list[dict[str, Any]] = [{"type": "text", "text": reply.content, "citations": None}]
    else:
        call = reply.tool_call
        content = [{"type": "tool_use", "id": call.id, "name": call.name, "input": orjson.loads(call.arguments)}]
    return orjson.dumps(
        {
            **_head(gen_id),
            "content": content,
            "model": model.id,
            "stop_reason": STOP_REASONS.get(reply.finish_reason, reply.finish_reason),
            "stop_details": None,
            "stop_sequence": None,
            "usage": usage,
            "provider": model.provider,
        }
    )


class MessagesFrames:
    """The events of one streamed reply. `opening` is everything before the first delta,
    `body` one `content_block_delta` per piece of generated text (what a stream cut after N
    frames has sent is `pieces[:N]`), `finish` the rest."""

    __slots__ = ("_gen_id", "_model")

    def __init__(self, model: ModelInfo, gen_id: str) -> None:
        self._model = model
        self._gen_id = gen_id

    def opening(self, reply: Reply, charge: Charge) -> bytes:
        message = {
            **_head(self._gen_id),
            "content": [],
            "model": self._model.id,
            "stop_reason": None,
            "stop_details": None,
            "stop_sequence": None,
            "usage": usage_of(charge, self._model, start=True),
            "provider": self._model.provider,
        }
        if reply.tool_call is None:
            block: dict[str, Any] = {"type": "text", "text": ""}
        else:
            block = {"type": "tool_use", "id": reply.tool_call.id, "name": reply.tool_call.name, "input": {}}
        return (
            event("message_start", {"type": "message_start", "message": message})
            + event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
            + event("ping", {"type": "ping"})
        )

    @staticmethod
    def pieces(reply: Reply) -> list[str]:
        if reply.tool_call is None:
            return split_words(reply.content)
        return split_even(reply.tool_call.arguments, ARGUMENT_FRAGMENTS)

    def body(self, reply: Reply) -> list[bytes]:
        kind, field = ("text_delta", "text") if reply.tool_call is None else ("input_json_delta", "partial_json")
        return [
            event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            for delta in ({"type": kind, field: piece} for piece in self.pieces(reply))
        ]

    def finish(self, reply: Reply, usage: dict[str, Any]) -> bytes:
        delta = {
            "container": None,
            "stop_details": None,
            "stop_reason": STOP_REASONS.get(reply.finish_reason, reply.finish_reason),
            "stop_sequence": None,
        }
        return (
            event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage, **NO_CONTEXT})
            + event("message_stop", {"type": "message_stop"})
            + DONE
        )

    @staticmethod
    def error(status: int | str, message: str) -> bytes:
        return event("error", error_event(status, message))
