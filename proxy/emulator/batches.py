"""OpenRouter's Batch API, emulated (`/api/v1/batches`), as its quickstart and API reference
describe it:

- `POST /batches` takes `endpoint`, `model` (one per batch; a request body may omit it or repeat
  it, never name another) and an inline `requests` array of `{custom_id, body}`, with `endpoint` and
  `model` before `requests` in the JSON (OpenRouter stream-parses it and answers 400 otherwise), and
  `completion_window` (only `24h`). It answers `202 Accepted` with the batch in `validating`.
- `GET /batches/{id}`: the batch with `request_counts` (`total`, `completed`, `failed`) and `usage`;
  a batch in a terminal status carries its `results` inline.
- `GET /batches/{id}/results?limit=&cursor=`: a page of results (`object: list`, `data`,
  `has_more`, `next_cursor`); each result is `{id, custom_id, response: {status_code, request_id,
  body}, error}` with exactly one of `response` and `error`.
- `GET /batches` lists them (`results` always null); `DELETE /batches/{id}` deletes a finished
  one (409 while it runs). There is no cancel endpoint.

Here a batch runs `batch_delay_s` after it was created (the first poll after that finds it
`completed`); each line is answered like a non-streamed chat completion and billed as one
generation at `batch_discount` of the price (its `usage.cost` says so), in `EmulatorState.bills`.
Models outside `batch_models` (when set) are refused with a 400, as OpenRouter refuses models
that do not batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .billing import Bill, Charge
from .chat import validate_chat
from .completions import completion_body, plan_reply, usage_for
from .replies import error_response, json_response, unauthorized
from .state import EMULATOR_STATE, EmulatorState

ENDPOINTS = ("/v1/chat/completions",)  # what the emulator batches (OpenRouter also takes others)
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass(slots=True)
class BatchDesk:
    """The emulator's batches and how it runs them; tests set the knobs directly."""

    discount: float = 0.5  # the batch price as a share of the interactive one
    delay_s: float = 0.0  # how long after creation a batch completes
    models: frozenset[str] | None = None  # the models that batch (None: every chat model)
    batches: dict[str, EmulatedBatch] = field(default_factory=dict)
    created: int = 0  # batches accepted so far


@dataclass(slots=True)
class EmulatedBatch:
    id: str
    endpoint: str
    model: str
    created_at: float
    requests: list[dict[str, Any]]
    status: str = "validating"
    finalized_at: float | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_object(self, *, with_results: bool) -> dict[str, Any]:
        completed = sum(1 for r in self.results if r["response"] is not None)
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "status": self.status,
            "completion_window": "24h",
            "created_at": int(self.created_at),
            "finalized_at": int(self.finalized_at) if self.finalized_at is not None else None,
            "error": None,
            "request_counts": {
                "total": len(self.requests),
                "completed": completed,
                "failed": len(self.results) - completed,
            },
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
            "results": self.results if with_results and self.status in TERMINAL else None,
        }


BATCH_DESK = web.AppKey("emulator_batch_desk", BatchDesk)


def add_batch_routes(app: web.Application) -> None:
    app[BATCH_DESK] = BatchDesk()
    for prefix in ("/api/v1", "/v1"):
        app.router.add_post(f"{prefix}/batches", create_batch)
        app.router.add_get(f"{prefix}/batches", list_batches)
        app.router.add_get(f"{prefix}/batches/{{batch_id}}", get_batch)
        app.router.add_get(f"{prefix}/batches/{{batch_id}}/results", batch_results)
        app.router.add_delete(f"{prefix}/batches/{{batch_id}}", delete_batch)


async def create_batch(request: web.Request) -> web.Response:
    state, desk = request.app[EMULATOR_STATE], request.app[BATCH_DESK]
    denied = unauthorized(state, request)
    if denied is not None:
        return denied
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return error_response(400, "Invalid JSON in request body")
    if not isinstance(body, dict):
        return error_response(400, "Request body must be a JSON object")
    keys = list(body)
    if "requests" in keys and any(name in keys[keys.index("requests") :] for name in ("endpoint", "model")):
        return error_response(400, "`endpoint` and `model` must come before `requests` in the request body")
    endpoint, model_id, requests = body.get("endpoint"), body.get("model"), body.get("requests")
    if endpoint not in ENDPOINTS:
        return error_response(400, f"Unsupported batch endpoint: {endpoint!r}")
    if body.get("completion_window", "24h") != "24h":
        return error_response(400, "The only supported completion_window is 24h")
    model = state.models.get(model_id) if isinstance(model_id, str) else None
    if model is None or model.embeddings:
        return error_response(400, f"{model_id} is not a valid model ID")
    if desk.models is not None and model.id not in desk.models:
        return error_response(400, f"{model.id} does not support batch requests")
    if not isinstance(requests, list) or not requests:
        return error_response(400, "`requests` must be a non-empty array")
    seen: set[str] = set()
    for index, item in enumerate(requests):
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        line_body = item.get("body") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or custom_id in seen or not isinstance(line_body, dict):
            return error_response(400, f"requests[{index}]: needs a unique string custom_id and an object body")
        if line_body.get("model", model.id) != model.id:
            return error_response(400, f"requests[{index}]: body.model must match the batch's model {model.id}")
        seen.add(custom_id)
    desk.created += 1
    now = state.clock()
    batch = EmulatedBatch(f"batch_{int(now)}{desk.created:06d}", endpoint, model.id, now, requests)
    desk.batches[batch.id] = batch
    for item in requests:
        state.record(request, {**item["body"], "model": model.id, "custom_id": item["custom_id"]}, model.id)
    return web.Response(
        body=orjson.dumps(batch.to_object(with_results=False)), status=202, content_type="application/json"
    )


