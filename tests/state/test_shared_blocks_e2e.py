"""Two replicas on one Redis: tenant rules of the breakers hold across them, an unblock on one lifts
the block on the other, reports on one show the other's spend, and the downgrade steps count what
both have reserved."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from proxy.core.admission import worst_case
from proxy.core.features import extract_features
from proxy.emulator import Fault
from proxy.http.appkeys import RELOADER, RUNTIME, STATE
from tests.state.conftest import burst, state_block
from tests.support.audit import billed_nano, booked_nano, settled
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text
from tests.support.money import CHAIN_MODEL, MODELS, budget_block, usage_cost
from tests.support.timing import Clock, wait_for

MISTRAL = "mistralai/mistral-7b-instruct"
TENANTS = f"""
models:
  solo: {{chain: [{MISTRAL}]}}
keys:
  - {{name: noisy, key_env: NOISY_KEY}}
  - {{name: calm, key_env: CALM_KEY}}
admin: {{key_env: ADMIN_KEY}}
"""
RETRY = "retry: {attempts_per_model: 1, backoff_s: 0.01, cooldown: {failures: 3, window_s: 60, cooldown_s: 30}}"
ENV = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "NOISY_KEY": "noisy", "CALM_KEY": "calm", "ADMIN_KEY": "admin"}
POISON = [{"role": "user", "content": "POISON: an input this provider chokes on"}]
HELLO = [{"role": "user", "content": "hello"}]


async def call(proxy, key: str, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, proxy.url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        return response.status, dict(response.headers), await response.json()


async def chat(proxy, key: str, messages: list) -> tuple[int, dict[str, str]]:
    status, headers, _ = await call(proxy, key, "POST", "/v1/chat/completions", {"model": "solo", "messages": messages})
    return status, headers


@pytest.fixture
async def pair(make_proxy, emulator, tmp_path, redis_prefix):
    text = proxy_config_text(emulator.url, TENANTS, RETRY) + state_block(redis_prefix)
    return [
        await make_proxy(config_text=text, env=ENV, ledger_path=tmp_path / f"ledger-{name}.sqlite3")
        for name in ("a", "b")
    ]


async def learned(proxy, model: str, key: str | None, present: bool = True) -> None:
    async def seen() -> bool | None:
        return (any(t.model == model for t in proxy.app[STATE].breakers.active(time.time(), key)) == present) or None

    await wait_for(seen, 3.0, interval=0.05, message="the other replica never caught up")


async def test_a_breaker_one_tenant_opened_on_one_replica_skips_the_member_for_that_tenant_only(pair, emulator):
    a, b = pair
    emulator.state.faults.set(
        MISTRAL, Fault(status=500, message="Provider returned error", when_prompt_contains="POISON")
    )
    for _ in range(3):
        assert (await chat(a, "noisy", POISON))[0] == 502
    await learned(b, MISTRAL, "noisy")
    status, headers = await chat(b, "noisy", HELLO)
    assert status == 503 and f"{MISTRAL}=skipped:cooldown" in headers["x-proxy-route"]
    status, headers = await chat(b, "calm", HELLO)
    assert status == 200 and headers["x-proxy-route"] == f"solo: {MISTRAL}=ok"


async def test_an_unblock_on_one_replica_lifts_the_breaker_on_the_other(pair, emulator):
    a, b = pair
    emulator.state.faults.set(MISTRAL, Fault(status=503, times=3))
    for _ in range(3):
        assert (await chat(a, "calm", HELLO))[0] == 502
    await learned(b, MISTRAL, "calm")
    status, _, body = await call(b, "admin", "GET", "/admin/status")
    assert status == 200 and [block["model"] for block in body["blocks"]] == [MISTRAL]
    assert body["state"]["backend"] == "redis" and body["state"]["up"] is True
    status, _, _ = await call(b, "admin", "POST", "/admin/unblock")
    assert status == 200
    await learned(a, MISTRAL, "calm", present=False)
    status, headers = await chat(a, "calm", HELLO)
    assert status == 200 and headers["x-proxy-route"] == f"solo: {MISTRAL}=ok"


async def test_admin_spend_on_one_replica_shows_what_the_other_spent(make_proxy, emulator, tmp_path, redis_prefix):
    text = proxy_config_text(emulator.url, TENANTS, RETRY) + state_block(redis_prefix) + "budget: {daily_usd: 10}\n"
    a, b = [
        await make_proxy(config_text=text, env=ENV, ledger_path=tmp_path / f"ledger-{name}.sqlite3") for name in "ab"
    ]
    for _ in range(2):
        assert (await chat(a, "calm", HELLO))[0] == 200
    spent = sum(row.cost_usd for row in await settled(a))
    await a.app[STATE].spend.drain()  # A sends its settlements with its next call, or within 5 ms
    status, _, report = await call(b, "admin", "GET", "/admin/spend")
    budget = {(row["scope"], row["window"]): row["spent_usd"] for row in report["budget"]}
    assert status == 200 and spent > 0
    assert budget[("global", "daily")] == pytest.approx(spent) and budget[("calm", "daily")] == pytest.approx(spent)


@pytest.mark.realtime  # the emulator's real latency keeps all 100 requests in flight together
async def test_downgrade_steps_count_both_replicas_reservations(make_proxy, emulator, tmp_path, redis_prefix):
    """As tests/money/test_bursts_e2e.py in one process: at most 40% of the budget, plus the one
    reservation that crossed it, goes to the dearest chain, though half the burst goes to each replica."""
    body = {"model": "quality", "messages": [{"role": "user", "content": "Summarise a long novel."}], "max_tokens": 100}
    probe = await make_proxy(MODELS, ledger_path=tmp_path / "probe.sqlite3")
    policy = probe.app[RUNTIME].current.policy
    features = extract_features(body, {})
    dearest = worst_case(policy.prices, policy.router.plan("quality", features), features.prompt_tokens, 100)
    daily = round(dearest * 20, 9)
    a, b = [
        await make_proxy(
            MODELS, extra=budget_block(daily) + state_block(redis_prefix), ledger_path=tmp_path / f"{name}.sqlite3"
        )
        for name in "ab"
    ]
    emulator.state.faults.set("*", Fault(latency_s=0.3))
    outcomes = await burst((a, b), body)
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    by_model: dict[str, float] = {}
    for completion in answered:
        by_model[completion.model] = by_model.get(completion.model, 0.0) + usage_cost(completion.usage)
    on_quality = by_model.get(CHAIN_MODEL["quality"], 0.0)
    assert 0 < on_quality <= 0.4 * daily + dearest
    assert sum(by_model.values()) <= daily
    assert booked_nano(await settled(a) + await settled(b)) == billed_nano(emulator)
    restarts = sum(proxy.app[STATE].spend.restarts for proxy in (a, b))  # type: ignore[attr-defined]
    print(f"admissions redone on fresher figures: {restarts} of {len(outcomes)}")


async def test_a_reload_to_another_time_zone_seeds_the_shared_counters_of_its_day(
    make_proxy, emulator, tmp_path, redis_prefix
):
    """The counters are named by the window's start: another time zone's day starts from what the
    ledger holds for it, in Redis too (not from zero), and the next figures read back say so."""
    path = tmp_path / "config.yaml"
    text = proxy_config_text(emulator.url, TENANTS, RETRY) + state_block(redis_prefix) + "budget: {daily_usd: 10}\n"
    clock = Clock.at(2026, 3, 10, 18)  # 18:00 UTC: 03:00 of the next day in Tokyo, whose day began at 15:00 UTC
    proxy = await make_proxy(config_text=text, env=ENV, config_path=path, clock=clock)
    assert (await chat(proxy, "calm", HELLO))[0] == 200
    spent = sum(row.cost_usd for row in await settled(proxy))
    path.write_text(text.replace("budget: {daily_usd: 10}", "budget: {daily_usd: 10, timezone: Asia/Tokyo}"))
    status = await proxy.app[RELOADER].reload("test")
    assert status.last_result == "success", status.last_errors
    state = proxy.app[STATE]
    await state.spend.refresh(proxy.app[RUNTIME].current.policy)  # what Redis holds for Tokyo's day
    assert state.counters.calendar.tz.key == "Asia/Tokyo"
    assert state.counters.scope("").day == pytest.approx(spent) and spent > 0
