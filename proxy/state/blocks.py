"""Breakers and rate-limit blocks shared between replicas, read from memory on the request path.

A breaker this process opens (or a rate-limit block it sees) is put in an outbox; the background
sync (proxy.state.backend) writes the outbox to one sorted set in Redis (score: when the block
ends) and reads every live block back, at most `SYNC_S` apart, adopting the others' into this
process's own `CircuitBreakers` / `RateLimits`. So a member opened anywhere is skipped everywhere
within about a second, and routing never waits on Redis. Which keys a breaker applies to travels
with it: the tenant rules of `core.breakers` hold across replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from proxy.config import Cooldown
from proxy.core.breakers import CircuitBreakers
from proxy.core.ratelimits import RateLimits
from proxy.core.routing import Block, Target

BREAKER, RATE_LIMIT = "breaker", "rate_limit"


class SharedBreakers(CircuitBreakers):
    """Breakers whose openings (and admin closings) are also published."""

    def __init__(self) -> None:
        super().__init__()
        self.outbox: list[tuple[str, Target, Block, frozenset[str] | None]] = []
        self.closed: list[str | None] = []  # models unblocked by hand (None: all), to lift everywhere

    def record_failure(
        self,
        policy: Cooldown,
        target: Target,
        now: float,
        detail: str = "",
        request: object = None,
        client: str | None = None,
    ) -> bool:
        opened = super().record_failure(policy, target, now, detail, request, client)
        if opened:
            self.outbox.append((BREAKER, target, self.active(now)[target], self.owners(target)))
        return opened

    def close(self, model: str | None = None) -> list[Target]:
        self.closed.append(model)
        return super().close(model)

    def lift(self, target: Target) -> None:
        """Closed elsewhere (an unblock on another replica): closed here, without publishing."""
        self._open.pop(target, None)
        self._owners.pop(target, None)
        self._failures.pop(target, None)


class SharedRateLimits(RateLimits):
    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self.outbox: list[tuple[str, Target, Block, frozenset[str] | None]] = []
        self.closed: list[str | None] = []

    def _block(self, target: Target, until: float, detail: str) -> None:
        super()._block(target, until, detail)
        block = self._blocked.get(target)
        if block is not None:
            self.outbox.append((RATE_LIMIT, target, block, None))

    def clear(self, model: str | None = None) -> list[Target]:
        self.closed.append(model)
        return super().clear(model)

    def lift(self, target: Target) -> None:
        self._blocked.pop(target, None)


def _member(kind: str, target: Target, block: Block, owners: frozenset[str] | None) -> bytes:
    return orjson.dumps(
        [kind, target.model, target.upstream, block.reason, block.detail, sorted(owners) if owners else None]
    )


class BlockSync:
    """One round trip: publish what opened here, drop what ended, read what is open everywhere."""

    def __init__(self, redis: Redis, prefix: str, breakers: SharedBreakers, ratelimits: SharedRateLimits) -> None:
        self._redis = redis
        self._key = f"{prefix}blocks"
        self._breakers = breakers
        self._ratelimits = ratelimits
        self._seen: dict[tuple[str, Target], float] = {}  # what Redis held at the last sync, until when

    async def sync(self, now: float) -> None:
        outbox = self._breakers.outbox + self._ratelimits.outbox
        self._breakers.outbox, self._ratelimits.outbox = [], []
        lifted = [(BREAKER, m) for m in self._breakers.closed] + [(RATE_LIMIT, m) for m in self._ratelimits.closed]
        self._breakers.closed, self._ratelimits.closed = [], []
        try:
            if lifted:
                await self._lift(lifted)
            async with self._redis.pipeline(transaction=False) as pipe:
                for kind, target, block, owners in outbox:
                    if block.until is not None and block.until > now:
                        pipe.zadd(self._key, {_member(kind, target, block, owners): block.until})
                pipe.zremrangebyscore(self._key, "-inf", now)
                pipe.zrangebyscore(self._key, now, "+inf", withscores=True)
                replies = await pipe.execute()
        except BaseException:
            self._breakers.outbox[:0] = [o for o in outbox if o[0] == BREAKER]  # published on the next round
            self._ratelimits.outbox[:0] = [o for o in outbox if o[0] == RATE_LIMIT]
            raise
        self._adopt(replies[-1], now)

    async def _lift(self, lifted: Sequence[tuple[str, str | None]]) -> None:
        members = await self._redis.zrange(self._key, 0, -1)
        gone: list[bytes] = []
        for member in members:
            assert isinstance(member, bytes)
            kind, model = orjson.loads(member)[:2]
            if any(kind == k and (m is None or m == model) for k, m in lifted):
                gone.append(member)
        if gone:
            await self._redis.zrem(self._key, *gone)

    def _adopt(self, entries: Sequence[tuple[Any, float]], now: float) -> None:
        seen: dict[tuple[str, Target], float] = {}
        for member, until in entries:
            kind, model, upstream, reason, detail, owners = orjson.loads(member)
            target = Target(model, upstream)
            seen[(kind, target)] = max(until, seen.get((kind, target), 0.0))
            if kind == BREAKER:
                self._breakers.adopt(target, Block(reason, until, detail), frozenset(owners) if owners else None)
            else:
                self._ratelimits.adopt(target, Block(reason, until, detail))
        # In Redis at the last sync, gone now before its end: lifted elsewhere (POST /admin/unblock).
        for (kind, target), until in self._seen.items():
            if until > now and (kind, target) not in seen:
                (self._breakers if kind == BREAKER else self._ratelimits).lift(target)
        self._seen = seen
