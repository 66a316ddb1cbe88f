"""The OpenRouter emulator as an aiohttp app: wiring, state and handlers.

Speaks OpenRouter's wire format (and, under `/v1`, stands in for a plain
OpenAI-compatible upstream: its streams take OpenAI's shape) with faults
injected from a `FaultPlan`.  Reply content comes from the pure `completions`
and `frames` modules; this module only does the HTTP and timing parts.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .billing import CACHE_MIN_TOKENS, Bill, Charge, cacheable_prefix, generation_data, message_prefixes, text_tokens
from .completions import (
    ModelInfo,
    Reply,
    completion_body,
    error_body,
    index_catalogue,
    is_embedding_model,
    key_data,
    plan_reply,
    usage_for,
)
from .faults import Fault, FaultPlan, fault_error, rate_limit_headers
from .frames import Frames, OpenAIStreamFrames, StreamFrames

PREFIXES = ("/api/v1", "/v1")
PROCESSING_INTERVAL_S = 0.1  # how often `: OPENROUTER PROCESSING` is sent while "thinking"
MAX_RECORDED = 10_000  # recorded requests kept, so a long benchmark cannot exhaust memory
_ALPHANUMERIC = string.ascii_letters + string.digits
_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(slots=True)
class RecordedRequest:
    path: str
    headers: CIMultiDict[str]  # as received (case-insensitive); redacted only when served over HTTP
    body: dict[str, Any]
    model: str | None


def _fresh_stats() -> dict[str, Any]:
    return {
        "requests": 0,
        "completions": 0,
        "errors": 0,
        "drops": 0,
        "streams_started": 0,
        "streams_completed": 0,
        "streams_cancelled": 0,
        "streams_failed": 0,
        "per_model": {},
    }


@dataclass(slots=True)
class EmulatorState:
    """Everything one emulator instance knows; tests read and poke it directly.

    faults: armed faults; requests: recorded chat requests (oldest trimmed past
    MAX_RECORDED); stats: counters; key_usage: USD billed to the key so far;
    credit_limit: the key's limit reported by /key (None = unlimited).
    """

    catalogue: dict[str, Any]
    models: dict[str, ModelInfo]
    api_key: str | None
    clock: Callable[[], float]
    faults: FaultPlan = field(default_factory=FaultPlan)
    requests: list[RecordedRequest] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=_fresh_stats)
    key_usage: float = 0.0
    credit_limit: float | None = 100.0
    rng: random.Random = field(default_factory=random.Random)
    bills: dict[str, Bill] = field(default_factory=dict)  # generation id -> what it was billed
    prompt_cache: set[tuple[str, str]] = field(default_factory=set)  # (model, cached system message)
    generation_lag: int = 0  # lookups of a generation answered 404 before it is found (OpenRouter's delay)
    generation_lookups: dict[str, int] = field(default_factory=dict)

    def new_id(self, created: int) -> str:
        return f"gen-{created}-{''.join(self.rng.choices(_ALPHANUMERIC, k=20))}"

    def charge(self, body: dict[str, Any], model: ModelInfo, reply: Reply) -> Charge:
        """What a whole answer to `body` is charged, reading or writing the prompt cache."""
        if model.provider == "Anthropic" and isinstance(body.get("cache_control"), dict):
            return self._auto_cached(body["messages"], model, reply)
        cached = written = 0
        prefix = cacheable_prefix(body["messages"])
        if prefix is not None:
            key = (model.id, prefix[0])
            if key in self.prompt_cache:
                cached = min(prefix[1], reply.prompt_tokens)
            else:
                self.prompt_cache.add(key)
                written = min(prefix[1], reply.prompt_tokens) if model.cache_write_price is not None else 0
        return Charge(reply.prompt_tokens, reply.completion_tokens, cached, written)

    def _auto_cached(self, messages: list[Any], model: ModelInfo, reply: Reply) -> Charge:
        """Automatic caching (a top-level `cache_control`): the longest whole-message prefix cached
        before is read, and the whole prompt is written for the next turn."""
        cached = 0
        prefixes = message_prefixes(messages)
        for text, tokens in prefixes:
            if (model.id, text) in self.prompt_cache:
                cached = min(tokens, reply.prompt_tokens)
                break
        text, tokens = prefixes[0]
        written = 0
        if (model.id, text) not in self.prompt_cache and tokens >= CACHE_MIN_TOKENS:
            self.prompt_cache.add((model.id, text))
            written = max(0, min(tokens, reply.prompt_tokens) - cached) if model.cache_write_price is not None else 0
        return Charge(reply.prompt_tokens, reply.completion_tokens, cached, written)

    def bill(
        self,
        gen_id: str,
        model: ModelInfo,
        charge: Charge,
        *,
        streamed: bool,
        cancelled: bool = False,
        finish_reason: str | None = None,
    ) -> Bill:
        """Record what one generation costs; the key's usage grows by as much."""
        cost = charge.cost(model.prices)[0]
        bill = Bill(
            gen_id,
            model.id,
            model.provider,
            self.clock(),
            streamed,
            charge.prompt_tokens,
            charge.completion_tokens,
            charge.cached_tokens,
            charge.cache_write_tokens,
            cost,
            cancelled,
            finish_reason,
        )
        self.bills[gen_id] = bill
        self.key_usage += cost
        return bill

    def record(self, request: web.Request, body: dict[str, Any], model: str | None) -> None:
        if len(self.requests) >= MAX_RECORDED:
            del self.requests[: MAX_RECORDED // 2]
        self.requests.append(RecordedRequest(request.path, CIMultiDict(request.headers), body, model))


EMULATOR_STATE = web.AppKey("emulator_state", EmulatorState)


def load_default_catalogue() -> dict[str, Any]:
    """The packaged `/api/v1/models` snapshot."""
    return orjson.loads((resources.files("proxy") / "data" / "openrouter-models.json").read_bytes())


def create_emulator_app(
    *, catalogue: dict[str, Any] | None = None, api_key: str | None = None, clock: Callable[[], float] = time.time
) -> web.Application:
    """An emulator app; its state is `app[EMULATOR_STATE]`."""
    catalogue = catalogue if catalogue is not None else load_default_catalogue()
    app = web.Application()
    app[EMULATOR_STATE] = EmulatorState(catalogue, index_catalogue(catalogue), api_key, clock)
    # Here, not at the top: these modules build on this one's helpers.
    from .batches import add_batch_routes
    from .embeddings import add_embedding_routes
    from .legacy import add_completion_routes
    from .messages import register as register_messages
    from .responses import create_response

    for prefix in PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/responses", create_response)
        app.router.add_get(f"{prefix}/models", list_models)
        app.router.add_get(f"{prefix}/key", key_info)
        app.router.add_get(f"{prefix}/generation", generation)
        add_embedding_routes(app.router, prefix)
        add_completion_routes(app.router, prefix)
    register_messages(app)  # POST /api/v1/messages
    add_batch_routes(app)  # OpenRouter's Batch API
    app.router.add_routes(
        [
            web.get("/_emulator/faults", get_faults),
            web.post("/_emulator/faults", post_fault),
            web.delete("/_emulator/faults", delete_faults),
            web.get("/_emulator/stats", get_stats),
            web.get("/_emulator/requests", get_requests),
            web.delete("/_emulator/requests", delete_requests),
        ]
    )
    return app


# ---------------------------------------------------------------- responses


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type=_JSON)


