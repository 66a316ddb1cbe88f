"""A real `orproxy serve` process: SIGHUP reloads the config, SIGTERM drains requests in flight and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import pytest

from proxy.emulator import Fault
from proxy.money.ledger import Ledger
from tests.support.gateway import ROOT, proxy_config_text
from tests.support.procs import free_port, start_proxy, wait_until_up
from tests.support.timing import wait_for

HELLO = [{"role": "user", "content": "hi"}]


def config_text(emulator_url: str, primary: str, ledger_path) -> str:
    models = f"models:\n  cheap: {{chain: [{primary}]}}\n"
    return (
        proxy_config_text(emulator_url, models)
        + f"ledger: {{path: '{ledger_path}'}}\n"
        + "watch_config: false\nshutdown_timeout_s: 10\n"
    )


async def ask(session: aiohttp.ClientSession, url: str) -> tuple[int, dict, str]:
    async with session.post(f"{url}/v1/chat/completions", json={"model": "cheap", "messages": HELLO}) as response:
        body = await response.json()
        return response.status, body, response.headers.get("x-request-id", "")


@pytest.mark.slow
@pytest.mark.realtime  # a real server process, real signals, and requests held in flight by real latency
async def test_sighup_reloads_and_sigterm_drains_in_flight_requests(emulator, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ledger_path = tmp_path / "ledger.sqlite3"
    config = tmp_path / "config.yaml"
    config.write_text(config_text(emulator.url, "mistralai/mistral-7b-instruct", ledger_path))
    log = tmp_path / "proxy.log"
    proc = await start_proxy(config, log, port)
    try:
        async with asyncio.timeout(30), aiohttp.ClientSession() as session:
            await wait_until_up(url, proc, log)
            status, body, _ = await ask(session, url)
            assert (status, body["model"]) == (200, "mistralai/mistral-7b-instruct")

            # An invalid edit + SIGHUP: refused, the old config keeps serving.
            config.write_text("models: [broken\n")
            os.kill(proc.pid, signal.SIGHUP)
            await wait_for(lambda: "refused; the previous config keeps serving" in log.read_text(), timeout=10)
            status, body, _ = await ask(session, url)
            assert (status, body["model"]) == (200, "mistralai/mistral-7b-instruct")
            assert "refused; the previous config keeps serving" in log.read_text()

            # A valid edit + SIGHUP: applied.
            config.write_text(config_text(emulator.url, "meta-llama/llama-3.1-8b-instruct", ledger_path))
            os.kill(proc.pid, signal.SIGHUP)

            async def answered_by_the_new_chain() -> dict:
                _, body, _ = await ask(session, url)
                return body if body.get("model") == "meta-llama/llama-3.1-8b-instruct" else {}

            body = await wait_for(answered_by_the_new_chain, timeout=10, interval=0.05)
            assert body["model"] == "meta-llama/llama-3.1-8b-instruct"

            # SIGTERM while slow requests are in flight: they finish, new connections are refused, exit 0.
            emulator.state.faults.set("meta-llama/llama-3.1-8b-instruct", Fault(latency_s=1.0))

            def upstream_calls() -> int:
                return sum(r.model == "meta-llama/llama-3.1-8b-instruct" for r in emulator.state.requests)

            before = upstream_calls()
            slow = [asyncio.create_task(ask(session, url)) for _ in range(3)]
            await wait_for(lambda: upstream_calls() >= before + 3)  # all three are in flight upstream now
            os.kill(proc.pid, signal.SIGTERM)
            started = time.monotonic()
            results = await asyncio.gather(*slow)
            assert [status for status, _, _ in results] == [200, 200, 200]
            returncode = await proc.wait()
            assert returncode == 0, log.read_text()[-2000:]
            assert time.monotonic() - started < 8
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    ledger = await Ledger.open(ledger_path, prune=False)
    try:
        recorded = {row.request_id for row in await ledger.rows()}
    finally:
        await ledger.close()
    assert {request_id for _, _, request_id in results} <= recorded  # flushed before exit


@pytest.mark.slow  # a real server process, stopped with SIGTERM
async def test_an_open_proxy_stays_on_localhost_unless_told_otherwise(emulator, tmp_path):
    port = free_port()
    config = tmp_path / "open.yaml"
    config.write_text(
        config_text(emulator.url, "mistralai/mistral-7b-instruct", tmp_path / "l.sqlite3")
        + f"listen: {{host: 0.0.0.0, port: {port}}}\n"
    )
    log = tmp_path / "proxy.log"
    proc = await start_proxy(config, log)
    try:
        async with asyncio.timeout(20):
            await wait_until_up(f"http://127.0.0.1:{port}", proc, log)
    finally:
        proc.terminate()
        await proc.wait()
    assert (
        "no client keys are configured, so the proxy is open: binding to 127.0.0.1 instead of 0.0.0.0"
        in log.read_text()
    )


@pytest.mark.parametrize("problem", ["port_taken", "ledger_unwritable"])
def test_start_up_failures_are_one_clear_line(tmp_path, problem):
    import socket
    import subprocess

    config = tmp_path / "config.yaml"
    ledger = "/proc/no-such-dir/ledger.sqlite3" if problem == "ledger_unwritable" else str(tmp_path / "l.sqlite3")
    config.write_text(config_text("http://127.0.0.1:9", "mistralai/mistral-7b-instruct", ledger))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1] if problem == "port_taken" else free_port()
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's package, whatever the venv installed
        )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    expected = (
        f"orproxy: cannot listen on 127.0.0.1:{port}"
        if problem == "port_taken"
        else "orproxy: cannot open the ledger at /proc/no-such-dir/ledger.sqlite3 (ledger.path)"
    )
    assert last.startswith(expected), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.realtime  # a real server process and real signals
async def test_a_second_sigterm_while_draining_does_not_cut_the_drain_short(emulator, tmp_path):
    """A supervisor and an operator both asking (or Ctrl-C twice): the second signal is said, not
    obeyed. Obeyed, it cut the ledger's close short and the process hung at exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ledger_path = tmp_path / "ledger.sqlite3"
    config = tmp_path / "config.yaml"
    config.write_text(config_text(emulator.url, "mistralai/mistral-7b-instruct", ledger_path))
    log = tmp_path / "proxy.log"
    proc = await start_proxy(config, log, port)
    try:
        async with asyncio.timeout(30), aiohttp.ClientSession() as session:
            await wait_until_up(url, proc, log)
            status, _, request_id = await ask(session, url)
            assert status == 200
        proc.send_signal(signal.SIGTERM)
        for pause in (0.002, 0.005, 0.01):  # apart, so the kernel does not merge them into one
            await asyncio.sleep(pause)
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert "orproxy stopped" in log.read_text()
        ledger = await Ledger.open(ledger_path)
        try:
            assert [row.request_id for row in await ledger.rows()] == [request_id]
        finally:
            await ledger.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
