"""Hot reload that cannot break production.

Triggered by SIGHUP, by an edit to the config file (watched), or by
POST /admin/reload. The new file is read, parsed and fully validated off the
event loop; only a valid config replaces the running one, and the swap itself
is synchronous (no await between its steps), so no request ever sees half of
it. Requests in flight finish on the snapshot they started with. An invalid
edit leaves the old config serving and is reported in the log (file, line,
key path), in GET /admin/status and in the reload metrics.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from watchfiles import awatch

from proxy.cache.response_cache import CacheSlot, ResponseCache
from proxy.config import Config, ConfigError, load_config, located_error, resolve_paths
from proxy.core.budget import BudgetCalendar
from proxy.money.accounting import Accountant, recorded_spend
from proxy.money.catalogue import CatalogueSource, catalogue_errors, catalogue_warnings, load_catalogue_source
from proxy.ops.runtime import RuntimeRef, SharedState, build_runtime, cache_policy, snapshot_warnings

log = logging.getLogger("orproxy")
# Read once at start: a change to one of these (or anything under it) is reported, not applied.
RESTART_ONLY = (
    "listen",
    "ledger.backend",
    "ledger.path",
    "ledger.dsn",
    "ledger.dsn_env",
    "ledger.synchronous",
    "ledger.commit_delay_ms",
    "shutdown_timeout_s",
    "watch_config",
    "state",
)
RESULTS = ("success", "restart_required", "failure")


@dataclass
class ReloadStatus:
    config_path: str
    loaded_at: float
    last_attempt_at: float | None = None
    last_result: str | None = None  # success | restart_required | failure
    last_trigger: str | None = None
    last_errors: list[str] = field(default_factory=list)
    last_warnings: list[str] = field(default_factory=list)
    last_applied: list[str] = field(default_factory=list)  # config keys the last reload changed live
    restart_required: list[str] = field(default_factory=list)  # changed keys waiting for a restart
    catalogue: str = ""  # where prices come from
    successes: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def config_changes(old: Any, new: Any, path: str = "") -> list[str]:
    """The dotted key paths whose values differ; a list that changed is reported as a whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                changed.append(where)
            else:
                changed.extend(config_changes(old[key], new[key], where))
        return changed
    return [] if old == new else [path or "<root>"]


def needs_restart(key: str) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in RESTART_ONLY)