def _error(status: int, message: str) -> web.Response:
    return web.Response(body=error_body(status, message), status=status, content_type=_JSON)


def _authorized(state: EmulatorState, request: web.Request) -> web.Response | None:
    """None when the bearer key is acceptable, else OpenRouter's 401."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or not header[7:].strip():
        return _error(401, "No auth credentials found")
    if state.api_key is not None and header[7:].strip() != state.api_key:
        return _error(401, "User not found.")
    return None


def _drop_connection(request: web.Request) -> web.Response:
    """Close the socket; aiohttp then fails to send the returned response and gives up quietly."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)


# ---------------------------------------------------------------- chat completions


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[EMULATOR_STATE]
    stats = state.stats
    stats["requests"] += 1
    denied = _authorized(state, request)
    if denied is not None:
        stats["errors"] += 1
        return denied
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        stats["errors"] += 1
        return _error(400, "Invalid JSON in request body")
    if not isinstance(body, dict):
        stats["errors"] += 1
        return _error(400, "Request body must be a JSON object")
    model_id = body.get("model")
    if not isinstance(model_id, str):
        model_id = None
    state.record(request, body, model_id)
    if model_id is not None:
        per_model = stats["per_model"]
        per_model[model_id] = per_model.get(model_id, 0) + 1
    model = _validate(state, body, model_id)
    if isinstance(model, web.Response):
        stats["errors"] += 1
        return model
    fault = state.faults.take(model.id, body)
    if body.get("stream") is True and (fault is None or fault.streams_normally):
        return await _stream(request, state, body, model, fault)
    if fault is not None and not fault.streams_normally:
        failed = await _failure(request, state, fault, model)
        if failed is not None:
            return failed
    # The model answers whether or not the client waits for it: billed now, before any latency,
    # so a client that hangs up meanwhile is billed all the same (as OpenRouter bills it).
    answer = _complete(state, body, model, fault)
    if fault is not None and fault.latency_s:
        await asyncio.sleep(fault.latency_s)
    return answer


