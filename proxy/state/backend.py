"""The shared state of one process, as the config's `state` section says: built by the app factory,
started once the ledger is open (seeding the counters from it), and kept in step in the background.

`local` is the in-process state of a single process. `redis` puts the spend book, the breakers and
rate-limit blocks and the response cache on Redis: the book is read and written on the request
path (one round trip before the upstream call, one after); blocks are published and read every
`SYNC_S` by one background task, which also refreshes the figures reports read and, after an
outage, waits for Redis, re-seeds it from the ledger and marks it up again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.cache.policy import CachePolicy
from proxy.cache.response_cache import CacheStore, StoreOpener
from proxy.config import State
from proxy.core.breakers import CircuitBreakers
from proxy.core.budget import BudgetCalendar, SpendCounters
from proxy.core.policy import Policy
from proxy.core.ratelimits import RateLimits
from proxy.state.batch import PackedInC
from proxy.state.blocks import BlockSync, SharedBreakers, SharedRateLimits
from proxy.state.cache import RedisCache
from proxy.state.health import StateHealth
from proxy.state.redis_spend import RedisSpend
from proxy.state.spend import LocalSpend, SpendStore

log = logging.getLogger("orproxy")
SYNC_S = 0.5  # blocks published and read, figures refreshed, an outage probed: this often
LedgerSpend = Callable[[], Awaitable[tuple[Mapping[str, float], Mapping[str, float]]]]


class StateConfigError(ValueError):
    """The state section names something that is not there (an unset url_env)."""


@dataclass(frozen=True, slots=True)
class SharedState:
    """The long-lived state every snapshot reads: spend, breakers, rate-limit readings, and where
    they live (`spend` is the book's store; `redis` is None on the local backend)."""

    counters: SpendCounters
    breakers: CircuitBreakers
    ratelimits: RateLimits
    clock: Callable[[], float] = time.time  # the wall clock of budgets, breakers and blocks (injected in tests)
    spend: SpendStore = field(default_factory=LocalSpend)
    redis: RedisState | None = None

    @property
    def backend(self) -> str:
        return "local" if self.redis is None else "redis"

    def cache_opener(self) -> StoreOpener | None:
        return None if self.redis is None else self.redis.open_cache

    def status(self) -> dict[str, object]:
        if self.redis is None:
            return {"backend": "local"}
        return {"backend": "redis", **self.redis.health.as_dict(), "spend_book": self.redis.spend.batching()}


def open_state(config: State, env: Mapping[str, str], tz: str, clock: Callable[[], float]) -> SharedState:
    counters = SpendCounters(tz, clock())
    if config.backend == "local":
        return SharedState(counters, CircuitBreakers(), RateLimits(clock=clock), clock)
    breakers, ratelimits = SharedBreakers(), SharedRateLimits(clock)
    redis = RedisState(config, env, counters, breakers, ratelimits, clock)
    return SharedState(counters, breakers, ratelimits, clock, redis.spend, redis)


def redis_url(config: State, env: Mapping[str, str]) -> str:
    if config.url is not None:
        return config.url
    url = env.get(config.url_env or "", "").strip()
    if not url:
        raise StateConfigError(
            f"state.url_env names {config.url_env}, which is not set: export it with the Redis URL "
            "(redis://host:6379/0), or set state.url"
        )
    return url


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisState:
    def __init__(
        self,
        config: State,
        env: Mapping[str, str],
        counters: SpendCounters,
        breakers: SharedBreakers,
        ratelimits: SharedRateLimits,
        clock: Callable[[], float],
    ) -> None:
        url = redis_url(config, env)
        timeout = config.timeout_ms / 1000
        # No retry: a script whose reply was lost may have run, and running a settlement twice would
        # count its cost twice. A failed call is an outage (on_state_error), over within SYNC_S when
        # Redis answers again (a restarted Redis costs one failed batch on the dead connection).
        # Commands packed in C (hiredis); a rediss:// or unix:// URL picks redis-py's own connection.
        self.client = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            connection_class=PackedInC,
        )
        self.prefix = config.prefix
        self.health = StateHealth(_without_password(url), config.on_state_error)
        self.spend = RedisSpend(self.client, config.prefix, counters, self.health, clock)
        self.blocks = BlockSync(self.client, config.prefix, breakers, ratelimits)
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def open_cache(self, path: Path, policy: CachePolicy) -> CacheStore:
        cache = RedisCache(self.client, self.prefix, self.health, self._clock)
        await cache.evict(policy)
        return cache

    async def start(self, ledger_spend: LedgerSpend, policy: Callable[[], Policy | None]) -> None:
        """Seed from the ledger (max, never added), then keep in step in the background. Redis away
        at start-up is an outage like any other: the proxy starts, `on_state_error` applies."""
        try:
            await self.spend.seed(*await ledger_spend())
        except RedisError as exc:
            self.health.failed(exc, self._clock())
        else:
            log.info("shared state: Redis at %s, keys under %r; counters seeded", self.health.where, self.prefix)
        self._task = asyncio.create_task(self._keep_in_step(ledger_spend, policy), name="shared-state")

    async def _keep_in_step(self, ledger_spend: LedgerSpend, policy: Callable[[], Policy | None]) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            await self.step(ledger_spend, policy())

    async def step(self, ledger_spend: LedgerSpend, policy: Policy | None) -> None:
        """One round of the background work (tests call it to skip the wait)."""
        now = self._clock()
        try:
            if not self.health.up:
                await self.spend.seed(*await ledger_spend())
                self.health.recovered()
            await self.blocks.sync(now)
            await self.spend.renew(now)
            if policy is not None:
                await self.spend.read(self.spend.scopes_of(policy), now)
        except RedisError as exc:
            self.health.failed(exc, now)
        except Exception:
            log.exception("shared state: background sync failed")

    async def seed(
        self, day: Mapping[str, float], month: Mapping[str, float], calendar: BudgetCalendar | None = None
    ) -> None:
        """Counters of `calendar`'s windows seeded from the ledger (a reload to another time zone);
        Redis away is an outage like any other, re-seeded when it is back."""
        try:
            await self.spend.seed(day, month, calendar)
        except RedisError as exc:
            self.health.failed(exc, self._clock())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.spend.drain()  # settlements still queued
        await self.client.aclose()
