"""The emulator's legacy text completions: POST /completions, streamed or not.

Under `/api/v1`, OpenRouter's shape: `provider`, `native_finish_reason` and `usage.cost`, `: OPENROUTER
PROCESSING` comments while the model thinks, a usage chunk with `"choices": []` at the end of every
stream, and a mid-stream error as a chunk with a top-level `error` and `finish_reason: "error"`.
Under `/v1`, OpenAI's: none of those; the usage chunk only with `stream_options.include_usage`
(the other chunks have no `usage`: unlike chat's, the spec's is an object, never null), and a
mid-stream error as `{"error": {...}}` alone.

Replies come from the chat emulator's planner (the prompt read as one user message); the prompt
is counted as the chat emulator counts messages: a token per four bytes of its JSON (and of a
`suffix`'s), which is also what the proxy estimates a cut stream's prompt at.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, ClassVar

import orjson
from aiohttp import web

from .billing import Charge, text_tokens
from .completions import ModelInfo, Reply, plan_reply, split_words, usage_for
from .faults import Fault, rate_limit_headers
from .frames import Frames, openai_usage
from .replies import accept, error_response, fault_response, text_model
from .state import EmulatorState
from .streaming import SSE_HEADERS, StreamTally, break_stream, keep_alive


def add_completion_routes(router: web.UrlDispatcher, prefix: str) -> None:
    router.add_post(f"{prefix}/completions", completions)


async def completions(request: web.Request) -> web.StreamResponse:
    accepted = await accept(request, _validate)
    if isinstance(accepted, web.Response):
        return accepted
    state, body, model = accepted
    fault = state.faults.take(model.id, body)
    reply = plan_text(body, model)
    if body.get("stream") is True and (fault is None or fault.streams_normally):
        return await _stream(request, state, body, model, reply, fault)
    if fault is not None and not fault.streams_normally:
        failed = await fault_response(request, state, fault, model)
        if failed is not None:
            return failed
    created = int(state.clock())
    gen_id = state.new_id(created)
    charge = Charge(reply.prompt_tokens, reply.completion_tokens)
    state.bill(gen_id, model, charge, streamed=False, finish_reason=reply.finish_reason)  # before any latency
    state.stats["completions"] += 1
    headers = {"X-Generation-Id": gen_id}
    if fault is not None and fault.rate_limit is not None:
        headers.update(rate_limit_headers(fault.rate_limit))
    answer = frames_for(request, model, gen_id, created, body).whole(reply, usage_for(charge, model))
    if fault is not None and fault.latency_s:
        await asyncio.sleep(fault.latency_s)
    return web.Response(body=answer, headers=headers, content_type="application/json")


def _validate(state: EmulatorState, body: dict[str, Any], model_id: str | None) -> ModelInfo | web.Response:
    model = text_model(state, model_id)
    if isinstance(model, web.Response):
        return model
    if body.get("prompt") is None:
        return error_response(400, "Input required: `prompt` must be a string or an array")
    return model


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " ".join(item for item in prompt if isinstance(item, str))
    return ""


def plan_text(body: dict[str, Any], model: ModelInfo) -> Reply:
    """The chat planner's answer to the prompt as a user message, with the prompt counted as a prompt."""
    chat = {
        "messages": [{"role": "user", "content": prompt_text(body["prompt"])}],
        "max_tokens": body.get("max_tokens"),
    }
    reply = plan_reply(chat, model, "")
    size = len(orjson.dumps(body["prompt"]))
    if isinstance(body.get("suffix"), str):
        size += len(orjson.dumps(body["suffix"]))
    return dataclasses.replace(reply, prompt_tokens=text_tokens(size))


