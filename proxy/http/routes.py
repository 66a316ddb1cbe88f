"""The small routes beside the APIs: the model list and a model's object, the routing explanation,
and the health check."""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from proxy.core.apis import CHAT
from proxy.core.errors import ModelNotFound
from proxy.core.explain import explain
from proxy.core.models import direct_model
from proxy.core.routing import UnknownModel
from proxy.http.api import blocked, model_not_found
from proxy.http.appkeys import ACCOUNTANT, RUNTIME, STATE
from proxy.http.body import read_body

JSON = "application/json"


async def list_models(request: web.Request) -> web.Response:
    """With client keys configured, a key is needed, and the list holds only what it may use."""
    runtime = request.app[RUNTIME].current
    client = runtime.policy.keys.authenticate(request.headers.get("Authorization"))
    body = runtime.models_by_key.get(client.name, runtime.models_body) if client.name else runtime.models_body
    return web.Response(body=body, content_type=JSON)


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: a virtual model, a chain member or (when allowed) any real slug, slashes
    included; a key with a model list sees only its own virtual models."""
    runtime = request.app[RUNTIME].current
    client = runtime.policy.keys.authenticate(request.headers.get("Authorization"))
    model_id = request.match_info["model"]
    found = runtime.models_index.get(model_id)
    if client.models is not None and model_id not in client.models:
        found = None
    elif found is None:
        found = direct_model(runtime.config, model_id, int(time.time()))
    if found is None:
        raise ModelNotFound(f"The model '{model_id[:200]}' does not exist on this proxy.", param="model")
    return web.Response(body=found, content_type=JSON)


async def explain_route(request: web.Request) -> web.Response:
    """POST /v1/route/explain: the decision for a chat body, nothing sent upstream or reserved."""
    runtime = request.app[RUNTIME].current
    client_key = runtime.policy.keys.authenticate(request.headers.get("Authorization"))
    body = await read_body(request, runtime.config.max_body_bytes, runtime.config.server.body_timeout_s)
    CHAT.check(body)
    client_key.check_model(body["model"])
    state = request.app[STATE]
    now = request.app[ACCOUNTANT].now()
    try:
        decision = explain(
            runtime.policy,
            body,
            request.headers,
            key=client_key.name,
            blocked=blocked(state.breakers, state.ratelimits, runtime, CHAT, now, client_key.name),
            now=now,
        )
    except UnknownModel as exc:
        raise model_not_found(exc, runtime) from None
    return web.Response(body=orjson.dumps(decision), content_type=JSON)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type=JSON)
