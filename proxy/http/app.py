"""The app factory: the one place that builds resources, owns their lifetimes
(cleanup_ctx) and wires routes and middlewares."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

from proxy.cache.store import CachePolicy, ResponseCache
from proxy.config import Config
from proxy.core.breakers import CircuitBreakers
from proxy.core.budget import SpendBook
from proxy.core.pricing import PriceBook
from proxy.core.ratelimits import RateLimits
from proxy.http.admin import AdminRoutes
from proxy.http.appkeys import ACCOUNTANT, BREAKERS, CACHE, CONFIG, METRICS, RATELIMITS, RELOADER, RUNTIME
from proxy.http.chat import ChatHandler, healthz, list_models
from proxy.http.errors import openai_errors, unknown_route
from proxy.money.accounting import Accountant, Sink, log_access, recorded_spend
from proxy.money.catalogue import load_catalogue_source
from proxy.money.ledger import Ledger
from proxy.ops.credits import poll_credits
from proxy.ops.metrics import Metrics, StateCollector
from proxy.ops.reload import Reloader, reload_context
from proxy.ops.runtime import RuntimeRef, build_runtime, warn_missing_keys

log = logging.getLogger("orproxy")


class StartupError(RuntimeError):
    """A resource the proxy needs could not be opened; the message says which and what to do."""


def create_app(
    config: Config,
    *,
    env: Mapping[str, str] | None = None,
    sinks: Iterable[Sink] = (),
    ledger_path: str | Path | None = None,
    clock: Callable[[], float] = time.time,
    registry: CollectorRegistry | None = None,
    config_path: str | Path | None = None,
    cache_path: str | Path | None = None,
) -> web.Application:
    """Build the proxy for `config`. Upstream and client keys are read from `env` (default: os.environ);
    the ledger lives at `ledger_path` (default: the config's `ledger.path`); metrics go to `registry`
    (default: a new one, never the process-global registry). With `config_path`, the config is
    reloaded on SIGHUP, POST /admin/reload and (if `watch_config`) when the file changes."""
    env = os.environ if env is None else env
    app = web.Application(client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[BREAKERS] = CircuitBreakers()
    # The catalogue pinned by pricing.catalogue, else the one `orproxy models refresh` fetched, else the snapshot.
    prices = PriceBook(load_catalogue_source(config).catalogue, config.pricing)
    accountant = Accountant(
        prices,
        SpendBook(config.budget, config.keys, clock()),
        None,
        [log_access] if config.logging.access_log else [],
        clock,
    )
    metrics = Metrics(registry or CollectorRegistry(auto_describe=True), config)
    accountant.add_sink(metrics.observe)
    for sink in sinks:
        accountant.add_sink(sink)
    app[ACCOUNTANT] = accountant
    app[METRICS] = metrics
    app[RATELIMITS] = RateLimits(clock=clock)
    metrics.registry.register(StateCollector(metrics, accountant.book, app[BREAKERS], app[RATELIMITS], clock))
    metrics.gauges.downgrade_step = _downgrade_step(accountant, clock)
    app.cleanup_ctx.append(_ledger(Path(ledger_path or config.ledger.path), config, clock))
    app.cleanup_ctx.append(_upstreams(env))
    app.cleanup_ctx.append(_response_cache(Path(cache_path or config.cache.path), config, clock))
    app.cleanup_ctx.append(_credit_poller)
    if config_path is not None:
        app.cleanup_ctx.append(_reloader(Path(config_path), env, clock))
        app.cleanup_ctx.append(reload_context(RELOADER, config.watch_config))

    handler = ChatHandler(app[BREAKERS], app[RATELIMITS], accountant, metrics.gauges)
    chat = openai_errors(handler.chat_completions)
    app.router.add_post("/v1/route/explain", openai_errors(handler.explain))
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/api/v1/chat/completions", chat)  # clients configured with OpenRouter's own path
    app.router.add_get("/v1/models", openai_errors(list_models))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    admin_key = env.get(config.admin.key_env or "", "") if config.admin.key_env else ""
    if admin_key:
        AdminRoutes(admin_key, config.admin.key_env or "").register(app.router)
    elif config.admin.key_env:
        log.warning("admin routes are off: the environment variable %s is not set", config.admin.key_env)
    app.router.add_route("*", "/{tail:.*}", unknown_route)  # last: only what nothing else matched
    return app


def _ledger(path: Path, config: Config, clock: Callable[[], float]):
    async def context(app: web.Application) -> AsyncIterator[None]:
        accountant = app[ACCOUNTANT]
        try:
            ledger = await Ledger.open(
                path, retention_days=config.ledger.retention_days, synchronous=config.ledger.synchronous, clock=clock
            )
        except (OSError, sqlite3.Error) as exc:
            raise StartupError(
                f"cannot open the ledger at {path} (ledger.path): {exc}; "
                "check that its directory exists or can be created, and is writable"
            ) from exc
        book = accountant.book
        book.roll(clock())
        book.load(*await recorded_spend(ledger, book))
        accountant.ledger = ledger
        pruner = asyncio.create_task(_prune_daily(ledger))
        log.info(
            "ledger %s: spend so far today $%.4f, this month $%.4f",
            path,
            *(
                sum(amount for scope, window, amount, _ in book.snapshot() if scope == "" and window == w)
                for w in ("daily", "monthly")
            ),
        )
        try:
            yield
        finally:
            pruner.cancel()
            await asyncio.gather(pruner, return_exceptions=True)
            accountant.ledger = None
            await ledger.close()

    return context


def _response_cache(path: Path, config: Config, clock: Callable[[], float]):
    async def context(app: web.Application) -> AsyncIterator[None]:
        if not config.cache.enabled:
            yield
            return
        cfg = config.cache
        try:
            cache = await ResponseCache.open(
                path, CachePolicy(True, cfg.ttl_s, cfg.max_entries, cfg.max_entry_bytes), clock=clock
            )
        except (OSError, sqlite3.Error) as exc:
            raise StartupError(
                f"cannot open the response cache at {path} (cache.path): {exc}; check that its "
                "directory is writable, or set `cache: {enabled: false}`"
            ) from exc
        app[CACHE] = cache
        app[METRICS].gauges.extra.append(lambda: _cache_counters(cache))
        try:
            yield
        finally:
            await cache.close()

    return context


def _cache_counters(cache: ResponseCache) -> Iterator[Metric]:
    hits = CounterMetricFamily("orproxy_cache_hits", "Requests answered from the response cache")
    hits.add_metric([], cache.hits)
    misses = CounterMetricFamily("orproxy_cache_misses", "Cacheable requests that had to go upstream")
    misses.add_metric([], cache.misses)
    return iter((hits, misses))


def _reloader(path: Path, env: Mapping[str, str], clock: Callable[[], float]):
    async def context(app: web.Application) -> AsyncIterator[None]:
        metrics = app[METRICS]
        app[RELOADER] = Reloader(
            path, app[RUNTIME], app[ACCOUNTANT], metrics, app[BREAKERS], app[RATELIMITS], env, metrics.registry, clock
        )
        yield

    return context


def _downgrade_step(accountant: Accountant, clock: Callable[[], float]) -> Callable[[], int]:
    def current() -> int:
        book = accountant.book
        step = book.downgrade_step(book.fraction(None, clock()))
        return step[0] if step else -1

    return current


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _credit_poller(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(poll_credits(app[RUNTIME], app[METRICS].gauges))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _prune_daily(ledger: Ledger) -> None:
    """ledger.retention_days, enforced while running too, not only at start-up."""
    while True:
        await asyncio.sleep(6 * 3600)
        try:
            removed = await ledger.prune()
        except Exception:
            log.exception("ledger pruning failed")
        else:
            if removed:
                log.info("ledger: pruned %d rows older than the retention period", removed)


def _upstreams(env: Mapping[str, str]):
    async def context(app: web.Application) -> AsyncIterator[None]:
        runtime = build_runtime(app[CONFIG], env, app[BREAKERS], app[RATELIMITS])
        warn_missing_keys(runtime)
        app[RUNTIME] = RuntimeRef(runtime)
        try:
            yield
        finally:
            await app[RUNTIME].close()

    return context
