"""What the emulator's OpenAI-shaped endpoints (chat, Responses, embeddings, legacy completions,
batches) answer alike: JSON, OpenRouter's errors, the key check, the common opening of a request,
and a fault standing in for a non-streamed reply. The Messages API answers in Anthropic's shape
instead (`messages`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from .completions import ModelInfo, error_body
from .faults import Fault, fault_error
from .state import EMULATOR_STATE, EmulatorState

JSON = "application/json"


def json_response(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type=JSON)


def error_response(status: int, message: str) -> web.Response:
    return web.Response(body=error_body(status, message), status=status, content_type=JSON)


def unauthorized(state: EmulatorState, request: web.Request) -> web.Response | None:
    """None when the bearer key is acceptable, else OpenRouter's 401."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or not header[7:].strip():
        return error_response(401, "No auth credentials found")
    if state.api_key is not None and header[7:].strip() != state.api_key:
        return error_response(401, "User not found.")
    return None


def drop_connection(request: web.Request) -> web.Response:
    """Close the socket; aiohttp then fails to send the returned response and gives up quietly."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)


def text_model(state: EmulatorState, model_id: str | None) -> ModelInfo | web.Response:
    """The text model asked for (chat, legacy completions), or OpenRouter's 400."""
    if not model_id:
        return error_response(400, "No model specified: set `model` to a model ID from /api/v1/models")
    model = state.models.get(model_id)
    if model is None:
        return error_response(400, f"{model_id} is not a valid model ID")
    if model.embeddings:
        return error_response(400, f"{model_id} is an embeddings model: send it to /embeddings")
    return model


async def accept(
    request: web.Request,
    validate: Callable[[EmulatorState, dict[str, Any], str | None], ModelInfo | web.Response],
) -> tuple[EmulatorState, dict[str, Any], ModelInfo] | web.Response:
    """What the embeddings and legacy completions endpoints do first: count the request, check its
    key, read a JSON object, record it, validate it with the endpoint's own rules and count it per
    model; else the error to answer (counted)."""
    state = request.app[EMULATOR_STATE]
    state.stats["requests"] += 1
    denied = unauthorized(state, request)
    if denied is not None:
        state.stats["errors"] += 1
        return denied
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        state.stats["errors"] += 1
        return error_response(400, "Request body must be a JSON object")
    model_id = body.get("model") if isinstance(body.get("model"), str) else None
    state.record(request, body, model_id)
    model = validate(state, body, model_id)
    if isinstance(model, web.Response):
        state.stats["errors"] += 1
        return model
    per_model = state.stats["per_model"]
    per_model[model.id] = per_model.get(model.id, 0) + 1
    return state, body, model


async def fault_response(
    request: web.Request, state: EmulatorState, fault: Fault, model: ModelInfo
) -> web.Response | None:
    """The response standing in for a non-streamed reply under `fault`, or None to answer normally."""
    if fault.latency_s:
        await asyncio.sleep(fault.latency_s)
    if fault.drop:
        state.stats["drops"] += 1
        return drop_connection(request)
    if fault.status is None:
        return None
    state.stats["errors"] += 1
    status, headers, payload = fault_error(fault, model.provider, int(state.clock() * 1000))
    return web.Response(body=payload, status=status, headers=headers, content_type=JSON)
