"""The Redis side of the shared state: the client, the spend book, block and cache on it, and the
background task that keeps this process in step (see proxy.state.backend for the whole picture)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.cache.policy import CachePolicy
from proxy.cache.response_cache import CacheStore
from proxy.config import State
from proxy.core.budget import BudgetCalendar, SpendCounters
from proxy.core.policy import Policy
from proxy.state.backend import redis_url, without_password
from proxy.state.batch import PackedInC
from proxy.state.blocks import BlockSync, SharedBreakers, SharedRateLimits
from proxy.state.cache import RedisCache
from proxy.state.health import StateHealth
from proxy.state.redis_spend import RedisSpend

log = logging.getLogger("orproxy")
SYNC_S = 0.5  # blocks published and read, figures refreshed, an outage probed: this often
LedgerSpend = Callable[[], Awaitable[tuple[Mapping[str, float], Mapping[str, float]]]]


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
        self.health = StateHealth(without_password(url), config.on_state_error)
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
