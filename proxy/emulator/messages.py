"""The emulator's `POST /api/v1/messages`: OpenRouter's Anthropic Messages API, streamed or not,
with the same fault injection, prompt cache and billing as chat (`chat`), in Messages' wire shape
(`messages_wire`). Only under `/api/v1`: an OpenAI-style upstream has no Messages API.

Requests are recorded and counted in the stats like chat's; every generation is billed into
`EmulatorState.bills`, a stream cut short for its prompt and the text it had sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from .completions import ModelInfo
from .faults import DEFAULT_MESSAGES, Fault, rate_limit_headers
from .messages_wire import COMMENT, MessagesFrames, error_body, message_body, plan, usage_of
from .replies import drop_connection
from .state import EMULATOR_STATE, EmulatorState
from .streaming import SSE_HEADERS, StreamTally, keep_alive

ROUTE = "/api/v1/messages"
_JSON = "application/json"


def register(app: web.Application) -> None:
    app.router.add_post(ROUTE, create_message)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=error_body(status, message), status=status, headers=headers, content_type=_JSON)


async def create_message(request: web.Request) -> web.StreamResponse:
    state = request.app[EMULATOR_STATE]
    stats = state.stats
    stats["requests"] += 1
    found = await _read(request, state)
    if isinstance(found, web.Response):
        stats["errors"] += 1
        return found
    body, model = found
    fault = state.faults.take(model.id, body)
    if body.get("stream") is True and (fault is None or fault.streams_normally):
        return await _stream(request, state, body, model, fault)
    if fault is not None and not fault.streams_normally:
        failed = await _failure(request, state, fault)
        if failed is not None:
            return failed
    answer = _complete(state, body, model, fault)  # billed before any latency, as chat's is
    if fault is not None and fault.latency_s:
        await asyncio.sleep(fault.latency_s)
    return answer


async def _read(request: web.Request, state: EmulatorState) -> tuple[dict[str, Any], ModelInfo] | web.Response:
    """The body and its model, or the error OpenRouter's Messages API answers (Anthropic's shape)."""
    header = request.headers.get("Authorization", "")
    key = header[7:].strip() if header.startswith("Bearer ") else ""  # OpenRouter documents a bearer token only
    if not key:
        return _error(401, "No auth credentials found")
    if state.api_key is not None and key != state.api_key:
        return _error(401, "User not found.")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "Invalid JSON in request body")
    if not isinstance(body, dict):
        return _error(400, "Request body must be a JSON object")
    model_id = body.get("model") if isinstance(body.get("model"), str) else None
    state.record(request, body, model_id)
    if model_id is not None:
        state.stats["per_model"][model_id] = state.stats["per_model"].get(model_id, 0) + 1
    if not model_id:
        return _error(400, "model: Field required")
    model = state.models.get(model_id)
    if model is None:
        return _error(404, f"Model {model_id} not found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return _error(400, "messages: Input should be a non-empty list of messages")
    return body, model


async def _failure(request: web.Request, state: EmulatorState, fault: Fault) -> web.Response | None:
    if fault.latency_s:
        await asyncio.sleep(fault.latency_s)
    if fault.drop:
        state.stats["drops"] += 1
        return drop_connection(request)
    if fault.status is None:
        return None
    state.stats["errors"] += 1
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = f"{fault.retry_after:g}"
    if fault.rate_limit is not None:
        headers.update(rate_limit_headers(fault.rate_limit))
    message = fault.message or DEFAULT_MESSAGES.get(fault.status, "Internal Server Error")
    return _error(fault.status, message, headers)


def _complete(state: EmulatorState, body: dict[str, Any], model: ModelInfo, fault: Fault | None) -> web.Response:
    gen_id = state.new_id(int(state.clock()))
    reply, view = plan(body, model, "toolu_" + gen_id[-20:])
    charge = state.charge(view, model, reply)
    state.bill(gen_id, model, charge, streamed=False, finish_reason=reply.finish_reason)
    state.stats["completions"] += 1
    headers = {"X-Generation-Id": gen_id}
    if fault is not None and fault.rate_limit is not None:
        headers.update(rate_limit_headers(fault.rate_limit))
    payload = message_body(reply, model, gen_id, usage_of(charge, model))
    return web.Response(body=payload, headers=headers, content_type=_JSON)


async def _stream(
    request: web.Request, state: EmulatorState, body: dict[str, Any], model: ModelInfo, fault: Fault | None
) -> web.StreamResponse:
    """Stream the reply, honouring latency and mid-stream faults; billed whole once it ran to its end."""
    gen_id = state.new_id(int(state.clock()))
    reply, view = plan(body, model, "toolu_" + gen_id[-20:])
    charge = state.charge(view, model, reply)
    frames = MessagesFrames(model, gen_id)
    headers = {**SSE_HEADERS, "X-Generation-Id": gen_id}
    if fault is not None and fault.rate_limit is not None:
        headers.update(rate_limit_headers(fault.rate_limit))
    response = web.StreamResponse(status=200, headers=headers)
    broken = fault if fault is not None and (fault.midstream_error or fault.drop_midstream) else None
    content = frames.body(reply)
    if broken is not None:
        content = content[: broken.after_chunks]
    delay = fault.chunk_delay_s if fault is not None else 0.0
    with StreamTally(state, gen_id, model, charge, frames.pieces(reply)) as tally:
        await response.prepare(request)
        await response.write(COMMENT)
        if fault is not None and fault.latency_s:
            await keep_alive(response, fault.latency_s, COMMENT)
        await response.write(frames.opening(reply, charge))
        for frame in content:
            if delay:
                await asyncio.sleep(delay)
            await response.write(frame)
            tally.sent += 1
        if broken is not None:
            tally.cut()
            state.stats["streams_failed"] += 1
            if broken.drop_midstream:
                drop_connection(request)
                return response
            status = broken.code if broken.code is not None else 502
            await response.write(frames.error(status, broken.message or "Provider disconnected unexpectedly"))
            await response.write_eof()
            return response
        await response.write(frames.finish(reply, usage_of(charge, model)))
        await response.write_eof()
        tally.completed(reply.finish_reason)
    return response
