"""The SSE frames of a streamed reply, in the two wire shapes the emulator speaks.

`StreamFrames` is OpenRouter's (`/api/v1`): `: OPENROUTER PROCESSING` comments while the model
"thinks", `provider` and `native_finish_reason` in every chunk, `role` in every delta, usage in a
last chunk with no choices, and an error chunk with `finish_reason: "error"` when a stream breaks.

`OpenAIStreamFrames` is OpenAI's (`/v1`): no comments, no `provider`; `role` (with `content: ""`
and `refusal: null`) only in the first delta, later deltas carry their text alone, the finish delta
is `{}`; with `stream_options.include_usage` every chunk has `"usage": null` and a last `choices: []`
chunk has the usage (without it, no usage at all); every chunk has an `obfuscation` string unless
`stream_options.include_obfuscation` is false; a broken stream sends `{"error": {...}}` alone.

Pure: the caller writes the frames and does the timing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import orjson

from .completions import ARGUMENT_FRAGMENTS, ModelInfo, Reply, split_even, split_words

_PADDING = b"aZ3kQ9xLm2Rt7VbN"  # obfuscation strings are cut from this, so replies stay deterministic


class Frames(ABC):
    """What the emulator's stream handler writes: the opening chunk, then `script`."""

    __slots__ = ()

    comment: ClassVar[bytes | None]  # the keep-alive sent while the model "thinks", if any
    DONE = b"data: [DONE]\n\n"

    @abstractmethod
    def opening(self, reply: Reply) -> bytes:
        """The first chunk, with the role."""

    @abstractmethod
    def body(self, reply: Reply) -> list[bytes]:
        """The "content chunks" after the opening one."""

    @abstractmethod
    def finish(self, finish_reason: str) -> bytes: ...

    @abstractmethod
    def usage(self, usage: dict[str, Any]) -> bytes | None:
        """The usage chunk, or None when none is sent."""

    @abstractmethod
    def error(self, code: int | str, message: str) -> bytes:
        """The event a stream broken by the provider ends with."""

    def pieces(self, reply: Reply) -> list[str]:
        """The generated text each of `body`'s frames carries (content, or tool-call arguments)."""
        if reply.tool_call is None:
            return split_words(reply.content)
        return ["", *split_even(reply.tool_call.arguments, ARGUMENT_FRAGMENTS)]

    def script(self, reply: Reply, usage: dict[str, Any], cut: int | None = None) -> list[bytes]:
        """Frames after the opening chunk: content, finish, usage (if sent), [DONE]; or just `cut`
        content frames."""
        content = self.body(reply)
        if cut is not None:
            return content[:cut]
        last = self.usage(usage)
        return [*content, self.finish(reply.finish_reason), *([last] if last is not None else []), self.DONE]


