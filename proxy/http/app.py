"""The app factory: the one place that builds the long-lived state and the resources, owns their
lifetimes (cleanup_ctx) and wires the routes.

What lives as long as the process: the spend counters, breakers, rate-limit readings, metric
tallies, the ledger and the cache file. What a config decides lives in the snapshot
(`proxy.ops.runtime.Runtime`), built by `build_runtime` at start-up and on every reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.cache.response_cache import CacheSlot
from proxy.config import Config, State
from proxy.core.apis import APIS
from proxy.core.errors import Unauthorized
from proxy.core.keys import bearer_matches
from proxy.core.reconcile import SCHEDULE
from proxy.http.admin import AdminRoutes
from proxy.http.api import ApiHandler
from proxy.http.appkeys import ACCOUNTANT, CACHE, INFLIGHT, METRICS, RECONCILER, RELOADER, RUNTIME, STATE
from proxy.http.batches import BATCHES, BatchSlot, batch_context, halt_batches
from proxy.http.batches import register as register_batch_routes
from proxy.http.count_tokens import ROUTE as COUNT_TOKENS
from proxy.http.count_tokens import count_tokens
from proxy.http.errors import openai_errors, unknown_route
from proxy.http.inflight import InFlight
from proxy.http.overhead import timed
from proxy.http.routes import explain_route, healthz, list_models, retrieve_model
from proxy.money.accounting import Accountant, Sink, log_access, recorded_spend
from proxy.money.catalogue import catalogue_warnings, load_catalogue_source
from proxy.money.ledger_api import LedgerStore, LedgerUnavailable, open_ledger
from proxy.money.reconcile import Reconciler
from proxy.ops.credits import poll_credits
from proxy.ops.fleet import FleetFiles
from proxy.ops.metrics import Metrics, StateCollector
from proxy.ops.reload import Reloader, reload_context
from proxy.ops.runtime import RuntimeRef, build_runtime, cache_policy, snapshot_warnings
from proxy.state.backend import StateConfigError, open_state

log = logging.getLogger("orproxy")
# aiohttp's own cap on a request body; the config's `max_body_bytes` is enforced per request
# (so a reload can change it), and this only bounds what aiohttp would buffer for it.
HARD_BODY_LIMIT = 1 << 31


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
    reconcile_schedule: Sequence[float] | None = None,
    fleet: Path | None = None,
) -> web.Application:
    """Build the proxy for `config`. Upstream and client keys are read from `env` (default: os.environ);
    the ledger lives at `ledger_path` (default: the config's `ledger.path`); metrics go to `registry`
    (default: a new one, never the process-global registry). With `config_path`, the config is
    reloaded on SIGHUP, POST /admin/reload and (if `watch_config`) when the file changes.
    `reconcile_schedule`: the seconds before each lookup of an estimated cost (tests shorten it).
    `fleet`: the metrics directory of `serve --workers N`, whose workers' metrics every scrape sums."""
    env = os.environ if env is None else env
    app = web.Application(client_max_size=HARD_BODY_LIMIT)
    try:
        state = open_state(config.state, env, config.budget.timezone, clock)
    except StateConfigError as exc:  # refused at start-up, where the other resources are refused
        state = open_state(State(), env, config.budget.timezone, clock)
        app.cleanup_ctx.append(_refuse(str(exc)))
    fleet_files = FleetFiles(fleet) if fleet is not None else None
    metrics = Metrics(registry or CollectorRegistry(auto_describe=True), fleet_files)
    runtimes = RuntimeRef()
    accountant_ref: list[Accountant] = []  # the reconciler reads the ledger the accountant has open
    schedule = tuple(reconcile_schedule) if reconcile_schedule is not None else SCHEDULE
    reconciler = Reconciler(runtimes, lambda: accountant_ref[0].ledger, clock, schedule=schedule, spend=state.spend)
    accountant = Accountant((metrics.observe, log_access, reconciler.observe, *sinks), clock, state.spend)
    accountant_ref.append(accountant)
    inflight = InFlight()
    cache = CacheSlot(clock, state.cache_opener())
    collector = StateCollector(metrics, runtimes.peek, state.breakers, state.ratelimits, cache, clock, state.redis)
    metrics.registry.register(collector)
    if fleet_files is not None:
        app.cleanup_ctx.append(_fleet_figures(collector, fleet_files))
    app[STATE], app[METRICS], app[ACCOUNTANT], app[RUNTIME], app[CACHE] = state, metrics, accountant, runtimes, cache
    app[RECONCILER], app[INFLIGHT] = reconciler, inflight
    cache_file = Path(cache_path) if cache_path is not None else None
    ledger_file = Path(ledger_path or config.ledger.path)
    app[BATCHES] = BatchSlot()
    app.cleanup_ctx.append(_ledger(ledger_file, config, env, clock))
    app.cleanup_ctx.append(_response_cache(config, cache_file))
    app.cleanup_ctx.append(_first_runtime(config, env))
    if state.redis is not None:
        app.cleanup_ctx.append(_shared_state)
    app.cleanup_ctx.append(_reconciliation)
    app.cleanup_ctx.append(batch_context(config, env, ledger_file))
    # Last in, so first out: upstream work still running is waited for (or cancelled, and booked)
    # while the upstream clients and the ledger are still open.
    app.cleanup_ctx.append(_in_flight_work(config.shutdown_timeout_s))
    app.on_shutdown.append(lambda app: _shutdown_began(app, config.shutdown_timeout_s))
    app.on_shutdown.append(halt_batches)  # no new batch line once shutdown begins
    app.cleanup_ctx.append(_credit_poller)
    if config_path is not None:
        app[RELOADER] = Reloader(
            Path(config_path),
            config,
            env,
            runtimes,
            state,
            accountant,
            cache,
            metrics.registry,
            clock,
            cache_path=cache_file,
        )
        app.cleanup_ctx.append(reload_context(RELOADER, config.watch_config))

    for api in APIS:
        handler = timed(
            openai_errors(ApiHandler(api, state, accountant, metrics.gauges, inflight), api.error_style),
            metrics.overhead_of(api.name),
        )
        for route in api.routes:
            app.router.add_post(route, handler)
            app.router.add_post("/api" + route, handler)  # clients configured with OpenRouter's own paths
    for route in (COUNT_TOKENS, "/api" + COUNT_TOKENS):  # answered here: OpenRouter has no count_tokens
        app.router.add_post(route, timed(openai_errors(count_tokens, "anthropic")))
    app.router.add_post("/v1/route/explain", openai_errors(explain_route))
    for prefix in ("/v1", "/api/v1"):
        app.router.add_get(f"{prefix}/models", openai_errors(list_models))
        app.router.add_get(f"{prefix}/models/{{model:.+}}", openai_errors(retrieve_model))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", openai_errors(metrics_endpoint))
    AdminRoutes().register(app.router)
    register_batch_routes(app.router)
    app.router.add_route("*", "/{tail:.*}", unknown_route)  # last: only what nothing else matched
    return app


def _ledger(path: Path, config: Config, env: Mapping[str, str], clock: Callable[[], float]):
    async def context(app: web.Application) -> AsyncIterator[None]:
        accountant, counters = app[ACCOUNTANT], app[STATE].counters
        try:
            gauges = app[METRICS].gauges
            ledger = await open_ledger(config, env, path=path, clock=clock, busy=lambda: gauges.in_flight)
        except LedgerUnavailable as exc:
            raise StartupError(str(exc)) from exc
        counters.roll(clock())
        counters.load(*await recorded_spend(ledger, counters.calendar))
        accountant.ledger = ledger
        pruner = asyncio.create_task(_prune_daily(ledger, app[RUNTIME]))
        total = counters.scope("")
        log.info("ledger %s: spend so far today $%.4f, this month $%.4f", ledger.where, total.day, total.month)
        try:
            yield
        finally:
            pruner.cancel()
            await asyncio.gather(pruner, return_exceptions=True)
            accountant.ledger = None
            await ledger.close()

    return context


def _response_cache(config: Config, path: Path | None):
    async def context(app: web.Application) -> AsyncIterator[None]:
        slot = app[CACHE]
        if config.cache.enabled:
            where = path or Path(config.cache.path)
            try:
                await slot.open(where, cache_policy(config))
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(
                    f"cannot open the response cache at {where} (cache.path): {exc}; check that its "
                    "directory is writable, or set `cache: {enabled: false}`"
                ) from exc
        try:
            yield
        finally:
            await slot.close()

    return context


def _first_runtime(config: Config, env: Mapping[str, str]):
    async def context(app: web.Application) -> AsyncIterator[None]:
        # The catalogue pinned by pricing.catalogue, else the one `orproxy models refresh` fetched, else the snapshot.
        source = await asyncio.to_thread(load_catalogue_source, config)
        cache = await app[CACHE].view(cache_policy(config))
        runtime = build_runtime(
            config, env, source.catalogue, app[STATE], cache=cache, catalogue_source=source.describe()
        )
        for warning in snapshot_warnings(runtime) + catalogue_warnings(config, source.catalogue):
            log.warning("%s", warning)
        app[RUNTIME].start(runtime)
        try:
            yield
        finally:
            await app[RUNTIME].close()

    return context


def _refuse(problem: str):
    async def context(app: web.Application) -> AsyncIterator[None]:
        raise StartupError(problem)
        yield

    return context


async def _shared_state(app: web.Application) -> AsyncIterator[None]:
    """Redis seeded from the ledger (max, never added) and kept in step until shutdown; closed after
    the requests in flight have settled (their contexts close first)."""
    redis, counters = app[STATE].redis, app[STATE].counters
    assert redis is not None
    ledger = app[ACCOUNTANT].ledger

    async def ledger_spend() -> tuple[dict[str, float], dict[str, float]]:
        if ledger is None:
            return {}, {}
        counters.roll(app[STATE].clock())
        return await recorded_spend(ledger, counters.calendar)

    runtimes = app[RUNTIME]
    await redis.start(ledger_spend, lambda: runtime.policy if (runtime := runtimes.peek()) else None)
    try:
        yield
    finally:
        await redis.close()


async def _reconciliation(app: web.Application) -> AsyncIterator[None]:
    """Estimated costs left by earlier runs are queued again; new ones arrive through the sink."""
    reconciler = app[RECONCILER]
    ledger = app[ACCOUNTANT].ledger
    if ledger is not None:
        await reconciler.load_pending(ledger)
    task = asyncio.create_task(reconciler.run(), name="reconciliation")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _fleet_figures(collector: StateCollector, files: FleetFiles):
    """A worker's per-process gauges (in flight, cache hits), written out every second for the
    worker that is scraped to sum; a last time at exit."""

    async def write_out() -> None:
        while True:
            await asyncio.sleep(1.0)
            collector.write_out()

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(write_out())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            collector.write_out()
            files.close()

    return context


async def _shutdown_began(app: web.Application, timeout_s: float) -> None:
    app[INFLIGHT].shutdown_began(timeout_s)


def _in_flight_work(timeout_s: float):
    async def context(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[INFLIGHT].drain(timeout_s)

    return context


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Open while the proxy is (no client keys); else the admin key or metrics.key_env's: the metrics
    name keys and show what each spends."""
    runtime = request.app[RUNTIME].current
    if runtime.policy.keys.enabled:
        presented = request.headers.get("Authorization")
        if not any(secret and bearer_matches(presented, secret) for secret in (runtime.metrics_key, runtime.admin_key)):
            names = " or ".join(
                f"the value of {env}" for env in (runtime.config.metrics.key_env, runtime.config.admin.key_env) if env
            )
            raise Unauthorized(
                "GET /metrics needs `Authorization: Bearer <key>` while client keys are configured: "
                + (names or "set metrics.key_env (a scraper's key) or admin.key_env in the config")
                + "."
            )
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _credit_poller(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(poll_credits(app[RUNTIME], app[METRICS].gauges))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _prune_daily(ledger: LedgerStore, runtimes: RuntimeRef) -> None:
    """ledger.retention_days, enforced while running too, not only at start-up."""
    while True:
        await asyncio.sleep(6 * 3600)
        await prune_ledger(ledger, runtimes)


async def prune_ledger(ledger: LedgerStore, runtimes: RuntimeRef) -> int:
    """One round of pruning, with the retention of the config now serving; housekeeping never raises."""
    try:
        removed = await ledger.prune(retention_days=runtimes.current.config.ledger.retention_days)
    except Exception:
        log.exception("ledger pruning failed")
        return 0
    if removed:
        log.info("ledger: pruned %d rows older than the retention period", removed)
    return removed
