"""Between a chat completion and its stream, both ways, for the response cache.

`replay_as_sse`: a cached answer (a non-streamed completion) in, the bytes of a stream out: a
first chunk with the role, the text and tool calls in a few pieces, a finish chunk, a usage
chunk, then `data: [DONE]`. Every chunk is a valid `chat.completion.chunk`.
`StreamAssembler`: the chunks of a streamed answer in, the completion to cache out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from proxy.cache.policy import CachedAnswer

_PIECES = 4  # a replayed text is split into at most this many chunks ...
_MIN_PIECE = 16  # ... of at least this many characters


def replay_as_sse(answer: CachedAnswer) -> bytes:
    """The SSE bytes of a stream carrying the stored answer, ending with `data: [DONE]`.

    Per choice: a role chunk, the message's other fields (e.g. OpenRouter's `reasoning`)
    in one chunk, refusal and content in a few chunks, each tool call as an opening delta
    (id, name) followed by its arguments in a few chunks, then a chunk with finish_reason
    (and logprobs, whole). Last a chunk with `usage` and no choices. Every chunk has the
    stored completion's id, created and model.
    """
    completion = answer.completion
    created = completion.get("created")
    head: dict[str, Any] = {
        "id": _str_or(completion.get("id"), "chatcmpl-cached"),
        "object": "chat.completion.chunk",
        "created": created if type(created) is int else int(answer.created_at),
        "model": _str_or(completion.get("model"), answer.model),
    }
    for name in ("provider", "system_fingerprint", "service_tier"):
        if isinstance(completion.get(name), str):
            head[name] = completion[name]

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

    events: list[bytes] = []
    for position, choice in enumerate(completion.get("choices") or ()):
        index = choice.get("index", position)

        def delta(fields: dict[str, Any], index: int = index) -> bytes:
            return event([{"index": index, "delta": fields, "finish_reason": None}])

        events.extend(delta(fields) for fields in _message_deltas(choice.get("message") or {}))
        finish: dict[str, Any] = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        for name in ("native_finish_reason", "logprobs"):
            if choice.get(name) is not None:
                finish[name] = choice[name]
        events.append(event([finish]))
    usage = completion.get("usage")
    if not isinstance(usage, dict):
        usage = {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        }
    events.append(event([], usage=usage))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


_STREAMED_PIECEWISE = frozenset({"role", "content", "refusal", "tool_calls", "function_call"})


def _message_deltas(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The deltas whose concatenation, as an SDK accumulates them, is `message`."""
    content = message.get("content")
    deltas: list[dict[str, Any]] = [
        # null, not "", when there is no text (a tool call), so the accumulated content is null too
        {"role": message.get("role") or "assistant", "content": "" if isinstance(content, str) else None},
    ]
    others = {name: value for name, value in message.items() if name not in _STREAMED_PIECEWISE and value is not None}
    if others:
        deltas.append(others)
    for name in ("refusal", "content"):
        text = message.get(name)
        if isinstance(text, str):
            deltas.extend({name: piece} for piece in _pieces(text))
    for position, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function")
        if not isinstance(function, dict):  # not a function call: no piecewise form to give it
            deltas.append({"tool_calls": [{**call, "index": position}]})
            continue
        opening = {
            "index": position,
            "id": call.get("id"),
            "type": call.get("type", "function"),
            "function": {"name": function.get("name"), "arguments": ""},
        }
        deltas.append({"tool_calls": [opening]})
        deltas.extend(
            {"tool_calls": [{"index": position, "function": {"arguments": piece}}]}
            for piece in _pieces(function.get("arguments") or "")
        )
    function_call = message.get("function_call")
    if isinstance(function_call, dict):  # the deprecated single-function form
        deltas.append({"function_call": {"name": function_call.get("name"), "arguments": ""}})
        deltas.extend(
            {"function_call": {"arguments": piece}} for piece in _pieces(function_call.get("arguments") or "")
        )
    return deltas


def _pieces(text: str) -> list[str]:
    """At most _PIECES slices of at least _MIN_PIECE characters whose concatenation is `text`."""
    size = max(_MIN_PIECE, -(-len(text) // _PIECES))
    return [text[start : start + size] for start in range(0, len(text), size)]


def _str_or(value: Any, default: str) -> str:
    return value if isinstance(value, str) and value else default


class StreamAssembler:
    """The other direction: rebuild a chat completion from the chunks of a stream, so a streamed
    answer can be cached too. Fed only for requests that use the cache (it parses every chunk)."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None
        self.failed = False

    def add(self, data: bytes) -> None:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.failed = True
            return
        self.add_chunk(chunk if isinstance(chunk, dict) else None)

    def add_chunk(self, chunk: dict[str, Any] | None) -> None:
        """One parsed chunk (None: an event that was not a JSON object, which spoils the answer)."""
        if chunk is None or chunk.get("error"):
            self.failed = True
            return
        if not self._head:
            self._head = {
                k: chunk[k] for k in ("id", "created", "model", "provider", "system_fingerprint") if k in chunk
            }
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for delta_choice in chunk.get("choices") or ():
            index = delta_choice.get("index", 0)
            choice = self._choices.setdefault(
                index, {"content": [], "refusal": [], "tool_calls": {}, "role": "assistant", "finish_reason": None}
            )
            delta = delta_choice.get("delta") or {}
            if delta.get("role"):
                choice["role"] = delta["role"]
            if delta.get("content"):
                choice["content"].append(delta["content"])
            if delta.get("refusal"):
                choice["refusal"].append(delta["refusal"])
            for call in delta.get("tool_calls") or ():
                slot = choice["tool_calls"].setdefault(
                    call.get("index", 0), {"id": None, "type": "function", "name": "", "arguments": []}
                )
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"].append(function.get("arguments") or "")
            if delta_choice.get("finish_reason"):
                choice["finish_reason"] = delta_choice["finish_reason"]

    def completion(self) -> dict[str, Any] | None:
        """The assembled `chat.completion`, or None when the stream was not a clean, finished answer."""
        if self.failed or not self._choices or any(c["finish_reason"] is None for c in self._choices.values()):
            return None
        choices = []
        for index, choice in sorted(self._choices.items()):
            message: dict[str, Any] = {
                "role": choice["role"],
                "content": "".join(choice["content"]) or None,
                "refusal": "".join(choice["refusal"]) or None,
            }
            if choice["tool_calls"]:
                message["tool_calls"] = [
                    {
                        "id": slot["id"],
                        "type": slot["type"],
                        "function": {"name": slot["name"], "arguments": "".join(slot["arguments"])},
                    }
                    for _, slot in sorted(choice["tool_calls"].items())
                ]
            choices.append(
                {"index": index, "message": message, "finish_reason": choice["finish_reason"], "logprobs": None}
            )
        completion = {**self._head, "object": "chat.completion", "choices": choices}
        if self._usage:
            completion["usage"] = self._usage
        return completion
