"""The response cache as the rest of the proxy sees it: a `CacheFile` through one config
snapshot's `CachePolicy` (`ResponseCache`), and the process's one file, opened when a config first
enables the cache (`CacheSlot`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from proxy.cache.policy import CachedAnswer, CachePolicy
from proxy.cache.store import CacheFile


class CacheStore(Protocol):
    """Where answers are kept: a SQLite file (`CacheFile`, one process) or Redis
    (`proxy.state.cache.RedisCache`, shared by replicas). Every call takes the caller's policy."""

    hits: int
    misses: int

    @property
    def path(self) -> Path: ...
    @property
    def entries(self) -> int: ...
    async def get(self, key: str, policy: CachePolicy) -> CachedAnswer | None: ...
    async def put(self, key: str, answer: CachedAnswer, policy: CachePolicy) -> bool: ...
    async def evict(self, policy: CachePolicy) -> None: ...
    async def purge_expired(self, policy: CachePolicy) -> int: ...
    async def clear(self) -> int: ...
    async def close(self) -> None: ...


# Opens the store at a path under a policy (a shared store ignores the path).
StoreOpener = Callable[[Path, CachePolicy], Awaitable[CacheStore]]


class ResponseCache:
    """A `CacheFile` seen through one config snapshot's `CachePolicy`: what the request path uses.
    Build with `await ResponseCache.open(path, policy)`; a reload derives the next snapshot's view
    with `await cache.with_policy(new)`. `close()` closes the file under every view."""

    __slots__ = ("file", "policy")

    def __init__(self, file: CacheStore, policy: CachePolicy) -> None:
        self.file = file
        self.policy = policy

    @classmethod
    async def open(
        cls,
        path: str | Path,
        policy: CachePolicy,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 5.0,
    ) -> ResponseCache:
        file = await CacheFile.open(path, clock=clock, busy_timeout_s=busy_timeout_s)
        cache = cls(file, policy)
        await file.purge_expired(policy)
        await file.evict(policy)  # the policy may have shrunk since the file was written
        return cache

    async def with_policy(self, policy: CachePolicy) -> ResponseCache:
        """The same file under a reloaded config's policy: a new TTL applies to stored entries at
        once, a smaller `max_entries` evicts now, `enabled=False` makes get/put inert (entries stay)."""
        await self.file.evict(policy)
        return ResponseCache(self.file, policy)

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def entries(self) -> int:
        return self.file.entries

    @property
    def hits(self) -> int:
        return self.file.hits

    @property
    def misses(self) -> int:
        return self.file.misses

    async def get(self, key: str) -> CachedAnswer | None:
        return await self.file.get(key, self.policy)

    async def put(self, key: str, answer: CachedAnswer) -> bool:
        return await self.file.put(key, answer, self.policy)

    async def purge_expired(self) -> int:
        return await self.file.purge_expired(self.policy)

    async def clear(self) -> int:
        return await self.file.clear()

    async def close(self) -> None:
        await self.file.close()


class CacheSlot:
    """The process's cache file, opened when a config first enables the cache (at start-up or
    by a reload) and closed at shutdown. `cache.path` is read when it opens; a later change of
    the path needs a restart (the reload says so)."""

    def __init__(self, clock: Callable[[], float] = time.time, opener: StoreOpener | None = None) -> None:
        self.file: CacheStore | None = None
        self._clock = clock
        self._opener = opener  # None: the SQLite file at cache.path

    async def open(self, path: str | Path, policy: CachePolicy) -> None:
        """Open the file at `path` (or the shared store) unless one is open already."""
        if self.file is None:
            if self._opener is not None:
                self.file = await self._opener(Path(path), policy)
            else:
                self.file = (await ResponseCache.open(path, policy, clock=self._clock)).file

    async def view(self, policy: CachePolicy) -> ResponseCache | None:
        """The open file under `policy` (None when no file is open or the policy turns the cache off)."""
        if self.file is None or not policy.enabled:
            return None
        return await ResponseCache(self.file, policy).with_policy(policy)

    async def close(self) -> None:
        if self.file is not None:
            await self.file.close()
