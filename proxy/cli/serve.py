"""`orproxy serve` in one process: bind, announce, serve until a signal, say what went wrong."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Mapping

from aiohttp import web

from proxy.config import Config

log = logging.getLogger("orproxy")
YOUNG_COLLECTION_THRESHOLD = 20_000  # net allocations between collections of the youngest generation (default 700)


def serve_one(config: Config, args: argparse.Namespace) -> int:
    """One proxy process on the config (the command's `serve`, and each worker of a fleet)."""
    listen = config.listen.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    if not config.keys and args.host is None and not _is_loopback(listen.host):
        # With no client keys anyone who reaches the port spends the upstream credits: stay local
        # unless the operator says otherwise on the command line.
        log.warning(
            "no client keys are configured, so the proxy is open: binding to 127.0.0.1 instead of %s. "
            "Add `keys:` to the config, or pass --host %s to expose it anyway.",
            listen.host,
            listen.host,
        )
        listen = listen.model_copy(update={"host": "127.0.0.1"})
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    env: Mapping[str, str] = os.environ
    kinds = kind_lines(config)  # as configured: the demo points every upstream at the emulator
    if args.demo:
        from proxy.ops.demo import start_demo

        config, env = loop.run_until_complete(start_demo(config, os.environ))
    from proxy.http.app import StartupError, create_app

    app = create_app(config, env=env, config_path=None if args.demo else args.config, fleet=args.worker_dir)
    app.on_startup.append(_freeze_heap)
    served = config

    def announce() -> None:  # called once the socket is bound, not before
        log.info(
            "orproxy listening on http://%s:%d/v1 (%d virtual models: %s)",
            listen.host,
            listen.port,
            len(served.models),
            ", ".join(served.models),
        )
        for line in [data_line(served), *kinds]:
            log.info("%s", line)

    # SIGTERM/SIGINT: stop accepting, let requests in flight finish within shutdown_timeout_s, then run
    # the cleanup contexts (the ledger is flushed and closed) and exit 0.
    from proxy.http.serving import run

    try:
        run(
            app,
            listen.host,
            listen.port,
            shutdown_timeout=config.shutdown_timeout_s,
            loop=loop,
            on_bound=announce,
            reuse_port=args.worker_dir is not None,
        )
    except StartupError as exc:
        print(f"orproxy: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(f"orproxy: {listen_problem(listen.host, listen.port, exc)}", file=sys.stderr)
        return 1
    log.info("orproxy stopped")
    return 0


def data_line(config: Config) -> str:
    """Where the data goes (paths resolved against the config's folder): said once at start-up."""
    settings = config.ledger
    if settings.backend == "postgres":
        from proxy.money.ledger_api import redacted

        ledger = f"postgres {redacted(settings.dsn) if settings.dsn else '$' + str(settings.dsn_env)}"
    else:
        ledger = settings.path
    return f"data: ledger {ledger}" + (f", cache {config.cache.path}" if config.cache.enabled else "")


def kind_lines(config: Config) -> list[str]:
    """What kind each upstream is, and why: said once at start-up."""
    lines = []
    for name, upstream in config.upstreams.items():
        kind, why = upstream.inferred_kind(name)
        lines.append(f"upstream {name!r}: {upstream.base_url}, kind {kind} ({why})")
    return lines


def listen_problem(host: str, port: int, exc: OSError) -> str:
    """One line for a socket that cannot be bound, with what to do about it."""
    import errno

    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {host}:{port}: the port is already in use; "
            "stop what holds it, or pick another with --port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}:{port}: the address is not one of this machine's; pick another with --host"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _freeze_heap(app: web.Application) -> None:
    """Everything built so far lives as long as the process: keep it out of the garbage
    collector's scans, which per-request allocations would otherwise trigger over and over.

    And collect the youngest generation after 20,000 net allocations instead of 700: a request's
    objects die by reference counting, but the ones in flight (hundreds per request) tripped the
    default threshold about once per 9 requests, each collection walking all of them (~200 µs;
    measured 22 µs per request under 32 connections, none at 20,000; a parsed 58 kB body with 20
    tools alone is ~300 dicts and lists, and cost ~90 k instructions of collections that found no
    garbage). Cyclic garbage still goes, a little later: at most 20,000 objects wait for it."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. on Windows); asyncio's loop works, a little slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
