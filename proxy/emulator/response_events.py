"""Pure construction of Responses API replies (`POST /responses`), in the two shapes the emulator
speaks.

OpenRouter's (`/api/v1`), as its streams were captured: the response id is the generation id
(`gen-…`, what `GET /generation` looks up), every event is a bare `data:` line (no `event:`
field), comments keep the connection alive while the model "thinks", the final response's usage
carries `cost`, `is_byok` and `cost_details`, and the stream ends with `data: [DONE]`.

OpenAI's (`/v1`): ids `resp_…`, an `event: <type>` line before each `data:`, no comments, no
cost, and nothing after the last event.

The request is planned as chat (`chat_view`), so the reply is the one `plan_reply` would give,
but its prompt is counted on the Responses wire format: a token per four bytes of `instructions`,
`input` (without its image parts, at `IMAGE_TOKENS` each) and `tools` as JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .billing import IMAGE_PART_TYPES, IMAGE_TOKENS, Charge, text_tokens
from .completions import ARGUMENT_FRAGMENTS, ModelInfo, Reply, split_even, split_words

DONE = b"data: [DONE]\n\n"
COMMENT = b": OPENROUTER PROCESSING\n\n"


# ---------------------------------------------------------------- the request


def items_of(body: Mapping[str, Any]) -> list[Any]:
    raw = body.get("input")
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    return raw if isinstance(raw, list) else []


def chat_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request as a chat completion request: what `plan_reply`, the prompt cache and the
    faults' prompt matching read."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "developer", "content": instructions})
    messages.extend(_as_message(item) for item in items_of(body))
    tools = [
        {"type": "function", "function": {k: v for k, v in tool.items() if k in ("name", "description", "parameters")}}
        for tool in body.get("tools") or ()
        if isinstance(tool, dict) and tool.get("type") == "function"
    ]
    view: dict[str, Any] = {"messages": messages, "tools": tools or None}
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        view["tool_choice"] = choice
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        view["response_format"] = {"type": fmt["type"]}
    if body.get("max_output_tokens") is not None:
        view["max_tokens"] = body["max_output_tokens"]
    return view


def _as_message(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        return {"role": "user", "content": ""}
    kind = item.get("type")
    if kind == "function_call_output":
        return {"role": "tool", "content": _chat_content(item.get("output"))}
    if kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": ""}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    role = item.get("role")
    return {"role": role if isinstance(role, str) else "assistant", "content": _chat_content(item.get("content"))}


def _chat_content(content: Any) -> Any:
    """Typed parts (`input_text`, `output_text`) as chat's `text` parts; a string as it is."""
    if not isinstance(content, list):
        return content if isinstance(content, str) else ""
    return [
        {"type": "text", "text": part.get("text", "")}
        if isinstance(part, dict) and part.get("type") in ("input_text", "output_text")
        else part
        for part in content
    ]


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """A Responses prompt's tokens: its instructions, input and tools as JSON (four bytes a token),
    an image part (in a message or a function call's output) at IMAGE_TOKENS, whatever its size."""
    raw = body.get("input")
    images = 0
    if isinstance(raw, list):
        kept = []
        for item in raw:
            field = "content" if isinstance(item, dict) and isinstance(item.get("content"), list) else "output"
            parts = item.get(field) if isinstance(item, dict) else None
            if isinstance(parts, list) and any(_is_image(part) for part in parts):
                images += sum(1 for part in parts if _is_image(part))
                item = {**item, field: [part for part in parts if not _is_image(part)]}
            kept.append(item)
        raw = kept
    size = len(orjson.dumps(raw))
    if body.get("instructions"):
        size += len(orjson.dumps(body["instructions"]))
    if body.get("tools"):
        size += len(orjson.dumps(body["tools"]))
    return text_tokens(size) + IMAGE_TOKENS * images


# ---------------------------------------------------------------- the reply


@dataclass(frozen=True, slots=True)
class Shape:
    """Which wire shape, and the ids of one reply."""

    openrouter: bool
    response_id: str
    item_id: str  # the output item's id (message or function call)

    def frame(self, event: dict[str, Any]) -> bytes:
        data = b"data: " + orjson.dumps(event) + b"\n\n"
        return data if self.openrouter else b"event: " + event["type"].encode() + b"\n" + data


def usage_object(charge: Charge, model: ModelInfo, *, openrouter: bool) -> dict[str, Any]:
    """The Responses usage object; OpenRouter's adds the cost, as its chat usage does."""
    usage: dict[str, Any] = {
        "input_tokens": charge.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": charge.cached_tokens,
            "cache_write_tokens": charge.cache_write_tokens,
        },
        "output_tokens": charge.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": charge.prompt_tokens + charge.completion_tokens,
    }
    if openrouter:
        cost, prompt_cost, completion_cost = charge.cost(model.prices)
        usage["cost"] = cost
        usage["is_byok"] = False
        usage["cost_details"] = {
            "upstream_inference_cost": cost,
            "upstream_inference_input_cost": prompt_cost,
            "upstream_inference_output_cost": completion_cost,
        }
    return usage


