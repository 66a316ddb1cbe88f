"""`orproxy serve --workers N`: real processes on one port, real signals, the emulator upstream.

One supervisor, two workers: the kernel spreads connections over both; every
scrape of /metrics shows the totals of both, whichever worker answers; a
SIGKILLed worker is replaced and its counts stay in the totals; SIGHUP reloads
both; SIGTERM drains both and the supervisor exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.emulator import Fault
from tests.support.fleet import redis_prefix
from tests.support.gateway import ROOT, proxy_config_text
from tests.support.procs import free_port, start_proxy, wait_until_up
from tests.support.timing import wait_for

HELLO = [{"role": "user", "content": "hi"}]
ADMIN = {"Authorization": "Bearer workers-admin"}


def fleet_config(emulator_url: str, tmp_path: Path, prefix: str, model: str = "mistralai/mistral-7b-instruct") -> str:
    return (
        proxy_config_text(emulator_url, f"models:\n  cheap: {{chain: [{model}]}}\n")
        + f"ledger: {{path: '{tmp_path / 'ledger.sqlite3'}'}}\n"
        + f"state: {{backend: redis, url: 'redis://127.0.0.1:6379/0', prefix: '{prefix}'}}\n"
        + "admin: {key_env: WORKERS_TEST_ADMIN}\n"
        + "watch_config: false\nshutdown_timeout_s: 10\n"
    )


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


async def requests_total(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics", headers=ADMIN) as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "orproxy_requests"
        for sample in family.samples
        if sample.name == "orproxy_requests_total"
    )


async def answered_by(url: str) -> int:
    """The pid of the worker that answered, on a connection of its own (so the kernel picks again)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(f"{url}/admin/status", headers=ADMIN) as response,
    ):
        return (await response.json())["process"]["pid"]


async def ask(url: str, model: str = "cheap") -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.post(f"{url}/v1/chat/completions", json={"model": model, "messages": HELLO}) as response,
    ):
        return response.status, await response.json()


async def test_more_than_one_worker_on_local_state_is_refused(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(proxy_config_text("http://127.0.0.1:9") + "watch_config: false\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--workers", "2",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "--workers 2" in err.decode() and "state.backend: redis" in err.decode()


@pytest.mark.slow
@pytest.mark.realtime  # real processes and signals; a worker's replacement starts on the real clock
async def test_two_workers_share_a_port_sum_their_metrics_survive_a_kill_and_drain(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKERS_TEST_ADMIN", "workers-admin")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.yaml"
    with redis_prefix() as prefix:
        await _run_fleet(emulator, tmp_path, config, prefix, port, url)


async def _run_fleet(emulator, tmp_path: Path, config: Path, prefix: str, port: int, url: str) -> None:
    config.write_text(fleet_config(emulator.url, tmp_path, prefix))
    log = tmp_path / "fleet.log"
    proc = await start_proxy(config, log, port, extra=["--workers", "2"])
    try:
        async with asyncio.timeout(60), aiohttp.ClientSession() as session:
            await wait_until_up(url, proc, log)
            await wait_for(lambda: len(children(proc.pid)) == 2, timeout=10)
            workers = children(proc.pid)
            # Both bind the port (once each has started): each answers some of the fresh connections.
            seen: set[int] = set()

            async def both_answer() -> bool:
                seen.add(await answered_by(url))
                return seen == workers

            await wait_for(both_answer, timeout=20, message=lambda: f"answered by {seen}, workers {workers}")

            results = await asyncio.gather(*(ask(url) for _ in range(30)))
            assert [status for status, _ in results] == [200] * 30
            # Every scrape, whichever worker answers it, counts the requests of both.
            for _ in range(8):
                assert await requests_total(session, url) == 30

            # SIGKILL one worker: another takes its place; the dead one's requests stay counted.
            victim = sorted(workers)[0]
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda: len(children(proc.pid) - {victim}) == 2, timeout=15, interval=0.1)
            replacement = children(proc.pid) - workers
            assert len(replacement) == 1
            await wait_for(lambda: "starting another" in log.read_text(), timeout=5)
            await wait_until_up(url, proc, log)
            await wait_for(lambda: _serves(url, replacement), timeout=15, interval=0.05)
            results = await asyncio.gather(*(ask(url) for _ in range(10)))
            assert [status for status, _ in results] == [200] * 10
            for _ in range(8):
                assert await requests_total(session, url) == 40

            # SIGHUP reaches both workers: each reloads the edited config.
            config.write_text(fleet_config(emulator.url, tmp_path, prefix, model="meta-llama/llama-3.1-8b-instruct"))
            os.kill(proc.pid, signal.SIGHUP)

            async def both_reloaded() -> bool:
                models = {(await ask(url))[1].get("model") for _ in range(12)}
                return models == {"meta-llama/llama-3.1-8b-instruct"}

            assert await wait_for(both_reloaded, timeout=15, interval=0.2)

            # SIGTERM while slow requests are in flight on both workers: they finish, and all exit 0.
            emulator.state.faults.set("meta-llama/llama-3.1-8b-instruct", Fault(latency_s=1.0))
            before = _waiting(emulator)
            slow = [asyncio.create_task(ask(url)) for _ in range(6)]
            await wait_for(lambda: _waiting(emulator) >= before + 6, timeout=10)
            live = children(proc.pid)
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*slow)
            assert [status for status, _ in results] == [200] * 6
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            assert not any(Path(f"/proc/{pid}").exists() for pid in live)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _serves(url: str, pids: set[int]) -> bool:
    return bool({await answered_by(url) for _ in range(6)} & pids)


def _waiting(emulator) -> int:
    return sum(r.model == "meta-llama/llama-3.1-8b-instruct" for r in emulator.state.requests)
