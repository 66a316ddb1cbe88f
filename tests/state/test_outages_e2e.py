"""Real processes: a redis-server of the test's own that is stopped and started again under a
proxy, and a proxy process SIGKILLed with a request in flight, whose hold must lapse."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.config import load_config
from proxy.core.budget import GLOBAL, SpendCounters
from proxy.emulator import Fault
from proxy.http.appkeys import STATE
from proxy.state.health import StateHealth
from proxy.state.redis_spend import RedisSpend, hold_ttl_s
from tests.state.conftest import REDIS_URL, state_block
from tests.support.audit import settled
from tests.support.gateway import proxy_config_text
from tests.support.procs import free_port, start_proxy, wait_until_up
from tests.support.timing import wait_for

HELLO = [{"role": "user", "content": "hello there"}]
pytestmark = [
    pytest.mark.slow,  # real redis-server and proxy processes, started and stopped
    pytest.mark.realtime,  # waits on Redis coming back and on a hold's real TTL
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server (Debian: redis-server)"),
]


class OwnRedis:
    """A redis-server on a free port, with no persistence: a restart loses everything, like a
    Redis restored from nothing."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url)
        try:
            for _ in range(100):
                try:
                    await client.ping()
                    return
                except (OSError, RedisError):
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        raise AssertionError("redis-server did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    server = OwnRedis(free_port())
    await server.start()
    yield server
    await server.stop()


async def test_redis_restarted_mid_load_falls_back_and_is_reseeded_from_the_ledger(
    make_proxy, emulator, own_redis, redis_prefix
):
    block = state_block(redis_prefix, url=own_redis.url, on_state_error="local", timeout_ms=200)
    proxy = await make_proxy(extra=block + "budget: {daily_usd: 5}\n")
    client = proxy.client()
    state = proxy.app[STATE]
    await client.chat.completions.create(model="cheap", messages=HELLO)
    await own_redis.stop()
    for _ in range(3):  # Redis is gone: served on this process's own book
        await client.chat.completions.create(model="cheap", messages=HELLO)
    assert state.redis is not None and not state.redis.health.up
    await own_redis.start()  # empty: everything Redis held is lost

    async def reseeded() -> bool | None:
        return (state.redis is not None and state.redis.health.up) or None

    await wait_for(reseeded, 5.0, interval=0.1, message="the proxy never saw Redis back")
    await client.chat.completions.create(model="cheap", messages=HELLO)
    rows = await settled(proxy)
    await proxy.app[STATE].spend.drain()
    spent = sum(r.cost_usd for r in rows)
    counters = SpendCounters("UTC", time.time())
    reader = Redis.from_url(own_redis.url)
    try:
        figures = RedisSpend(reader, redis_prefix, counters, StateHealth(own_redis.url, "local"), time.time)
        await figures.read((GLOBAL,), time.time())
    finally:
        await reader.aclose()
    assert counters.scope(GLOBAL).day == pytest.approx(spent, abs=1e-9)  # the ledger's, not one request's


async def test_the_holds_of_a_killed_replica_lapse_within_their_ttl(emulator, tmp_path, redis_prefix):
    config = tmp_path / "config.yaml"
    retry = "retry: {attempts_per_model: 1, backoff_s: 0, backoff_max_s: 0, max_retry_after_s: 0}"
    text = proxy_config_text(emulator.url, "models: {cheap: {chain: [mistralai/mistral-7b-instruct]}}", retry)
    text = text.replace("timeout_s: 2", "timeout_s: 1\n    connect_timeout_s: 1")
    config.write_text(
        text + state_block(redis_prefix) + f"ledger: {{path: {tmp_path / 'ledger.sqlite3'}}}\nwatch_config: false\n"
    )
    ttl = hold_ttl_s(load_config(config))
    assert ttl <= 10
    emulator.state.faults.set("*", Fault(latency_s=30))
    port = free_port()
    log = tmp_path / "proxy.log"
    proc = await start_proxy(config, log, port=port)
    url = f"http://127.0.0.1:{port}"
    reader = Redis.from_url(REDIS_URL)
    counters = SpendCounters("UTC", time.time())
    figures = RedisSpend(reader, redis_prefix, counters, StateHealth(REDIS_URL, "fail_closed"), time.time)
    try:
        await wait_until_up(url, proc, log)
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(
                session.post(f"{url}/v1/chat/completions", json={"model": "cheap", "messages": HELLO})
            )

            async def held() -> bool | None:
                await figures.read((GLOBAL,), time.time())
                return counters.scope(GLOBAL).reserved > 0 or None

            await wait_for(held, 5.0, interval=0.05, message="the request never reserved")
            os.kill(proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            await proc.wait()
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)

        async def lapsed() -> bool | None:
            await figures.read((GLOBAL,), time.time())
            return counters.scope(GLOBAL).reserved == 0 or None

        await wait_for(lapsed, ttl + 3, interval=0.2, message="the killed replica's hold never lapsed")
        assert time.monotonic() - killed <= ttl + 1
        assert [k async for k in reader.scan_iter(match=f"{redis_prefix}hold:*")] == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reader.aclose()
