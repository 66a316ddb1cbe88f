"""Serving the app until a signal: the runner over `GuardedServer`, the start-up warning about the
file limit, the drain on SIGTERM/SIGINT (requests in flight get `shutdown_timeout_s`), and a
second signal during the drain said, not obeyed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from proxy.http.appkeys import RUNTIME
from proxy.http.server import GuardedServer, connection_cap

log = logging.getLogger("orproxy")


class ProxyRunner(web.AppRunner):
    """aiohttp's AppRunner serving through a GuardedServer, with the limits of the snapshot serving."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        runtimes = self.app[RUNTIME]
        return GuardedServer.like(plain, lambda: runtimes.current.config.server)


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    on_bound: Callable[[], None],
    reuse_port: bool = False,
) -> None:
    """Run `app` until SIGTERM or SIGINT, then stop accepting, let requests in flight finish within
    `shutdown_timeout` and run the cleanup contexts (what `web.run_app` does, on a ProxyRunner)."""
    runner = ProxyRunner(
        app, handle_signals=True, access_log=None, handler_cancellation=True, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        # reuse_port: the workers of `serve --workers N` bind one port, and the kernel spreads connections.
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
        await site.start()
        server = runner.server
        if isinstance(server, GuardedServer):
            limits = server.limits()
            cap = connection_cap(limits.max_connections, server.soft_file_limit)
            if cap < limits.max_connections:
                log.warning(
                    "server.max_connections is %d, but the limit on open files (ulimit -n %d) carries %d client "
                    "connections with their upstream ones: %d it is",
                    limits.max_connections,
                    server.soft_file_limit,
                    cap,
                    cap,
                )
        on_bound()
        await asyncio.Event().wait()  # until a signal raises GracefulExit out of the loop
    finally:
        await runner.cleanup()


def run(app: web.Application, host: str, port: int, *, shutdown_timeout: float, loop: asyncio.AbstractEventLoop,
        on_bound: Callable[[], None], reuse_port: bool = False) -> None:  # fmt: skip
    """Serve on `loop` until a signal; start-up errors (a taken port, StartupError) propagate."""
    task = loop.create_task(
        serve(app, host, port, shutdown_timeout=shutdown_timeout, on_bound=on_bound, reuse_port=reuse_port)
    )
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        _stopping_already(loop, shutdown_timeout)
        # The serving task first: its cleanup lets requests in flight finish. Then whatever is left.
        for batch in ([task], [t for t in asyncio.all_tasks(loop) if not t.done()]):
            for leftover in batch:
                leftover.cancel()
            loop.run_until_complete(asyncio.gather(*batch, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _stopping_already(loop: asyncio.AbstractEventLoop, shutdown_timeout: float) -> None:
    """While draining, another SIGTERM or SIGINT (a supervisor and an operator both asking, Ctrl-C
    pressed twice) is said, not obeyed: raised inside the drain, it would cut the ledger's flush
    short and leave the process hanging at exit on a thread nobody stopped."""

    def again(name: str) -> None:
        log.warning(
            "%s: already stopping; requests in flight get up to %g s (shutdown_timeout_s)", name, shutdown_timeout
        )

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # no signals here (a thread)
            loop.add_signal_handler(signum, again, signal.Signals(signum).name)