class StreamFrames(Frames):
    """OpenRouter's frames of one streamed reply, sharing a pre-serialised header.

    Every chunk repeats id/object/created/model/provider, so that part is
    serialised once and each frame only encodes its own `choices` payload.
    """

    __slots__ = ("_head", "_model")

    comment = b": OPENROUTER PROCESSING\n\n"

    def __init__(self, model: ModelInfo, gen_id: str, created: int) -> None:
        self._model = model
        head = orjson.dumps(
            {
                "id": gen_id,
                "provider": model.provider,
                "model": model.id,
                "object": "chat.completion.chunk",
                "created": created,
                "system_fingerprint": model.fingerprint,
            }
        )
        self._head = b"data: " + head[:-1] + b',"choices":['

    def _choice(self, delta: dict[str, Any], finish: str | None, native: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "native_finish_reason": native, "logprobs": None}
        return self._head + orjson.dumps(choice)

    def delta(self, delta: dict[str, Any]) -> bytes:
        return self._choice(delta, None, None) + b"]}\n\n"

    def opening(self, reply: Reply) -> bytes:
        """The first chunk: the role, whatever the reply is."""
        return self.delta({"role": "assistant", "content": ""})

    def body(self, reply: Reply) -> list[bytes]:
        """The "content chunks" after the opening one; OpenRouter repeats the role in each."""
        if reply.tool_call is None:
            return [self.delta({"role": "assistant", "content": piece}) for piece in split_words(reply.content)]
        call = reply.tool_call
        opening = {"index": 0, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        frames = [self.delta({"role": "assistant", "content": None, "tool_calls": [opening]})]
        for fragment in split_even(call.arguments, ARGUMENT_FRAGMENTS):
            frames.append(
                self.delta({"role": "assistant", "tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
            )
        return frames

    def finish(self, finish_reason: str) -> bytes:
        native = self._model.native_finish(finish_reason)
        return self._choice({"role": "assistant", "content": ""}, finish_reason, native) + b"]}\n\n"

    def usage(self, usage: dict[str, Any]) -> bytes | None:
        """The usage chunk (no choices); OpenRouter always sends it, with `cost`."""
        return self._head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"

    def error(self, code: int | str, message: str) -> bytes:
        """OpenRouter's mid-stream error: a chunk with top-level `error` and finish_reason "error"."""
        choice = self._choice({"content": ""}, "error", "error")
        return choice + b'],"error":' + orjson.dumps({"code": code, "message": message}) + b"}\n\n"


class OpenAIStreamFrames(Frames):
    """OpenAI's frames of one streamed reply (see the module docstring for the shape)."""

    __slots__ = ("_head", "_include_usage", "_obfuscate")

    comment = None  # OpenAI sends nothing while the model thinks

    def __init__(
        self, model: ModelInfo, gen_id: str, created: int, *, include_usage: bool, obfuscate: bool = True
    ) -> None:
        head = orjson.dumps(
            {
                "id": gen_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model.id,
                "service_tier": "default",
                "system_fingerprint": model.fingerprint,
            }
        )
        self._head = b"data: " + head[:-1] + b',"choices":['
        self._include_usage = include_usage
        self._obfuscate = obfuscate

    def _frame(self, choices: bytes, usage: bytes) -> bytes:
        tail = b'],"usage":' + usage if self._include_usage else b"]"
        if self._obfuscate:  # pads the chunk so its size says less about the text in it
            tail += b',"obfuscation":"' + _PADDING[: 16 - len(choices) % 16] + b'"'
        return self._head + choices + tail + b"}\n\n"

    def delta(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._frame(orjson.dumps(choice), b"null")

    def opening(self, reply: Reply) -> bytes:
        """The only delta with the role; a tool call opens in it too."""
        if reply.tool_call is None:
            return self.delta({"role": "assistant", "content": "", "refusal": None})
        call = reply.tool_call
        opening = {"index": 0, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        return self.delta({"role": "assistant", "content": None, "tool_calls": [opening], "refusal": None})

    def body(self, reply: Reply) -> list[bytes]:
        """The deltas after the opening one: the text (or the arguments) alone."""
        if reply.tool_call is None:
            return [self.delta({"content": piece}) for piece in split_words(reply.content)]
        return [
            self.delta({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
            for fragment in split_even(reply.tool_call.arguments, ARGUMENT_FRAGMENTS)
        ]

    def pieces(self, reply: Reply) -> list[str]:
        if reply.tool_call is None:
            return split_words(reply.content)
        return split_even(reply.tool_call.arguments, ARGUMENT_FRAGMENTS)  # the call opens with the role

    def finish(self, finish_reason: str) -> bytes:
        return self.delta({}, finish_reason)

    def usage(self, usage: dict[str, Any]) -> bytes | None:
        """The last chunk, only when the request asked for it; OpenAI's usage has no `cost`."""
        if not self._include_usage:
            return None
        return self._frame(b"", orjson.dumps(openai_usage(usage)))

    def error(self, code: int | str, message: str) -> bytes:
        """OpenAI's mid-stream error: an event with `error` alone; the SDKs raise APIError on it."""
        error = {"message": message, "type": "server_error", "param": None, "code": code}
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


def openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage object with the counts of the emulator's (OpenRouter-shaped) one."""
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"], "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