async def _stream(
    request: web.Request,
    state: EmulatorState,
    body: dict[str, Any],
    model: ModelInfo,
    reply: Reply,
    fault: Fault | None,
) -> web.StreamResponse:
    """As the chat emulator streams (latency, slow chunks, cuts, errors, hang-ups billed for what was sent)."""
    created = int(state.clock())
    gen_id = state.new_id(created)
    charge = Charge(reply.prompt_tokens, reply.completion_tokens)
    frames = frames_for(request, model, gen_id, created, body)
    headers = {**SSE_HEADERS, "X-Generation-Id": gen_id}
    if fault is not None and fault.rate_limit is not None:
        headers.update(rate_limit_headers(fault.rate_limit))
    response = web.StreamResponse(status=200, headers=headers)
    broken = fault if fault is not None and (fault.midstream_error or fault.drop_midstream) else None
    script = frames.script(reply, usage_for(charge, model), cut=None if broken is None else broken.after_chunks)
    delay = fault.chunk_delay_s if fault is not None else 0.0
    with StreamTally(state, gen_id, model, charge, frames.pieces(reply)) as tally:
        await response.prepare(request)
        if frames.comment is not None:
            await response.write(frames.comment)
        if fault is not None and fault.latency_s:
            await keep_alive(response, fault.latency_s, frames.comment)
        for index, frame in enumerate(script):
            if delay and index:  # a slow model: a pause before every chunk after the first
                await asyncio.sleep(delay)
            await response.write(frame)
            tally.sent += 1
        if broken is not None:
            tally.cut()
            return await break_stream(request, state, response, broken, frames.error)
        await response.write_eof()
        tally.completed(reply.finish_reason)
    return response


class LegacyFrames(Frames):
    """The `text_completion` objects of one reply, in OpenAI's shape: every stream chunk has the
    shape of the whole answer, text in `choices[].text` (see the module docstring)."""

    __slots__ = ("_head", "_include_usage", "_model", "_object")

    comment: ClassVar[bytes | None] = None  # OpenAI sends nothing while the model thinks
    openrouter: ClassVar[bool] = False

    def __init__(self, model: ModelInfo, gen_id: str, created: int, *, include_usage: bool = False) -> None:
        self._model = model
        self._include_usage = include_usage or self.openrouter  # OpenRouter always sends the usage chunk
        head: dict[str, Any] = {"id": gen_id, "object": "text_completion", "created": created, "model": model.id}
        if self.openrouter:
            head["provider"] = model.provider
        head["system_fingerprint"] = model.fingerprint
        self._object = head
        self._head = b"data: " + orjson.dumps(head)[:-1]

    def _choice(self, text: str, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        if self.openrouter:
            choice["native_finish_reason"] = None if finish is None else self._model.native_finish(finish)
        return choice

    def _frame(self, choices: list[dict[str, Any]], *, usage: dict[str, Any] | None = None) -> bytes:
        tail = b',"choices":' + orjson.dumps(choices)
        if usage is not None:  # only the last chunk: the spec's `usage` is an object, never null
            tail += b',"usage":' + orjson.dumps(usage)
        return self._head + tail + b"}\n\n"

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return usage if self.openrouter else openai_usage(usage)  # OpenAI's has no cost

    def whole(self, reply: Reply, usage: dict[str, Any]) -> bytes:
        """The non-streamed answer."""
        choices = [self._choice(reply.content, reply.finish_reason)]
        return orjson.dumps({**self._object, "choices": choices, "usage": self._usage(usage)})

    def opening(self, reply: Reply) -> bytes:
        return b""  # a text completion has no role chunk: it opens with its first text

    def body(self, reply: Reply) -> list[bytes]:
        return [self._frame([self._choice(piece, None)]) for piece in split_words(reply.content)]

    def finish(self, finish_reason: str) -> bytes:
        return self._frame([self._choice("", finish_reason)])

    def usage(self, usage: dict[str, Any]) -> bytes | None:
        return self._frame([], usage=self._usage(usage)) if self._include_usage else None

    def error(self, code: int | str, message: str) -> bytes:
        error = {"message": message, "type": "server_error", "param": None, "code": code}
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


class OpenRouterLegacyFrames(LegacyFrames):
    """OpenRouter's shape: `provider` and `native_finish_reason`, keep-alive comments, a usage chunk
    with `cost` always, and a broken stream's error inside a chunk whose choice finished with "error"."""

    __slots__ = ()

    comment = b": OPENROUTER PROCESSING\n\n"
    openrouter = True

    def error(self, code: int | str, message: str) -> bytes:
        choices = orjson.dumps([self._choice("", "error")])
        failure = orjson.dumps({"code": code, "message": message})
        return self._head + b',"choices":' + choices + b',"error":' + failure + b"}\n\n"


def frames_for(request: web.Request, model: ModelInfo, gen_id: str, created: int, body: dict[str, Any]) -> LegacyFrames:
    """OpenRouter's shape under `/api/v1`, OpenAI's under `/v1` (usage as its `stream_options` ask)."""
    if not request.path.startswith("/v1/"):
        return OpenRouterLegacyFrames(model, gen_id, created)
    options = body.get("stream_options")
    wanted = isinstance(options, dict) and options.get("include_usage") is True
    return LegacyFrames(model, gen_id, created, include_usage=wanted)
