"""Three proxy replicas on one Redis and one PostgreSQL, behind nginx: the whole deployment of
deploy/scale/, as real processes, with the emulator as their upstream.

- One budget: 100 concurrent clients through nginx on a tight budget spend no more than one
  process would (the in-flight rule), and the ledger in PostgreSQL equals the emulator's bill.
- A replica SIGKILLed mid-load: every answer it delivered is in PostgreSQL, and its holds lapse
  within their TTL.
- Breakers and the cache are shared: opened or written through one replica, honoured by another.
- Redis killed and started empty mid-load: `fail_closed` answers 503 naming Redis while it is
  down, and afterwards the counters are re-seeded from the ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import load_config
from proxy.core.admission import worst_case
from proxy.core.features import extract_features
from proxy.emulator import Fault
from proxy.http.appkeys import RUNTIME
from proxy.money.ledger_rows import to_nano
from proxy.state.redis_spend import hold_ttl_s
from tests.support.audit import billed_nano
from tests.support.fleet import (
    RedisServer,
    Replica,
    nginx_in_front,
    pg_database,
    psql,
    redis_keys,
    redis_prefix,
    start_replicas,
    stop_replicas,
)
from tests.support.gateway import proxy_config_text
from tests.support.money import MODELS
from tests.support.timing import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realtime,  # real processes, real signals, and the emulator's real latency keeping requests in flight
]

ADMIN = {"Authorization": "Bearer scale-admin"}
PRIMARY = "mistralai/mistral-7b-instruct"
DUO = f"  duo: {{chain: [{PRIMARY}, meta-llama/llama-3.1-8b-instruct]}}\n"  # a chain to fall back along
QUALITY = {
    "model": "quality",
    "messages": [{"role": "user", "content": "Tell me about lighthouses."}],
    "max_tokens": 50,
}


@dataclass
class Deployment:
    replicas: list[Replica]
    dsn: str
    prefix: str
    redis_port: int
    config: Path

    def ledger_rows(self) -> list[tuple[str, str, int]]:
        """(request id, generation id, cost in nano-dollars) of every row in PostgreSQL."""
        out = psql("SELECT request_id, coalesce(generation_id, ''), cost_nusd FROM orproxy_requests", self.dsn)
        return [(r, g, int(c)) for r, g, c in (line.split("|") for line in out.splitlines() if line)]

    def holds(self) -> list[str]:
        """The hold keys in Redis: one per admitted request not yet settled (each with its TTL)."""
        return [key for key in redis_keys(self.prefix, self.redis_port) if key.startswith(f"{self.prefix}hold:")]


def scale_config(emulator_url: str, dsn: str, redis_url: str, prefix: str, extra: str = "") -> str:
    return (
        proxy_config_text(emulator_url, MODELS + DUO)
        + f"ledger: {{backend: postgres, dsn: '{dsn}'}}\n"
        + f"state: {{backend: redis, url: '{redis_url}', prefix: '{prefix}', on_state_error: fail_closed}}\n"
        + "admin: {key_env: SCALE_TEST_ADMIN}\n"
        + "watch_config: false\nshutdown_timeout_s: 5\n"
        + extra
    )


@pytest.fixture
async def deploy(emulator, tmp_path, monkeypatch) -> AsyncIterator[Any]:
    """deploy(extra_config, count=3, redis=None) -> Deployment; everything stopped and dropped afterwards."""
    monkeypatch.setenv("SCALE_TEST_ADMIN", "scale-admin")
    started: list[list[Replica]] = []
    with pg_database() as dsn, redis_prefix() as prefix:

        async def make(extra: str = "", count: int = 3, redis: RedisServer | None = None) -> Deployment:
            redis_url, redis_port = (redis.url, redis.port) if redis else ("redis://127.0.0.1:6379/0", 6379)
            config = tmp_path / "config.yaml"
            config.write_text(scale_config(emulator.url, dsn, redis_url, prefix, extra))
            replicas = await start_replicas(config, tmp_path, count)
            started.append(replicas)
            return Deployment(replicas, dsn, prefix, redis_port, config)

        try:
            yield make
        finally:
            for replicas in started:
                await stop_replicas(replicas)


def reservation_of(policy: Any) -> float:
    features = extract_features(QUALITY, {})
    return worst_case(policy.prices, policy.router.plan("quality", features), features.prompt_tokens, 50)


async def test_one_budget_and_one_ledger_across_three_replicas_behind_nginx(deploy, make_proxy, emulator, tmp_path):
    probe = await make_proxy(MODELS)
    reserved = reservation_of(probe.app[RUNTIME].current.policy)
    limit = round(reserved * 10.5, 9)  # room for ten reservations at a time, across all replicas
    deployment = await deploy(f"budget: {{daily_usd: {limit}, on_exhausted: reject}}\n")
    emulator.state.faults.set("*", Fault(latency_s=0.3))
    async with nginx_in_front(deployment.replicas, tmp_path) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)

        async def one() -> Any:
            try:
                return await client.chat.completions.create(**QUALITY)
            except openai.RateLimitError as exc:
                return exc

        outcomes = await asyncio.gather(*(one() for _ in range(100)))
        await client.close()
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    # Three replicas, one budget: what one process admits (ten at a time, then what settles frees).
    assert 10 <= len(answered) < 100 and len(answered) + len(refused) == 100
    billed = billed_nano(emulator)
    assert sum(billed.values()) <= to_nano(limit)
    await stop_replicas(deployment.replicas)  # every row committed, every hold settled
    booked = {gen: cost for _, gen, cost in deployment.ledger_rows() if gen}
    assert booked == billed  # the ledger in PostgreSQL is the emulator's bill, to the nano-dollar
    assert deployment.holds() == []


async def test_a_replica_killed_mid_load_loses_no_delivered_answer_and_its_holds_lapse(deploy, emulator, tmp_path):
    deployment = await deploy("budget: {daily_usd: 100}\n")
    emulator.state.faults.set("*", Fault(latency_s=1.0))
    victim, *others = deployment.replicas
    delivered: list[str] = []

    async def one(replica: Replica) -> None:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.post(f"{replica.url}/v1/chat/completions", json=QUALITY) as response:
                    await response.read()
                    if response.status == 200:
                        delivered.append(response.headers["x-request-id"])
            except aiohttp.ClientError:
                pass  # the victim's clients: cut off

    load = [asyncio.create_task(one(r)) for r in deployment.replicas for _ in range(10)]
    await wait_for(lambda: len(deployment.holds()) >= 30, timeout=10, message="the holds of 30 requests")
    victim.process.kill()
    await victim.process.wait()
    await asyncio.gather(*load)
    assert len(delivered) >= 20  # the two survivors answered theirs
    await stop_replicas(others)
    in_ledger = {request_id for request_id, _, _ in deployment.ledger_rows()}
    assert set(delivered) <= in_ledger
    # The victim's holds had no one to settle them (nor to renew them): they lapse within their TTL.
    ttl = hold_ttl_s(load_config(deployment.config))
    assert deployment.holds()  # the victim's ten, still there
    await wait_for(lambda: deployment.holds() == [], timeout=ttl + 2, interval=0.2, message="the dead replica's holds")


async def test_breakers_and_cache_are_shared_between_replicas(deploy, emulator):
    deployment = await deploy("cache: {enabled: true, ttl_s: 600}\n", count=2)
    a, b = deployment.replicas
    async with aiohttp.ClientSession() as session:
        # A cache entry written through A is served by B.
        body = {"model": "cheap", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0}
        async with session.post(f"{a.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            first = await response.json()

        async def hit_on(replica: Replica) -> dict | None:
            async with session.post(f"{replica.url}/v1/chat/completions", json=body) as response:
                if response.headers.get("x-proxy-cache") == "hit":
                    return await response.json()
            return None

        await wait_for(lambda: hit_on(a), timeout=5, interval=0.1)  # stored (the write follows the answer)
        calls = len(emulator.state.requests)
        cached = await hit_on(b)
        assert cached is not None and cached["choices"] == first["choices"]
        assert len(emulator.state.requests) == calls  # B did not go upstream for it

        # A breaker opened by failures through A is honoured by B within about a second.
        primary, duo = PRIMARY, {**body, "model": "duo", "temperature": 1}
        emulator.state.faults.set(primary, Fault(status=503))
        for _ in range(3):  # retry.cooldown.failures: 3 distinct requests
            async with session.post(f"{a.url}/v1/chat/completions", json=duo) as response:
                assert response.status == 200  # the next member answered
        emulator.state.faults.clear(primary)
        before = sum(r.model == primary for r in emulator.state.requests)

        async def b_skips_primary() -> bool:
            async with session.get(f"{b.url}/admin/status", headers=ADMIN) as response:
                blocks = (await response.json())["blocks"]
            return any(block["model"] == primary for block in blocks)

        await wait_for(b_skips_primary, timeout=3, interval=0.1)
        async with session.post(f"{b.url}/v1/chat/completions", json=duo) as response:
            assert response.status == 200
            assert (await response.json())["model"] != primary
        assert sum(r.model == primary for r in emulator.state.requests) == before


async def test_redis_restarted_mid_load_fails_closed_then_reseeds_from_the_ledger(deploy, emulator, tmp_path):
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        deployment = await deploy("budget: {daily_usd: 100}\n", count=2, redis=redis)
        a, b = deployment.replicas
        async with aiohttp.ClientSession() as session:
            for replica in (a, b, a, b):
                async with session.post(f"{replica.url}/v1/chat/completions", json=QUALITY) as response:
                    assert response.status == 200
            spent_before = sum(cost for _, _, cost in deployment.ledger_rows())
            assert spent_before > 0

            await redis.stop()  # killed: whatever it held is gone
            async with session.post(f"{a.url}/v1/chat/completions", json=QUALITY) as response:
                assert response.status == 503
                error = (await response.json())["error"]
            assert "redis" in error["message"].lower() and "on_state_error" in error["message"]

            await redis.start()  # empty

            async def served_again() -> bool:
                async with session.post(f"{b.url}/v1/chat/completions", json=QUALITY) as response:
                    return response.status == 200

            await wait_for(served_again, timeout=15, interval=0.2)

            async def spent_today() -> float:
                async with session.get(f"{a.url}/admin/spend", headers=ADMIN) as response:
                    budget = (await response.json())["budget"]
                return next(b["spent_usd"] for b in budget if b["scope"] == "global" and b["window"] == "daily")

            # Re-seeded from the ledger (max(redis, ledger)), not restarted from zero: what A shows
            # (its figures refresh every half second) is the whole ledger, B's request since included.
            total = sum(cost for _, _, cost in deployment.ledger_rows())
            assert total > spent_before

            async def a_shows_the_ledger() -> bool:
                return abs(to_nano(await spent_today()) - total) <= 1

            await wait_for(a_shows_the_ledger, timeout=5, interval=0.1, message=lambda: f"ledger {total}")
    finally:
        await redis.stop()
