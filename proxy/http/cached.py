"""The response cache on the request path: look up before going upstream, answer a hit
(as JSON, or replayed as SSE), store a fresh answer after responding."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from proxy.cache.policy import CachedAnswer, cache_key, wants_cache
from proxy.cache.replay import replay_as_sse
from proxy.cache.response_cache import ResponseCache
from proxy.core.record import RequestRecord, Usage
from proxy.core.routing import Plan, Router, Target
from proxy.upstream.relay import SSE_HEADERS

JSON = "application/json"


def key_for(
    cache: ResponseCache | None,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    plan: Plan,
    router: Router,
    direct_upstream: str,
) -> str | None:
    """The cache key, or None when this request does not use the cache. The configured chain
    (not the live one, which skips members in cooldown) decides, so a hit does not depend on health."""
    if cache is None or not cache.policy.enabled or not wants_cache(body, headers.get("X-Proxy-Cache")):
        return None
    chain = router.chain_of(plan.chain_owner) if plan.chain_owner else (Target(plan.requested, direct_upstream),)
    return cache_key(body, [str(target) for target in chain])


def answer_hit(
    request: web.Request, hit: CachedAnswer, record: RequestRecord, headers: dict[str, str], stream: bool
) -> web.Response:
    record.model, record.upstream, record.status = hit.model, hit.upstream, 200
    record.cached, record.saved_usd = True, hit.cost_usd
    record.usage = Usage(hit.prompt_tokens, hit.completion_tokens, None)
    headers = {**headers, "x-proxy-model": hit.model, "x-proxy-attempts": "0", "x-proxy-cache": "hit"}
    record.route = headers["x-proxy-route"] = headers["x-proxy-route"] + " cache=hit"
    if stream:
        return web.Response(body=replay_as_sse(hit), status=200, headers={**SSE_HEADERS, **headers})
    return web.Response(body=orjson.dumps(hit.completion), status=200, content_type=JSON, headers=headers)


def store(
    cache: ResponseCache,
    key: str,
    record: RequestRecord,
    payload: dict[str, Any],
    now: float,
    tasks: set[asyncio.Task[Any]],
) -> None:
    """Keep a fresh answer, after the client has it: the write never delays a response."""
    if record.model is None or record.upstream is None or record.cost is None:
        return
    usage = record.usage or Usage()
    answer = CachedAnswer(
        payload, record.model, record.upstream, record.cost.usd, usage.prompt_tokens, usage.completion_tokens, now
    )
    task = asyncio.get_running_loop().create_task(cache.put(key, answer))
    tasks.add(task)
    task.add_done_callback(tasks.discard)
