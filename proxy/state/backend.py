"""The shared state of one process, as the config's `state` section says: built by the app factory,
started once the ledger is open (seeding the counters from it), and kept in step in the background.

`local` is the in-process state of a single process. `redis` puts the spend book, the breakers and
rate-limit blocks and the response cache on Redis: the book is read and written on the request
path (one round trip before the upstream call, one after); blocks are published and read every
`SYNC_S` by one background task, which also refreshes the figures reports read and, after an
outage, waits for Redis, re-seeds it from the ledger and marks it up again (proxy.state.redis_backend;
the Redis client is imported only when a config asks for it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from proxy.cache.response_cache import StoreOpener
from proxy.config import State
from proxy.core.breakers import CircuitBreakers
from proxy.core.budget import SpendCounters
from proxy.core.ratelimits import RateLimits
from proxy.state.spend import LocalSpend, SpendStore

if TYPE_CHECKING:  # the Redis client is imported only by a config that asks for it (0.3 s at start-up)
    from proxy.state.redis_backend import RedisState


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
    from proxy.state.blocks import SharedBreakers, SharedRateLimits
    from proxy.state.redis_backend import RedisState

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


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