class Reloader:
    """Builds the next snapshot from the file and swaps it in; long-lived state is never patched."""

    def __init__(
        self,
        path: Path,
        config: Config,
        env: Mapping[str, str],
        runtimes: RuntimeRef,
        state: SharedState,
        accountant: Accountant,
        cache: CacheSlot,
        registry: CollectorRegistry,
        clock: Callable[[], float],
        *,
        cache_path: Path | None = None,
    ) -> None:
        self.path = path
        config = resolve_paths(config, path.parent)  # as the file will load: relative data paths resolved
        self._booted = config  # what the restart-only keys still are
        self._cache_path_in_use = config.cache.path if config.cache.enabled else None
        self._env = env
        self._runtimes = runtimes
        self._state = state
        self._accountant = accountant
        self._cache = cache
        self._cache_path = cache_path
        self._clock = clock
        self._lock = asyncio.Lock()
        self.status = ReloadStatus(str(path), clock())
        self._reloads = Counter(
            "orproxy_config_reloads", "Config reload attempts by result", ["result"], registry=registry
        )
        self._last_success = Gauge(
            "orproxy_config_last_success_timestamp_seconds",
            "When a config was last loaded successfully",
            registry=registry,
        )
        self._last_success.set(self.status.loaded_at)
        for result in RESULTS:
            self._reloads.labels(result)

    async def reload(self, trigger: str) -> ReloadStatus:
        async with self._lock:  # one reload at a time; a burst of edits is applied in order
            now = self._clock()
            self.status.last_attempt_at, self.status.last_trigger = now, trigger
            try:
                config = await asyncio.to_thread(load_config, self.path)
                source = await asyncio.to_thread(load_catalogue_source, config)
                errors = catalogue_errors(config, source)
                if errors:
                    raise await asyncio.to_thread(located_error, self.path, errors)
                prepared = await self._prepare(config, now)
            except ConfigError as exc:
                return self._failed([issue.render(exc.filename) for issue in exc.issues])
            except (OSError, ValueError, sqlite3.Error) as exc:
                return self._failed([f"{self.path}: {exc}"])
            self._apply(config, source, prepared)
            return self.status

    async def _prepare(self, config: Config, now: float) -> _Prepared:
        """What needs IO, done before the swap: the cache view, and a new time zone's spend."""
        current = self._runtimes.current.config
        policy = cache_policy(config)
        if config.cache.enabled and self._cache.file is None:
            await self._cache.open(self._cache_path or Path(config.cache.path), policy)
            self._cache_path_in_use = config.cache.path
        cache = await self._cache.view(policy)
        rebase = None
        ledger = self._accountant.ledger
        if config.budget.timezone != current.budget.timezone and ledger is not None:
            calendar = BudgetCalendar.at(ZoneInfo(config.budget.timezone), now)
            await ledger.flush()  # rows settled a moment ago count too
            rebase = (calendar, *await recorded_spend(ledger, calendar))
            if self._state.redis is not None:  # the shared counters of the new zone's day and month
                await self._state.redis.seed(*rebase[1:], calendar=calendar)
        dumped = config.model_dump(mode="json")
        applied = [
            key
            for key in config_changes(current.model_dump(mode="json"), dumped)
            if not needs_restart(key) and key != "cache.path"
        ]
        restart = [key for key in config_changes(self._booted.model_dump(mode="json"), dumped) if needs_restart(key)]
        if self._cache_path_in_use is not None and config.cache.path != self._cache_path_in_use:
            restart.append("cache.path")  # the file stays open where it is
        elif config.cache.path != current.cache.path:
            applied.append("cache.path")
        return _Prepared(cache, rebase, applied, restart)

    def _apply(self, config: Config, source: CatalogueSource, prepared: _Prepared) -> None:
        """The swap: synchronous, so a request sees all of the old config or all of the new."""
        now = self._clock()
        previous = self._runtimes.current
        runtime = build_runtime(
            config,
            self._env,
            source.catalogue,
            self._state,
            cache=prepared.cache,
            catalogue_source=source.describe(),
            previous=previous,
        )
        self._runtimes.swap(runtime)
        # Upstream-imposed blocks were capped by the old config's retry.max_block_s; an operator
        # who reloads wants every member given its chance again.
        lifted = self._state.ratelimits.clear()
        if prepared.rebase is not None:
            self._state.counters.rebase(*prepared.rebase)
        if config.logging.level != previous.config.logging.level:
            logging.getLogger("orproxy").setLevel(config.logging.level)
        result = "restart_required" if prepared.restart_required else "success"
        warnings = [f"`{key}` changed: it takes effect at the next restart" for key in prepared.restart_required]
        warnings += snapshot_warnings(runtime) + catalogue_warnings(config, source.catalogue)
        status = self.status
        status.loaded_at, status.last_result, status.last_errors = now, result, []
        status.last_warnings, status.last_applied = warnings, prepared.applied
        status.restart_required = prepared.restart_required
        status.catalogue = source.describe()
        status.successes += 1
        self._reloads.labels(result).inc()
        self._last_success.set(now)
        for warning in warnings:
            log.warning("config reload: %s", warning)
        log.info(
            "config reloaded from %s (%s): %d virtual models; applied: %s%s",
            self.path,
            status.last_trigger,
            len(config.models),
            ", ".join(prepared.applied) or "nothing changed",
            f"; lifted the rate-limit blocks of {', '.join(str(t) for t in lifted)}" if lifted else "",
        )

    def _failed(self, errors: list[str]) -> ReloadStatus:
        self.status.last_result = "failure"
        self.status.last_errors = errors
        self.status.failures += 1
        self._reloads.labels("failure").inc()
        log.error(
            "config reload (%s) refused; the previous config keeps serving:\n  %s",
            self.status.last_trigger,
            "\n  ".join(errors),
        )
        return self.status


@dataclass(frozen=True, slots=True)
class _Prepared:
    cache: ResponseCache | None
    rebase: tuple[BudgetCalendar, dict[str, float], dict[str, float]] | None
    applied: list[str]
    restart_required: list[str]


def reload_context(reloader_key: web.AppKey[Reloader], watch: bool):
    """cleanup_ctx: SIGHUP and (optionally) a watch on the config file trigger reloads."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        reloader = app[reloader_key]
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[Any]] = set()

        def on_sighup() -> None:
            task = loop.create_task(reloader.reload("SIGHUP"))
            pending.add(task)
            task.add_done_callback(pending.discard)

        try:
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
            has_signal = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            has_signal = False
        watcher = loop.create_task(_watch(reloader)) if watch else None
        try:
            yield
        finally:
            if has_signal:
                loop.remove_signal_handler(signal.SIGHUP)
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            for task in list(pending):
                task.cancel()

    return context


async def _watch(reloader: Reloader) -> None:
    """Watch the config's directory (editors and Kubernetes replace files by renaming)."""
    target = reloader.path.resolve()
    try:
        async for changes in awatch(
            target.parent,
            debounce=200,
            recursive=False,
            watch_filter=lambda _change, name: Path(name).resolve() == target,
        ):
            if changes:
                await reloader.reload("file change")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("watching %s for changes failed; reload with SIGHUP or POST /admin/reload", target)
