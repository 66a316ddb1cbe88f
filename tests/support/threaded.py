"""A proxy and its emulator served from a thread with its own event loop, for tests that drive them
from plain blocking code (hypothesis, raw sockets, http.client) or from many OS-level connections."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy.config import parse_config
from proxy.emulator import create_emulator_app
from proxy.http.app import create_app
from proxy.http.serving import ProxyRunner
from tests.support.gateway import UPSTREAM_KEY

ENV = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY}


@dataclass
class Served:
    port: int
    emulator_port: int
    app: web.Application
    loop: asyncio.AbstractEventLoop
    runner: ProxyRunner

    def call(self, coro) -> object:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)


@contextmanager
def threaded_proxy(config_text: str, tmp: Path, env: Mapping[str, str] | None = None) -> Iterator[Served]:
    """`config_text` may name `{emulator}`, the emulator's base URL."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()
    served: dict[str, object] = {}
    failure: list[BaseException] = []

    async def main() -> None:
        emulator = web.AppRunner(create_emulator_app(api_key=UPSTREAM_KEY), access_log=None)
        await emulator.setup()
        site = web.TCPSite(emulator, "127.0.0.1", 0)
        await site.start()
        emulator_port = emulator.addresses[0][1]
        config_path = tmp / "config.yaml"
        config_path.write_text(config_text.replace("{emulator}", f"http://127.0.0.1:{emulator_port}"))
        config = parse_config(config_path.read_text(), str(config_path))
        app = create_app(
            config,
            env={**ENV, **(env or {})},
            ledger_path=tmp / "ledger.sqlite3",
            cache_path=tmp / "cache.sqlite3",
            config_path=config_path,
        )
        runner = ProxyRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        proxy_site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await proxy_site.start()
        served.update(port=runner.addresses[0][1], emulator_port=emulator_port, app=app, runner=runner)
        started.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await emulator.cleanup()

    def thread_main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=thread_main, name="threaded-proxy", daemon=True)
    thread.start()
    started.wait(30)
    if failure:
        raise failure[0]
    try:
        yield Served(served["port"], served["emulator_port"], served["app"], loop, served["runner"])  # type: ignore[arg-type]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