def output_item(reply: Reply, item_id: str, *, done: bool) -> dict[str, Any]:
    status = "completed" if done else "in_progress"
    if reply.tool_call is not None:
        call = reply.tool_call
        arguments = call.arguments if done else ""
        return {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "call_id": call.id,
            "name": call.name,
            "arguments": arguments,
        }
    content = [_text_part(reply.content)] if done else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(
    body: Mapping[str, Any],
    model: ModelInfo,
    shape: Shape,
    created: int,
    *,
    reply: Reply | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The response object: in progress (no `reply` yet) or finished, echoing the request's settings."""
    incomplete = reply is not None and reply.finish_reason == "length"
    status = "in_progress" if reply is None else "incomplete" if incomplete else "completed"
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    response: dict[str, Any] = {
        "id": shape.response_id,
        "object": "response",
        "created_at": created,
        "model": model.id,
        "status": status,
        "completed_at": created if status == "completed" else None,
        "output": [] if reply is None else [output_item(reply, shape.item_id, done=True)],
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "tools": [_echo_tool(tool) for tool in body.get("tools") or () if isinstance(tool, dict)],
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "max_output_tokens": _int_or_none(body.get("max_output_tokens")),
        "temperature": _number(body.get("temperature"), 1),
        "top_p": _number(body.get("top_p"), 1),
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "instructions": body.get("instructions") if isinstance(body.get("instructions"), str) else None,
        "text": {"format": fmt if isinstance(fmt, dict) else {"type": "text"}},
        "reasoning": None,
        "previous_response_id": None,
        "background": False,
        "truncation": "disabled",
        "service_tier": "default",
        "store": False if shape.openrouter else body.get("store") is not False,
        "usage": usage,
    }
    if shape.openrouter:  # OpenRouter's own additions, as captured
        response["presence_penalty"] = _number(body.get("presence_penalty"), 0)
        response["frequency_penalty"] = _number(body.get("frequency_penalty"), 0)
    return response


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as a response lists it: `strict` (default true) and `parameters` always set."""
    if tool.get("type") != "function":
        return tool
    return {**tool, "strict": tool.get("strict", True), "parameters": tool.get("parameters")}


def _number(value: Any, default: float) -> Any:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ResponseEvents:
    """The events of one streamed reply, numbered in order: the opening ones (created, in progress,
    the output item added, its content part added), the content ones (a delta each: text, or
    function-call arguments), and the closing ones (the done events, then `response.completed`, or
    `.incomplete` when the reply was cut by `max_output_tokens`)."""

    __slots__ = ("_body", "_created", "_model", "_reply", "shape")

    def __init__(self, body: Mapping[str, Any], model: ModelInfo, shape: Shape, created: int, reply: Reply) -> None:
        self._body, self._model, self.shape, self._created, self._reply = body, model, shape, created, reply

    @property
    def comment(self) -> bytes | None:
        return COMMENT if self.shape.openrouter else None

    def pieces(self) -> list[str]:
        """The generated text each content event carries."""
        call = self._reply.tool_call
        return split_words(self._reply.content) if call is None else split_even(call.arguments, ARGUMENT_FRAGMENTS)

    def _frames(self, events: list[dict[str, Any]], first: int) -> list[bytes]:
        # `type` leads each event, as OpenAI and OpenRouter write them.
        return [
            self.shape.frame({"type": event["type"], **event, "sequence_number": first + n})
            for n, event in enumerate(events)
        ]

    def _opening(self) -> list[dict[str, Any]]:
        pending = response_object(self._body, self._model, self.shape, self._created)
        item = output_item(self._reply, self.shape.item_id, done=False)
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": pending},
            {"type": "response.in_progress", "response": pending},
            {"type": "response.output_item.added", "output_index": 0, "item": item},
        ]
        if self._reply.tool_call is None:
            events.append({**self._where(), "type": "response.content_part.added", "part": _text_part("")})
        return events

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.shape.item_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[bytes]:
        return self._frames(self._opening(), 0)

    def content(self) -> list[bytes]:
        first = len(self._opening())
        if self._reply.tool_call is None:
            where = {**self._where(), "type": "response.output_text.delta", "logprobs": []}
        else:
            where = {"type": "response.function_call_arguments.delta", "item_id": self.shape.item_id, "output_index": 0}
        return self._frames([{**where, "delta": piece} for piece in self.pieces()], first)

    def closing(self, usage: dict[str, Any]) -> list[bytes]:
        reply = self._reply
        first = len(self._opening()) + len(self.pieces())
        if reply.tool_call is None:
            where = self._where()
            events = [
                {**where, "type": "response.output_text.done", "text": reply.content, "logprobs": []},
                {**where, "type": "response.content_part.done", "part": _text_part(reply.content)},
            ]
        else:
            call = reply.tool_call
            events = [
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": self.shape.item_id,
                    "output_index": 0,
                    "name": call.name,
                    "arguments": call.arguments,
                }
            ]
        done = output_item(reply, self.shape.item_id, done=True)
        events.append({"type": "response.output_item.done", "output_index": 0, "item": done})
        final = response_object(self._body, self._model, self.shape, self._created, reply=reply, usage=usage)
        events.append({"type": f"response.{final['status']}", "response": final})
        frames = self._frames(events, first)
        return [*frames, DONE] if self.shape.openrouter else frames

    def error(self, code: int | str, message: str, sent: int) -> bytes:
        """The `error` event a stream broken by the provider ends with, after `sent` content events."""
        event = {"type": "error", "code": str(code), "message": message, "param": None}
        return self._frames([event], len(self._opening()) + sent)[0]