async def _failure(request: web.Request, state: EmulatorState, fault: Fault, model: ModelInfo) -> web.Response | None:
    """The response standing in for a non-streamed reply under `fault`, or None to answer normally."""
    if fault.latency_s:
        await asyncio.sleep(fault.latency_s)
    if fault.drop:
        state.stats["drops"] += 1
        return _drop_connection(request)
    if fault.status is None:
        return None
    state.stats["errors"] += 1
    status, headers, payload = fault_error(fault, model.provider, int(state.clock() * 1000))
    return web.Response(body=payload, status=status, headers=headers, content_type=_JSON)


async def _accept(
    request: web.Request,
    validate: Callable[[EmulatorState, dict[str, Any], str | None], ModelInfo | web.Response],
) -> tuple[EmulatorState, dict[str, Any], ModelInfo] | web.Response:
    """What the embeddings and legacy completions endpoints do first: count the request, check its
    key, read a JSON object, record it, validate it with the endpoint's own rules and count it per
    model; else the error to answer (counted)."""
    state = request.app[EMULATOR_STATE]
    state.stats["requests"] += 1
    denied = _authorized(state, request)
    if denied is not None:
        state.stats["errors"] += 1
        return denied
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        state.stats["errors"] += 1
        return _error(400, "Request body must be a JSON object")
    model_id = body.get("model") if isinstance(body.get("model"), str) else None
    state.record(request, body, model_id)
    model = validate(state, body, model_id)
    if isinstance(model, web.Response):
        state.stats["errors"] += 1
        return model
    per_model = state.stats["per_model"]
    per_model[model.id] = per_model.get(model.id, 0) + 1
    return state, body, model


def _validate(state: EmulatorState, body: dict[str, Any], model_id: str | None) -> ModelInfo | web.Response:
    """The model asked for, or OpenRouter's 400."""
    if not model_id:
        return _error(400, "No model specified: set `model` to a model ID from /api/v1/models")
    model = state.models.get(model_id)
    if model is None:
        return _error(400, f"{model_id} is not a valid model ID")
    if model.embeddings:
        return _error(400, f"{model_id} is an embeddings model: send it to /embeddings")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _error(400, "Input required: `messages` must be a non-empty array")
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
    return web.Response(body=completion_body(reply, model, gen_id, created, usage), headers=headers, content_type=_JSON)


async def _stream(
    request: web.Request, state: EmulatorState, body: dict[str, Any], model: ModelInfo, fault: Fault | None
) -> web.StreamResponse:
    """Stream the reply as OpenRouter does (as OpenAI does under `/v1`), honouring latency and
    mid-stream faults. The key is billed for a stream that ran to its end, usage chunk or not."""
    stats = state.stats
    created = int(state.clock())
    gen_id = state.new_id(created)
    reply = plan_reply(body, model, "call_" + gen_id[-20:])
    charge = state.charge(body, model, reply)
    usage = usage_for(charge, model)
    frames = _frames_for(request, body, model, gen_id, created)
    headers = {**_SSE_HEADERS, "X-Generation-Id": gen_id}
    if fault is not None and fault.rate_limit is not None:
        headers.update(rate_limit_headers(fault.rate_limit))
    response = web.StreamResponse(status=200, headers=headers)
    broken = fault if fault is not None and (fault.midstream_error or fault.drop_midstream) else None
    content = frames.script(reply, usage, cut=None if broken is None else broken.after_chunks)
    delay = fault.chunk_delay_s if fault is not None else 0.0
    stats["streams_started"] += 1
    pieces = frames.pieces(reply)
    sent = 0  # content frames written: what a stream cut short is billed for
    try:
        await response.prepare(request)
        if frames.comment is not None:
            await response.write(frames.comment)
        if fault is not None and fault.latency_s:
            await _keep_alive(response, fault.latency_s, frames.comment)
        await response.write(frames.opening(reply))
        for frame in content:
            if delay:  # a slow model: a pause before every chunk after the first
                await asyncio.sleep(delay)
            await response.write(frame)
            sent += 1
        if broken is not None:
            _bill_partly(state, gen_id, model, charge, pieces[:sent], cancelled=False)
            return await _break_stream(request, state, response, frames, broken)
        await response.write_eof()
    except ConnectionResetError:  # the client went away mid-stream
        stats["streams_cancelled"] += 1
        _bill_partly(state, gen_id, model, charge, pieces[:sent], cancelled=True)
        return response
    except asyncio.CancelledError:
        stats["streams_cancelled"] += 1
        _bill_partly(state, gen_id, model, charge, pieces[:sent], cancelled=True)
        raise
    state.bill(gen_id, model, charge, streamed=True, finish_reason=reply.finish_reason)
    stats["streams_completed"] += 1
    stats["completions"] += 1
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