def _advance(state: EmulatorState, desk: BatchDesk, batch: EmulatedBatch) -> None:
    """A poll moves a batch on: validated, then run whole once its delay has passed."""
    if batch.status in TERMINAL:
        return
    now = state.clock()
    if now < batch.created_at + desk.delay_s:
        batch.status = "in_progress"
        return
    model = state.models[batch.model]
    for item in batch.requests:
        line_body = {**item["body"], "model": batch.model}
        checked = validate_chat(state, line_body, batch.model)
        result: dict[str, Any] = {"id": f"{batch.id}-{len(batch.results)}", "custom_id": item["custom_id"]}
        if isinstance(checked, web.Response):
            error = orjson.loads(checked.body)["error"]  # type: ignore[arg-type]
            result.update(response=None, error={"message": error["message"], "type": "invalid_request_error"})
        else:
            result.update(response=_answer(state, desk, model, line_body, batch), error=None)
        batch.results.append(result)
    batch.status, batch.finalized_at = "completed", now


def _answer(
    state: EmulatorState, desk: BatchDesk, model: Any, body: dict[str, Any], batch: EmulatedBatch
) -> dict[str, Any]:
    """One line answered as a chat completion, billed at the batch price."""
    created = int(state.clock())
    gen_id = state.new_id(created)
    reply = plan_reply(body, model, "call_" + gen_id[-20:])
    charge: Charge = state.charge(body, model, reply)
    usage = usage_for(charge, model)
    cost = usage["cost"] * desk.discount
    usage["cost"] = cost
    usage["cost_details"] = {k: v * desk.discount for k, v in usage["cost_details"].items()}
    state.bills[gen_id] = Bill(
        gen_id,
        model.id,
        model.provider,
        state.clock(),
        False,
        charge.prompt_tokens,
        charge.completion_tokens,
        charge.cached_tokens,
        charge.cache_write_tokens,
        cost,
        finish_reason=reply.finish_reason,
    )
    state.key_usage += cost
    state.stats["completions"] += 1
    batch.prompt_tokens += charge.prompt_tokens
    batch.completion_tokens += charge.completion_tokens
    answer = orjson.loads(completion_body(reply, model, gen_id, created, usage))
    return {"status_code": 200, "request_id": gen_id, "body": answer}


def _found(request: web.Request) -> tuple[EmulatorState, BatchDesk, EmulatedBatch] | web.Response:
    state, desk = request.app[EMULATOR_STATE], request.app[BATCH_DESK]
    denied = unauthorized(state, request)
    if denied is not None:
        return denied
    batch = desk.batches.get(request.match_info["batch_id"])
    if batch is None:
        return error_response(404, f"Batch {request.match_info['batch_id']} not found")
    return state, desk, batch


async def get_batch(request: web.Request) -> web.Response:
    found = _found(request)
    if isinstance(found, web.Response):
        return found
    state, desk, batch = found
    _advance(state, desk, batch)
    return json_response(batch.to_object(with_results=True))


async def batch_results(request: web.Request) -> web.Response:
    found = _found(request)
    if isinstance(found, web.Response):
        return found
    state, desk, batch = found
    _advance(state, desk, batch)
    if batch.status not in TERMINAL:
        return error_response(409, f"Batch {batch.id} has not finished (status {batch.status})")
    try:
        limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        start = int(request.query.get("cursor", "0"))
    except ValueError:
        return error_response(400, "limit and cursor must be integers")
    page = batch.results[start : start + limit]
    more = start + limit < len(batch.results)
    return json_response(
        {"object": "list", "data": page, "has_more": more, "next_cursor": str(start + limit) if more else None}
    )


async def list_batches(request: web.Request) -> web.Response:
    state, desk = request.app[EMULATOR_STATE], request.app[BATCH_DESK]
    denied = unauthorized(state, request)
    if denied is not None:
        return denied
    data = [batch.to_object(with_results=False) for batch in desk.batches.values()]
    return json_response({"object": "list", "data": data, "has_more": False})


async def delete_batch(request: web.Request) -> web.Response:
    found = _found(request)
    if isinstance(found, web.Response):
        return found
    _, desk, batch = found
    if batch.status not in TERMINAL:
        return error_response(409, f"Batch {batch.id} is still {batch.status}")
    del desk.batches[batch.id]
    return json_response({"id": batch.id, "object": "batch", "deleted": True})
