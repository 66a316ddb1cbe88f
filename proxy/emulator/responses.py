"""The emulator's `POST /responses` (OpenAI's Responses API, as OpenRouter serves it under
`/api/v1` and OpenAI under `/v1`): validation, faults, billing and streaming. What the replies
look like is `response_events`' (pure); this module does the HTTP and the timing, with the
chat handler's helpers, so faults, latency and partial bills behave as they do for chat."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any

import orjson
from aiohttp import web

from .completions import ModelInfo, Reply, plan_reply
from .faults import Fault, rate_limit_headers
from .replies import JSON, error_response, fault_response, unauthorized
from .response_events import ResponseEvents, Shape, chat_view, items_of, prompt_tokens, response_object, usage_object
from .state import EMULATOR_STATE, EmulatorState
from .streaming import SSE_HEADERS, StreamTally, break_stream, keep_alive


async def create_response(request: web.Request) -> web.StreamResponse:
    state = request.app[EMULATOR_STATE]
    stats = state.stats
    stats["requests"] += 1
    refused = unauthorized(state, request)
    if refused is None:
        body, refused = await _read(request)
    if refused is not None:
        stats["errors"] += 1
        return refused
    model_id = body.get("model") if isinstance(body.get("model"), str) else None
    state.record(request, body, model_id)
    if model_id is not None:
        stats["per_model"][model_id] = stats["per_model"].get(model_id, 0) + 1
    model = _validate(state, body, model_id)
    if isinstance(model, web.Response):
        stats["errors"] += 1
        return model
    chat = chat_view(body)
    fault = state.faults.take(model.id, chat)
    if body.get("stream") is True and (fault is None or fault.streams_normally):
        return await _stream(request, state, body, chat, model, fault)
    if fault is not None and not fault.streams_normally:
        failed = await fault_response(request, state, fault, model)
        if failed is not None:
            return failed
    answer = _complete(request, state, body, chat, model, fault)  # billed before any latency, as for chat
    if fault is not None and fault.latency_s:
        await asyncio.sleep(fault.latency_s)
    return answer


async def _read(request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return {}, error_response(400, "Invalid JSON in request body")
    if not isinstance(body, dict):
        return {}, error_response(400, "Request body must be a JSON object")
    return body, None


def _validate(state: EmulatorState, body: dict[str, Any], model_id: str | None) -> ModelInfo | web.Response:
    """The model asked for, or OpenRouter's 400."""
    if not model_id:
        return error_response(400, "No model specified: set `model` to a model ID from /api/v1/models")
    model = state.models.get(model_id)
    if model is None:
        return error_response(400, f"{model_id} is not a valid model ID")
    if not items_of(body):
        return error_response(400, "Input required: `input` must be a non-empty string or array of input items")
    return model


def _plan(
    request: web.Request, state: EmulatorState, body: dict[str, Any], chat: dict[str, Any], model: ModelInfo
) -> tuple[Shape, int, Reply]:
    """The reply's ids, time and plan, its prompt counted on the Responses wire format."""
    created = int(state.clock())
    gen_id = state.new_id(created)
    reply = plan_reply(chat, model, "call_" + gen_id[-20:])
    reply = dataclasses.replace(reply, prompt_tokens=prompt_tokens(body))
    openrouter = not request.path.startswith("/v1/")
    suffix = gen_id.removeprefix("gen-").replace("-", "")
    item = f"msg_{suffix}" if reply.tool_call is None else f"fc_{suffix}"
    shape = Shape(openrouter, gen_id if openrouter else f"resp_{suffix}", item)
    return shape, created, reply


def _complete(
    request: web.Request,
    state: EmulatorState,
    body: dict[str, Any],
    chat: dict[str, Any],
    model: ModelInfo,
    fault: Fault | None,
) -> web.Response:
    shape, created, reply = _plan(request, state, body, chat, model)
    charge = state.charge(chat, model, reply)
    usage = usage_object(charge, model, openrouter=shape.openrouter)
    state.bill(shape.response_id, model, charge, streamed=False, finish_reason=reply.finish_reason)
    state.stats["completions"] += 1
    headers = {"X-Generation-Id": shape.response_id}
    if fault is not None and fault.rate_limit is not None:
        headers.update(rate_limit_headers(fault.rate_limit))
    payload = response_object(body, model, shape, created, reply=reply, usage=usage)
    return web.Response(body=orjson.dumps(payload), headers=headers, content_type=JSON)


async def _stream(
    request: web.Request,
    state: EmulatorState,
    body: dict[str, Any],
    chat: dict[str, Any],
    model: ModelInfo,
    fault: Fault | None,
) -> web.StreamResponse:
    """Stream the reply's events, honouring latency and mid-stream faults. A stream that ran to
    its end is billed whole; one cut short, for its prompt and the text it had sent."""
    shape, created, reply = _plan(request, state, body, chat, model)
    charge = state.charge(chat, model, reply)
    events = ResponseEvents(body, model, shape, created, reply)
    headers = {**SSE_HEADERS, "X-Generation-Id": shape.response_id}
    if fault is not None and fault.rate_limit is not None:
        headers.update(rate_limit_headers(fault.rate_limit))
    response = web.StreamResponse(status=200, headers=headers)
    broken = fault if fault is not None and (fault.midstream_error or fault.drop_midstream) else None
    content = events.content()
    if broken is not None:
        content = content[: broken.after_chunks]
    delay = fault.chunk_delay_s if fault is not None else 0.0
    with StreamTally(state, shape.response_id, model, charge, events.pieces()) as tally:
        await response.prepare(request)
        if events.comment is not None:
            await response.write(events.comment)
        if fault is not None and fault.latency_s:
            await keep_alive(response, fault.latency_s, events.comment)
        await response.write(b"".join(events.opening()))
        for frame in content:
            if delay:  # a slow model: a pause before every content event
                await asyncio.sleep(delay)
            await response.write(frame)
            tally.sent += 1
        if broken is not None:
            tally.cut()
            return await break_stream(
                request, state, response, broken, functools.partial(events.error, sent=tally.sent)
            )
        for frame in events.closing(usage_object(charge, model, openrouter=shape.openrouter)):
            await response.write(frame)
        await response.write_eof()
        tally.completed(reply.finish_reason)
    return response
