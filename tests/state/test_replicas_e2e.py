"""Two proxies (two apps, as two replicas would be) on one Redis, in front of one emulator: one
budget, one set of breakers, one response cache; and what happens when Redis is not there."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.config import parse_config
from proxy.core.admission import worst_case
from proxy.core.budget import GLOBAL
from proxy.core.features import extract_features
from proxy.emulator import Fault
from proxy.http.app import StartupError, create_app
from proxy.http.appkeys import METRICS, RUNTIME, STATE
from tests.state.conftest import burst, state_block
from tests.support.audit import billed_nano, booked_nano, settled
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text
from tests.support.money import MODELS, usage_cost
from tests.support.timing import cache_writes_settled, wait_for

MISTRAL = "mistralai/mistral-7b-instruct"
HELLO = [{"role": "user", "content": "hello there"}]


async def two_replicas(make_proxy, tmp_path, prefix: str, extra: str = "", body: str = "", **kwargs: Any):
    replicas = []
    for name in ("a", "b"):
        replicas.append(
            await make_proxy(
                body, extra=state_block(prefix) + extra, ledger_path=tmp_path / f"ledger-{name}.sqlite3", **kwargs
            )
        )
    return replicas


@pytest.mark.realtime  # the emulator's real latency keeps all 100 requests in flight together
async def test_100_clients_on_two_replicas_hold_one_budget(make_proxy, emulator, tmp_path, redis_prefix):
    """As in one process (tests/money/test_bursts_e2e.py): no request costs more than it reserved
    and the total stays within the limit, though half the clients go to each replica."""
    body = {"model": "quality", "messages": [{"role": "user", "content": "Count to ten. " * 5}], "max_tokens": 50}
    probe = await make_proxy(MODELS, ledger_path=tmp_path / "probe.sqlite3")
    policy = probe.app[RUNTIME].current.policy
    features = extract_features(body, {})
    reserved = worst_case(policy.prices, policy.router.plan("quality", features), features.prompt_tokens, 50)
    limit = round(reserved * 10.5, 9)  # room for ten reservations at a time, across both replicas
    a, b = await two_replicas(
        make_proxy, tmp_path, redis_prefix, f"budget: {{daily_usd: {limit}, on_exhausted: reject}}\n", MODELS
    )
    emulator.state.faults.set("*", Fault(latency_s=0.3))
    outcomes = await burst((a, b), body)
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    assert 10 <= len(answered) < 100
    assert all(isinstance(o, openai.RateLimitError) for o in outcomes if o not in answered)
    costs = [usage_cost(completion.usage) for completion in answered]
    assert sum(max(0.0, cost - reserved) for cost in costs) == 0.0
    assert sum(costs) <= limit
    rows = await settled(a) + await settled(b)
    for proxy in (a, b):
        await proxy.app[STATE].spend.drain()
    assert len({r.request_id for r in rows}) == len(rows) == 100  # every request booked once, on one replica
    assert booked_nano(rows) == billed_nano(emulator)  # both ledgers together: every billed cent, once
    await a.app[STATE].spend.refresh(a.app[RUNTIME].current.policy)
    totals = a.app[STATE].counters.scope(GLOBAL)
    assert totals.reserved == 0.0
    assert totals.day == pytest.approx(sum(costs), abs=1e-9)  # the shared counter: both replicas' spend


async def test_a_breaker_opened_through_one_replica_is_honoured_by_the_other(
    make_proxy, emulator, tmp_path, redis_prefix
):
    a, b = await two_replicas(make_proxy, tmp_path, redis_prefix)
    emulator.state.faults.set(MISTRAL, Fault(status=503))
    for _ in range(3):  # three distinct requests fail on it through A: A's breaker opens
        await a.client().chat.completions.create(model="cheap", messages=HELLO)
    assert a.app[STATE].breakers.is_open(next(iter(a.app[STATE].breakers.active(time.time()))), time.time())
    opened = time.monotonic()

    async def skipped_on_b() -> bool | None:
        return any(t.model == MISTRAL for t in b.app[STATE].breakers.active(time.time())) or None

    await wait_for(skipped_on_b, 3.0, interval=0.05, message="B never learned of A's breaker")
    assert time.monotonic() - opened <= 1.5
    calls = [r.model for r in emulator.state.requests].count(MISTRAL)
    raw = await b.client().chat.completions.with_raw_response.create(model="cheap", messages=HELLO)
    assert f"{MISTRAL}=skipped:cooldown" in raw.headers["x-proxy-route"]
    assert [r.model for r in emulator.state.requests].count(MISTRAL) == calls  # B did not call it


async def test_a_cache_entry_written_by_one_replica_is_served_by_the_other(
    make_proxy, emulator, tmp_path, redis_prefix
):
    a, b = await two_replicas(make_proxy, tmp_path, redis_prefix, "cache: {enabled: true, ttl_s: 60}\n")
    first = await a.client().chat.completions.with_raw_response.create(model="cheap", messages=HELLO, temperature=0)
    assert first.headers["x-proxy-cache"] == "miss"
    await cache_writes_settled()
    second = await b.client().chat.completions.with_raw_response.create(model="cheap", messages=HELLO, temperature=0)
    assert second.headers["x-proxy-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert len(emulator.state.requests) == 1  # B answered without going upstream
    rows = await settled(b)
    assert [(r.cached, r.cost_usd) for r in rows] == [(True, 0.0)]
    assert await metric(b, "orproxy_state_backend_up", {"backend": "redis"}) == 1.0
    assert await metric(b, "orproxy_state_errors_total") == 0.0
    assert await metric(b, "orproxy_cache_hits_total") == 1.0


async def metric(proxy, name: str, labels: dict[str, str] | None = None) -> float | None:
    registry: CollectorRegistry = proxy.app[METRICS].registry
    return registry.get_sample_value(name, labels or {})


async def post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + path, json=body, headers={"x-api-key": "unused"}) as response,
    ):
        return response.status, await response.json()


async def test_redis_unreachable_fails_closed_with_a_clear_503(make_proxy, emulator, tmp_path, redis_prefix):
    dead = state_block(redis_prefix, url="redis://127.0.0.1:1/0", on_state_error="fail_closed", timeout_ms=200)
    env = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "ADMIN": "admin-secret"}
    proxy = await make_proxy(extra=dead + "admin: {key_env: ADMIN}\n", env=env)
    status, body = await post(proxy.url, "/v1/chat/completions", {"model": "cheap", "messages": HELLO})
    assert status == 503 and body["error"]["code"] == "state_unavailable"
    assert "Redis at redis://127.0.0.1:1/0" in body["error"]["message"]
    assert "state.on_state_error" in body["error"]["message"]
    status, body = await post(proxy.url, "/v1/messages", {"model": "cheap", "max_tokens": 10, "messages": HELLO})
    assert status == 503 and body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    assert "Redis" in body["error"]["message"]
    assert emulator.state.requests == []
    assert await metric(proxy, "orproxy_state_backend_up", {"backend": "redis"}) == 0.0
    assert (await metric(proxy, "orproxy_state_errors_total") or 0) >= 1
    admin = {"Authorization": "Bearer admin-secret"}
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/admin/status", headers=admin) as r:
        state = (await r.json())["state"]
    assert state["backend"] == "redis" and state["up"] is False and state["on_state_error"] == "fail_closed"


async def test_redis_unreachable_with_local_fallback_serves_and_books(
    make_proxy, emulator, tmp_path, redis_prefix, caplog
):
    dead = state_block(redis_prefix, url="redis://127.0.0.1:1/0", on_state_error="local", timeout_ms=200)
    proxy = await make_proxy(extra=dead + "budget: {daily_usd: 5}\n")
    client = proxy.client()
    for _ in range(3):
        await client.chat.completions.create(model="cheap", messages=HELLO)
    rows = await settled(proxy)
    assert len(rows) == 3 and booked_nano(rows) == billed_nano(emulator)
    totals = proxy.app[STATE].counters.scope(GLOBAL)
    assert totals.day == pytest.approx(sum(r.cost_usd for r in rows)) and totals.reserved == 0.0
    said = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(said) == 1, "logged once, not per request"


async def test_an_unset_url_env_is_refused_at_start_up_naming_it(emulator, tmp_path):
    text = proxy_config_text(emulator.url) + "state: {backend: redis, url_env: NO_SUCH_REDIS_URL}\n"
    app = create_app(parse_config(text), env={}, ledger_path=tmp_path / "ledger.sqlite3")
    runner = web.AppRunner(app)
    with pytest.raises(StartupError, match=r"state\.url_env names NO_SUCH_REDIS_URL, which is not set"):
        await runner.setup()
    assert not (tmp_path / "ledger.sqlite3").exists()  # refused before anything was opened
