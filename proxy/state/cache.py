"""The response cache on Redis: entries written by one replica are answered by every other.

Each entry is a key with the TTL of the policy it was stored under (`cache.ttl_s`; the stored
`created_at` is checked on reading too, so a shorter TTL applies at once). A sorted set by store
time bounds the count (`cache.max_entries`, oldest stored first out, in the same script that
stores); `cache.max_entry_bytes` is checked before anything is sent. Like the SQLite file, it never
fails a request: a Redis error is a miss or a skipped store (counted in the state's health).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.cache.policy import CachedAnswer, CachePolicy, decode_answer, storable
from proxy.state.health import StateHealth

log = logging.getLogger("orproxy.cache")

# KEYS: the entry, the index. ARGV: payload, ttl_ms, now, max_entries, expired-before.
# Stores, drops what expired from the index, evicts the oldest beyond the cap; returns the count.
_PUT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #oldest, 2 do redis.call('DEL', oldest[i]) end
end
return redis.call('ZCARD', KEYS[2])
"""


class RedisCache:
    def __init__(self, redis: Redis, prefix: str, health: StateHealth, clock: Callable[[], float]) -> None:
        self._redis = redis
        self._prefix = f"{prefix}cache:"
        self._index = f"{prefix}cache-index"
        self._health = health
        self._clock = clock
        self._put = redis.register_script(_PUT)
        self._entries = 0
        self.hits = 0
        self.misses = 0

    @property
    def path(self) -> Path:
        return Path(self._index)

    @property
    def entries(self) -> int:
        return self._entries

    async def get(self, key: str, policy: CachePolicy) -> CachedAnswer | None:
        found = None
        if policy.enabled and self._health.up:
            try:
                payload = await self._redis.get(self._prefix + key)
            except RedisError as exc:
                self._health.failed(exc, self._clock())
                payload = None
            if isinstance(payload, bytes):
                try:
                    found = decode_answer(payload)
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    log.warning("cache: ignoring unreadable entry %s: %s", key[:12], exc)
                if found is not None and found.created_at + policy.ttl_s <= self._clock():
                    found = None
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    async def put(self, key: str, answer: CachedAnswer, policy: CachePolicy) -> bool:
        if not policy.enabled or not self._health.up:
            return False
        payload, why = storable(answer, policy)
        if payload is None:
            log.debug("cache: not storing %s: %s", key[:12], why)
            return False
        now = self._clock()
        args: list[bytes | str | int] = [
            payload,
            max(1, int(policy.ttl_s * 1000)),
            f"{now:.3f}",
            policy.max_entries,
            f"{now - policy.ttl_s:.3f}",
        ]
        try:
            self._entries = int(await self._put([self._prefix + key, self._index], args))
        except RedisError as exc:
            self._health.failed(exc, now)
            return False
        return True

    async def evict(self, policy: CachePolicy) -> None:
        """Down to `max_entries` now (a reload that shrank it), oldest stored first."""
        try:
            over = await self._redis.zcard(self._index) - policy.max_entries
            if over > 0:
                popped = await self._redis.zpopmin(self._index, over)
                await self._redis.delete(*(str(entry[0], "utf-8") for entry in popped if isinstance(entry[0], bytes)))
            self._entries = await self._redis.zcard(self._index)
        except RedisError as exc:
            self._health.failed(exc, self._clock())

    async def purge_expired(self, policy: CachePolicy) -> int:
        """Expired entries lapse on their own (their TTL); this only tidies the index."""
        try:
            return int(await self._redis.zremrangebyscore(self._index, "-inf", self._clock() - policy.ttl_s))
        except RedisError as exc:
            self._health.failed(exc, self._clock())
            return 0

    async def clear(self) -> int:
        try:
            members = await self._redis.zrange(self._index, 0, -1)
            if members:
                await self._redis.delete(*members)
            await self._redis.delete(self._index)
        except RedisError as exc:
            self._health.failed(exc, self._clock())
            return 0
        self._entries = 0
        return len(members)

    async def close(self) -> None:
        return None  # the connection belongs to the state backend
