"""The app factory: the one place that builds resources, owns their lifetimes
(cleanup_ctx) and wires routes and middlewares."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path

from aiohttp import web

from .accounting import Accountant, Sink, log_access
from .admin import AdminRoutes
from .app_keys import ACCOUNTANT, BREAKERS, CONFIG, RUNTIME
from .budget import SpendBook
from .config import Config
from .handlers import ChatHandler, error_middleware, healthz, list_models
from .health import CircuitBreakers
from .ledger import Ledger
from .pricing import Catalogue, PriceBook
from .runtime import RuntimeRef, build_runtime, warn_missing_keys

log = logging.getLogger("orproxy")


def create_app(config: Config, *, env: Mapping[str, str] | None = None, sinks: Iterable[Sink] = (),
               ledger_path: str | Path | None = None, clock: Callable[[], float] = time.time) -> web.Application:
    """Build the proxy for `config`. Upstream and client keys are read from `env` (default: os.environ);
    the ledger lives at `ledger_path` (default: the config's `ledger.path`)."""
    env = os.environ if env is None else env
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[error_middleware])
    app[CONFIG] = config
    app[BREAKERS] = CircuitBreakers(config.retry.cooldown)
    prices = PriceBook(Catalogue.load(config.pricing.catalogue), config.pricing)
    accountant = Accountant(prices, SpendBook(config.budget, config.keys, clock()), None,
                            [log_access] if config.logging.access_log else [], clock)
    for sink in sinks:
        accountant.add_sink(sink)
    app[ACCOUNTANT] = accountant
    app.cleanup_ctx.append(_ledger(Path(ledger_path or config.ledger.path), config, clock))
    app.cleanup_ctx.append(_upstreams(env))

    chat = ChatHandler(app[BREAKERS], accountant).chat_completions
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/api/v1/chat/completions", chat)  # clients configured with OpenRouter's own path
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    admin_key = env.get(config.admin.key_env or "", "") if config.admin.key_env else ""
    if admin_key:
        AdminRoutes(admin_key, accountant, config).register(app.router)
    elif config.admin.key_env:
        log.warning("admin routes are off: the environment variable %s is not set", config.admin.key_env)
    return app


def _ledger(path: Path, config: Config, clock: Callable[[], float]):
    async def context(app: web.Application) -> AsyncIterator[None]:
        accountant = app[ACCOUNTANT]
        ledger = await Ledger.open(path, retention_days=config.ledger.retention_days,
                                   synchronous=config.ledger.synchronous, clock=clock)
        book = accountant.book
        calendar = book.calendar
        book.roll(clock())
        book.load(await ledger.spend_by_key_between(calendar.day_start),
                  await ledger.spend_by_key_between(calendar.month_start))
        accountant.ledger = ledger
        log.info("ledger %s: spend so far today $%.4f, this month $%.4f", path,
                 *(sum(amount for scope, window, amount, _ in book.snapshot() if scope == "" and window == w)
                   for w in ("daily", "monthly")))
        try:
            yield
        finally:
            accountant.ledger = None
            await ledger.close()

    return context


def _upstreams(env: Mapping[str, str]):
    async def context(app: web.Application) -> AsyncIterator[None]:
        runtime = build_runtime(app[CONFIG], env, app[BREAKERS])
        warn_missing_keys(runtime)
        app[RUNTIME] = RuntimeRef(runtime)
        try:
            yield
        finally:
            await app[RUNTIME].current.close()

    return context
