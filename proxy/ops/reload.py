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
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from watchfiles import awatch

from proxy.config import Config, ConfigError, load_config
from proxy.core.breakers import CircuitBreakers
from proxy.core.pricing import Catalogue, PriceBook
from proxy.core.ratelimits import RateLimits
from proxy.money.accounting import Accountant, recorded_spend
from proxy.money.catalogue import catalogue_warnings, load_catalogue_source
from proxy.ops.metrics import Metrics
from proxy.ops.runtime import RuntimeRef, build_runtime

log = logging.getLogger("orproxy")
RESTART_ONLY = ("listen", "ledger")  # read once at start: a change is reported, not applied


@dataclass
class ReloadStatus:
    config_path: str
    loaded_at: float
    last_attempt_at: float | None = None
    last_result: str | None = None  # success | failure | unchanged
    last_trigger: str | None = None
    last_errors: list[str] = field(default_factory=list)
    last_warnings: list[str] = field(default_factory=list)
    successes: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Reloader:
    def __init__(
        self,
        path: Path,
        runtimes: RuntimeRef,
        accountant: Accountant,
        metrics: Metrics,
        breakers: CircuitBreakers,
        ratelimits: RateLimits,
        env: Mapping[str, str],
        registry: CollectorRegistry,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self._runtimes = runtimes
        self._accountant = accountant
        self._metrics = metrics
        self._breakers = breakers
        self._ratelimits = ratelimits
        self._env = env
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
        for result in ("success", "failure"):
            self._reloads.labels(result)

    async def reload(self, trigger: str) -> ReloadStatus:
        async with self._lock:  # one reload at a time; a burst of edits is applied in order
            now = self._clock()
            self.status.last_attempt_at, self.status.last_trigger = now, trigger
            try:
                config = await asyncio.to_thread(load_config, self.path)
                source = await asyncio.to_thread(load_catalogue_source, config)
                catalogue = source.catalogue
                ledger = self._accountant.ledger
                day = month = None
                if ledger is not None:
                    day, month = await recorded_spend(ledger, self._accountant.book)
            except ConfigError as exc:
                return self._failed([issue.render(exc.filename) for issue in exc.issues])
            except (OSError, ValueError) as exc:
                return self._failed([f"{self.path}: {exc}"])
            self._apply(config, catalogue, day, month)
            return self.status

    def _apply(
        self, config: Config, catalogue: Catalogue, day: Mapping[str, float] | None, month: Mapping[str, float] | None
    ) -> None:
        """The swap: synchronous, so a request sees all of the old config or all of the new."""
        now = self._clock()
        current = self._runtimes.current.config
        warnings = [
            f"`{name}` changed: it takes effect at the next restart"
            for name in RESTART_ONLY
            if getattr(config, name) != getattr(current, name)
        ]
        warnings += catalogue_warnings(config, catalogue)
        runtime = build_runtime(config, self._env, self._breakers, self._ratelimits, previous=self._runtimes.current)
        self._runtimes.swap(runtime)
        self._accountant.prices = PriceBook(catalogue, config.pricing)
        self._accountant.book.reconfigure(config.budget, config.keys, now, day, month)
        self._metrics.reconfigure(config)
        self.status.loaded_at = now
        self.status.last_result = "success"
        self.status.last_errors, self.status.last_warnings = [], warnings
        self.status.successes += 1
        self._reloads.labels("success").inc()
        self._last_success.set(now)
        for warning in warnings:
            log.warning("config reload: %s", warning)
        log.info(
            "config reloaded from %s (%s): %d virtual models", self.path, self.status.last_trigger, len(config.models)
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