def _bill_partly(
    state: EmulatorState, gen_id: str, model: ModelInfo, charge: Charge, sent: list[str], *, cancelled: bool
) -> None:
    """A stream cut short: its prompt (the model read it) and the text it had sent, no more."""
    if gen_id in state.bills:  # billed already (the stream had ended before the cut was noticed)
        return
    completion = text_tokens(sum(len(piece.encode()) for piece in sent))
    partial = Charge(charge.prompt_tokens, completion, charge.cached_tokens, charge.cache_write_tokens)
    state.bill(gen_id, model, partial, streamed=True, cancelled=cancelled, finish_reason=None if cancelled else "error")


async def _keep_alive(response: web.StreamResponse, latency_s: float, comment: bytes | None) -> None:
    """Wait `latency_s`, sending `comment` (if any) every PROCESSING_INTERVAL_S."""
    if comment is None:
        await asyncio.sleep(latency_s)
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + latency_s
    while (remaining := deadline - loop.time()) > 0:
        await asyncio.sleep(min(PROCESSING_INTERVAL_S, remaining))
        if deadline - loop.time() > 0:
            await response.write(comment)


async def _break_stream(
    request: web.Request, state: EmulatorState, response: web.StreamResponse, frames: Frames, fault: Fault
) -> web.StreamResponse:
    state.stats["streams_failed"] += 1
    if fault.drop_midstream:
        _drop_connection(request)
        return response
    message = fault.message or "Provider disconnected unexpectedly"
    await response.write(frames.error(fault.code if fault.code is not None else "server_error", message))
    # Both end the stream right after the error event: no usage chunk, no [DONE].
    await response.write_eof()
    return response


# ---------------------------------------------------------------- catalogue and key


async def list_models(request: web.Request) -> web.Response:
    """Like OpenRouter's, text models unless `output_modalities` asks for others (`embeddings`, `all`)."""
    wanted = request.query.get("output_modalities", "text")
    data = request.app[EMULATOR_STATE].catalogue.get("data", [])
    if wanted != "all":
        data = [entry for entry in data if is_embedding_model(entry) == ("embeddings" in wanted.split(","))]
    return _json({"data": data})


async def key_info(request: web.Request) -> web.Response:
    state = request.app[EMULATOR_STATE]
    denied = _authorized(state, request)
    if denied is not None:
        return denied
    return _json({"data": key_data(state.key_usage, state.credit_limit)})


async def generation(request: web.Request) -> web.Response:
    """OpenRouter's GET /generation?id=: what one generation was billed. Like OpenRouter, it says
    404 for a while after the generation (`generation_lag` lookups), then the figures."""
    state = request.app[EMULATOR_STATE]
    denied = _authorized(state, request)
    if denied is not None:
        return denied
    gen_id = request.query.get("id", "")
    seen = state.generation_lookups[gen_id] = state.generation_lookups.get(gen_id, 0) + 1
    bill = state.bills.get(gen_id)
    if bill is None or seen <= state.generation_lag:
        return _error(404, f"Generation {gen_id} not found")
    return _json({"data": generation_data(bill)})


# ---------------------------------------------------------------- control endpoints


async def get_faults(request: web.Request) -> web.Response:
    return _json({"faults": request.app[EMULATOR_STATE].faults.snapshot()})


async def post_fault(request: web.Request) -> web.Response:
    state = request.app[EMULATOR_STATE]
    try:
        fields = orjson.loads(await request.read())
        model = fields.pop("model")
        if not isinstance(model, str):
            raise ValueError('`model` must be a string (a model ID or "*")')
        fault = Fault.from_mapping(fields)
    except (orjson.JSONDecodeError, AttributeError, KeyError, ValueError) as exc:
        return _error(400, f'Bad fault: {exc}. Send {{"model": ..., <Fault fields>}}')
    state.faults.set(model, fault)
    return _json({"faults": state.faults.snapshot()})


async def delete_faults(request: web.Request) -> web.Response:
    state = request.app[EMULATOR_STATE]
    state.faults.clear(request.query.get("model"))
    return _json({"faults": state.faults.snapshot()})


def _redacted(headers: CIMultiDict[str]) -> dict[str, str]:
    return {str(k): ("Bearer [REDACTED]" if k.lower() == "authorization" else v) for k, v in headers.items()}


async def get_requests(request: web.Request) -> web.Response:
    recorded = request.app[EMULATOR_STATE].requests
    return _json(
        {
            "data": [
                {"path": r.path, "model": r.model, "headers": _redacted(r.headers), "body": r.body} for r in recorded
            ]
        }
    )


async def delete_requests(request: web.Request) -> web.Response:
    request.app[EMULATOR_STATE].requests.clear()
    return _json({"data": []})


async def get_stats(request: web.Request) -> web.Response:
    state = request.app[EMULATOR_STATE]
    return _json({**state.stats, "key_usage": state.key_usage})
