"""The emulator's chat completions (`POST /chat/completions`), streamed or not: OpenRouter's shape
under `/api/v1`, OpenAI's under `/v1`, with faults injected from the `FaultPlan`. Reply content
comes from the pure `completions` and `frames` modules; this module does the HTTP and the timing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from .completions import ModelInfo, completion_body, plan_reply, usage_for
from .faults import Fault, rate_limit_headers
from .frames import Frames, OpenAIStreamFrames, StreamFrames
from .replies import JSON, error_response, fault_response, text_model, unauthorized
from .state import EMULATOR_STATE, EmulatorState
from .streaming import SSE_HEADERS, StreamTally, break_stream, keep_alive


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[EMULATOR_STATE]
    stats = state.stats
    stats["requests"] += 1
    denied = unauthorized(state, request)
    if denied is not None:
        stats["errors"] += 1
        return denied
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        stats["errors"] += 1
        return error_response(400, "Invalid JSON in request body")
    if not isinstance(body, dict):
        stats["errors"] += 1
        return error_response(400, "Request body must be a JSON object")
    model_id = body.get("model")
    if not isinstance(model_id, str):
        model_id = None
    state.record(request, body, model_id)
    if model_id is not None:
        per_model = stats["per_model"]
        per_model[model_id] = per_model.get(model_id, 0) + 1
    model = validate_chat(state, body, model_id)
    if isinstance(model, web.Response):
        stats["errors"] += 1
        return model
    fault = state.faults.take(model.id, body)
    if body.get("stream") is True and (fault is None or fault.streams_normally):
        return await _stream(request, state, body, model, fault)
    if fault is not None and not fault.streams_normally:
        failed = await fault_response(request, state, fault, model)
        if failed is not None:
            return failed
    # The model answers whether or not the client waits for it: billed now, before any latency,
    # so a client that hangs up meanwhile is billed all the same (as OpenRouter bills it).
    answer = _complete(state, body, model, fault)
    if fault is not None and fault.latency_s:
        await asyncio.sleep(fault.latency_s)
    return answer


def validate_chat(state: EmulatorState, body: dict[str, Any], model_id: str | None) -> ModelInfo | web.Response:
    """The model asked for, or OpenRouter's 400."""
    model = text_model(state, model_id)
    if isinstance(model, web.Response):
        return model
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return error_response(400, "Input required: `messages` must be a non-empty array")
    return model


def _complete(state: EmulatorState, body: dict[str, Any], model: ModelInfo, fault: Fault | None) -> web.Response:
    created = int(state.clock())
    gen_id = state.new_id(created)
    reply = plan_reply(body, model, "call_" + gen_id[-20:])
    charge = state.charge(body, model, reply)
    usage = usage_for(charge, model)
    state.bill(gen_id, model, charge, streamed=False, finish_reason=reply.finish_reason)
    state.stats["completions"] += 1
    headers = {"X-Generation-Id": gen_id}
    if fault is not None and fault.rate_limit is not None:
        headers.update(rate_limit_headers(fault.rate_limit))
    return web.Response(body=completion_body(reply, model, gen_id, created, usage), headers=headers, content_type=JSON)


async def _stream(
    request: web.Request, state: EmulatorState, body: dict[str, Any], model: ModelInfo, fault: Fault | None
) -> web.StreamResponse:
    """Stream the reply as OpenRouter does (as OpenAI does under `/v1`), honouring latency and
    mid-stream faults. The key is billed for a stream that ran to its end, usage chunk or not."""
    created = int(state.clock())
    gen_id = state.new_id(created)
    reply = plan_reply(body, model, "call_" + gen_id[-20:])
    charge = state.charge(body, model, reply)
    usage = usage_for(charge, model)
    frames = _frames_for(request, body, model, gen_id, created)
    headers = {**SSE_HEADERS, "X-Generation-Id": gen_id}
    if fault is not None and fault.rate_limit is not None:
        headers.update(rate_limit_headers(fault.rate_limit))
    response = web.StreamResponse(status=200, headers=headers)
    broken = fault if fault is not None and (fault.midstream_error or fault.drop_midstream) else None
    content = frames.script(reply, usage, cut=None if broken is None else broken.after_chunks)
    delay = fault.chunk_delay_s if fault is not None else 0.0
    with StreamTally(state, gen_id, model, charge, frames.pieces(reply)) as tally:
        await response.prepare(request)
        if frames.comment is not None:
            await response.write(frames.comment)
        if fault is not None and fault.latency_s:
            await keep_alive(response, fault.latency_s, frames.comment)
        await response.write(frames.opening(reply))
        for frame in content:
            if delay:  # a slow model: a pause before every chunk after the first
                await asyncio.sleep(delay)
            await response.write(frame)
            tally.sent += 1
        if broken is not None:
            tally.cut()
            return await break_stream(request, state, response, broken, frames.error)
        await response.write_eof()
        tally.completed(reply.finish_reason)
    return response


def _frames_for(request: web.Request, body: dict[str, Any], model: ModelInfo, gen_id: str, created: int) -> Frames:
    """OpenRouter's stream shape under `/api/v1`, OpenAI's under `/v1` (as its `stream_options` ask)."""
    if not request.path.startswith("/v1/"):
        return StreamFrames(model, gen_id, created)
    options = body.get("stream_options")
    options = options if isinstance(options, dict) else {}
    return OpenAIStreamFrames(
        model,
        gen_id,
        created,
        include_usage=options.get("include_usage") is True,
        obfuscate=options.get("include_obfuscation") is not False,
    )
