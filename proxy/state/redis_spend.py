"""One spend book for every replica, on Redis: one round trip to reserve (the RESERVE script checks
and holds every scope at once), one to settle. The figures each script returns are copied into this
process's `SpendCounters`, so the pure book (downgrade fraction, reports, metrics) reads memory.

The downgrade step is decided from those figures as last seen (at most one round trip or one
background refresh old); the reservation returns the fresh ones, and when they call for a higher
step than the one used, the hold is released and the request admitted once more on the fresh
figures (`restarts` counts how often: rarely, only when another replica's spend crossed a step).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.config import Config
from proxy.core.admission import Admission, admission, admit
from proxy.core.budget import GLOBAL, BudgetCalendar, Refusal, Reservation, SpendCounters
from proxy.core.features import RequestFeatures
from proxy.core.policy import Policy
from proxy.core.routing import BlockLookup
from proxy.state import lua
from proxy.state.batch import ScriptBatcher
from proxy.state.health import StateHealth
from proxy.state.spend import settle_locally

log = logging.getLogger("orproxy")
NANO = 1_000_000_000
KEEP_AFTER_WINDOW_S = 3 * 86400  # a closed window's counter stays readable this long
SETTLE_WAIT_S = 0.005  # a settlement waits at most this long for a reservation to ride along with
HOLD_MARGIN_S = 5.0  # a hold outlives the longest its request can take by this much


def hold_ttl_s(config: Config) -> float:
    """How long a hold may outlive its request before it lapses: the longest a request can take
    (every attempt of the longest chain timing out, with its waits), and a few seconds more."""
    timeout = max(u.timeout_s + u.connect_timeout_s for u in config.upstreams.values())
    longest = max((len(m.chain or ()) for m in config.models.values()), default=1) or 1
    retry = config.retry
    per_attempt = timeout + max(retry.max_retry_after_s, retry.backoff_max_s)
    return per_attempt * retry.attempts_per_model * longest + HOLD_MARGIN_S


class _PolicyFacts:
    """What a config snapshot fixes for the scripts, worked out once per snapshot."""

    __slots__ = ("limits", "policy", "scopes", "ttl_ms")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.ttl_ms = int(hold_ttl_s(policy.config) * 1000)
        budget = policy.config.budget
        self.limits: dict[str, tuple[int, int]] = {
            GLOBAL: (_nanos_or_none(budget.daily_usd), _nanos_or_none(budget.monthly_usd))
        }
        for key in policy.config.keys:
            self.limits[key.name] = (_nanos_or_none(key.daily_usd), _nanos_or_none(key.monthly_usd))
        self.scopes = tuple(self.limits)


class RedisSpend:
    def __init__(
        self,
        redis: Redis,
        prefix: str,
        counters: SpendCounters,
        health: StateHealth,
        clock: Callable[[], float],
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._counters = counters
        self._health = health
        self._clock = clock
        self._batch = ScriptBatcher(redis, (lua.RESERVE, lua.SETTLE, lua.FIGURES, lua.SEED))
        self._facts: _PolicyFacts | None = None
        self._ids = random.Random()
        # Holds of requests still running here, renewed while they run (a stream may outlive its
        # TTL: only a replica that died stops renewing): hold -> (its keys, member, ttl_ms, renew at).
        self._live: dict[str, tuple[list[str], str, int, float]] = {}
        self.restarts = 0  # admissions redone because the fresh figures called for a higher step

    # -- keys ---------------------------------------------------------------------------------
    def _scope_keys(self, scope: str, calendar: BudgetCalendar) -> list[str]:
        tag = f"{self._prefix}spend:{{{scope}}}:" if scope else f"{self._prefix}spend:{{}}:"
        return [
            f"{tag}day:{int(calendar.day_start)}",
            f"{tag}month:{int(calendar.month_start)}",
            f"{tag}reserved",
            f"{tag}holds",
        ]

    def _facts_of(self, policy: Policy) -> _PolicyFacts:
        facts = self._facts
        if facts is None or facts.policy is not policy:
            facts = self._facts = _PolicyFacts(policy)
        return facts

    def _note(self, scopes: Sequence[str], figures: Sequence[Any]) -> None:
        """Copy what a script returned into the in-process counters the pure book reads."""
        counters = self._counters
        for index, scope in enumerate(scopes):
            mine = counters.scope(scope)
            mine.day = int(figures[index * 3]) / NANO
            mine.month = int(figures[index * 3 + 1]) / NANO
            mine.reserved = int(figures[index * 3 + 2]) / NANO

    # -- the request path ---------------------------------------------------------------------
    async def admit(
        self,
        policy: Policy,
        key: str | None,
        model: str,
        features: RequestFeatures,
        blocked: BlockLookup | None,
        now: float,
    ) -> Admission:
        if self._health.up:
            try:
                return await self._admit(policy, key, model, features, blocked, now, retry=True)
            except RedisError as exc:
                self._health.failed(exc, now)
        if not self._health.local_fallback:
            raise self._health.refusal()
        return admit(policy, key, model, features, blocked, now)

    async def _admit(
        self,
        policy: Policy,
        key: str | None,
        model: str,
        features: RequestFeatures,
        blocked: BlockLookup | None,
        now: float,
        *,
        retry: bool,
    ) -> Admission:
        book = policy.book
        stepped = bool(policy.config.budget.downgrade)
        before = book.downgrade_step(book.fraction(key, now)) if stepped else None
        steps = admission(policy, key, model, features, blocked, now)
        amount = next(steps)
        try:
            while True:
                amount = steps.send(await self._hold(policy, key, amount, now))
        except StopIteration as done:
            admitted: Admission = done.value
        if stepped and retry:
            reservation = admitted.reservation
            for name in {GLOBAL, key or GLOBAL}:  # the figures as they were before this hold
                self._counters.scope(name).reserved -= reservation.amount
            after = book.downgrade_step(book.fraction(key, now))
            for name in {GLOBAL, key or GLOBAL}:
                self._counters.scope(name).reserved += reservation.amount
            if (after[0] if after else -1) > (before[0] if before else -1):
                self.restarts += 1
                await self._release(reservation, key, now)
                return await self._admit(policy, key, model, features, blocked, now, retry=False)
        return admitted

    async def _hold(self, policy: Policy, key: str | None, amount: float, now: float) -> Reservation | Refusal:
        facts = self._facts_of(policy)
        counters = self._counters
        counters.roll(now)
        calendar = counters.calendar
        scopes = (GLOBAL, key) if key else (GLOBAL,)
        nanos = round(amount * NANO)
        hold = f"{self._ids.getrandbits(64):016x}"
        keys: list[str] = []
        args: list[Any] = [
            f"{now:.3f}",
            f"{now + facts.ttl_ms / 1000:.3f}",
            facts.ttl_ms,
            nanos,
            f"{hold}|{nanos}",
            len(scopes),
        ]
        for scope in scopes:
            keys += self._scope_keys(scope, calendar)
            args += facts.limits.get(scope, (-1, -1))
        keys.append(f"{self._prefix}hold:{hold}")
        reply = await self._batch.call(lua.RESERVE, keys, args)
        refused = int(reply[0])
        self._note(scopes, reply[1:])
        if refused == 0:
            holds = [keys[i * 4 + 3] for i in range(len(scopes))] + [keys[-1]]
            self._live[hold] = (holds, args[4], facts.ttl_ms, now + facts.ttl_ms / 2000)
            return Reservation(key or GLOBAL, amount, hold=hold)
        index, monthly = divmod(refused - 1, 2)
        scope = scopes[index]
        figures = reply[1 + index * 3 : 4 + index * 3]
        limit = facts.limits[scope][monthly]
        return Refusal(
            scope,
            "monthly" if monthly else "daily",
            int(figures[1 if monthly else 0]) / NANO,
            int(figures[2]) / NANO,
            limit / NANO,
            calendar.month_end if monthly else calendar.day_end,
        )

    async def settle(
        self, policy: Policy, reservation: Reservation | None, key: str | None, cost: float, now: float, started: float
    ) -> None:
        """Queued, not awaited: it goes to Redis with the next reservation (or within SETTLE_WAIT_S),
        so a request costs about one round trip. `drain` sends what is queued (shutdown)."""
        held = reservation is not None and bool(reservation.hold)
        if reservation is not None:
            self._live.pop(reservation.hold, None)
            if not held:  # a hold of the local fallback: released here, the cost is booked below
                settle_locally(policy, reservation, key, 0.0, now, started)
            elif reservation.settled:
                return
            reservation.settled = True
        if not held and not cost:
            return
        if self._health.up:
            scopes, sent = self._book(reservation if held else None, key, cost, now, started, SETTLE_WAIT_S)
            sent.add_done_callback(functools.partial(self._booked, scopes, policy, key, cost, now, started))
            return
        self._book_locally(policy, key, cost, now, started)

    def _booked(
        self,
        scopes: Sequence[str],
        policy: Policy,
        key: str | None,
        cost: float,
        now: float,
        started: float,
        sent: asyncio.Future[Any],
    ) -> None:
        if sent.cancelled():  # the loop ended with it unsent: the ledger has the cost, the hold lapses
            return
        exc = sent.exception()
        if exc is None:
            self._note(scopes, sent.result())
            return
        self._health.failed(exc, now)
        self._book_locally(policy, key, cost, now, started)

    @staticmethod
    def _book_locally(policy: Policy, key: str | None, cost: float, now: float, started: float) -> None:
        # Redis is away: a hold there lapses on its own; the cost is in the ledger and reaches the
        # shared counters when they are re-seeded from it. Meanwhile this process counts it.
        if cost:
            policy.book.add_spend(key, cost, now, started)

    async def drain(self) -> None:
        await self._batch.drain()

    def batching(self) -> dict[str, float]:
        batch = self._batch
        return {
            "calls": batch.calls,
            "round_trips": batch.round_trips,
            "calls_per_round_trip": round(batch.calls / batch.round_trips, 3) if batch.round_trips else 0.0,
            "admissions_redone": self.restarts,
        }

    async def _release(self, reservation: Reservation, key: str | None, now: float) -> None:
        self._live.pop(reservation.hold, None)
        scopes, sent = self._book(reservation, key, 0.0, now, now)
        self._note(scopes, await sent)
        reservation.settled = True

    def _book(
        self,
        reservation: Reservation | None,
        key: str | None,
        cost: float,
        now: float,
        started: float,
        wait_s: float = 0.0,
    ) -> tuple[tuple[str, ...], asyncio.Future[Any]]:
        counters = self._counters
        counters.roll(now)
        calendar = counters.calendar
        scopes = (GLOBAL, key) if key else (GLOBAL,)
        keys: list[str] = []
        for scope in scopes:
            keys += self._scope_keys(scope, calendar)
        member, nanos = "", 0
        if reservation is not None:
            nanos = round(reservation.amount * NANO)
            member = f"{reservation.hold}|{nanos}"
            keys.append(f"{self._prefix}hold:{reservation.hold}")
        else:
            keys.append(f"{self._prefix}hold:-")
        args: list[str | int] = [
            member,
            nanos,
            round(cost * NANO),
            int(started >= calendar.day_start),
            int(started >= calendar.month_start),
            _kept(calendar.day_end, now),
            _kept(calendar.month_end, now),
            len(scopes),
        ]
        return scopes, self._batch.call(lua.SETTLE, keys, args, wait_s)

    async def adjust(self, policy: Policy, key: str | None, delta: float, started: float, now: float) -> None:
        if self._health.up:
            try:
                scopes, sent = self._book(None, key, delta, now, started)
                self._note(scopes, await sent)
                return
            except RedisError as exc:
                self._health.failed(exc, now)
        policy.book.adjust(key, delta, started, now)

    # -- figures and seeding ------------------------------------------------------------------
    async def renew(self, now: float) -> None:
        """Push back the lapse of holds past half their TTL whose requests still run here."""
        due = [(hold, live) for hold, live in self._live.items() if live[3] <= now]
        if not due:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for hold, (keys, member, ttl_ms, _) in due:
                for zset in keys[:-1]:
                    pipe.zadd(zset, {member: now + ttl_ms / 1000}, xx=True)
                pipe.pexpire(keys[-1], ttl_ms)
                self._live[hold] = (keys, member, ttl_ms, now + ttl_ms / 2000)
            await pipe.execute()

    def scopes_of(self, policy: Policy) -> tuple[str, ...]:
        return self._facts_of(policy).scopes

    async def refresh(self, policy: Policy) -> None:
        """Every configured scope's figures (lapsed holds dropped), into the in-process counters."""
        if not self._health.up:
            return
        now = self._clock()
        try:
            await self.read(self._facts_of(policy).scopes, now)
        except RedisError as exc:
            self._health.failed(exc, now)

    async def read(self, scopes: Sequence[str], now: float) -> None:
        counters = self._counters
        counters.roll(now)
        keys: list[str] = []
        for scope in scopes:
            keys += self._scope_keys(scope, counters.calendar)
        # Through the batch: settlements still queued are applied first.
        self._note(scopes, await self._batch.call(lua.FIGURES, keys, [f"{now:.3f}", len(scopes)]))

    async def seed(
        self, day: Mapping[str, float], month: Mapping[str, float], calendar: BudgetCalendar | None = None
    ) -> None:
        """max(redis, ledger) for every scope the ledger knows and the proxy-wide total, in the
        counters' calendar (or `calendar`: a time zone about to be reloaded). Raises RedisError."""
        new_calendar = calendar is not None
        calendar = calendar or self._counters.calendar
        totals = {GLOBAL: (sum(day.values()), sum(month.values()))}
        for name in set(day) | set(month):
            if name != GLOBAL:
                totals[name] = (day.get(name, 0.0), month.get(name, 0.0))
        keys: list[str] = []
        values: list[int | str] = []
        expiries: list[int] = []
        for scope, (spent_day, spent_month) in totals.items():
            day_key, month_key = self._scope_keys(scope, calendar)[:2]
            keys += [day_key, month_key]
            values += [round(spent_day * NANO), round(spent_month * NANO)]
            now = self._clock()
            expiries += [_kept(calendar.day_end, now), _kept(calendar.month_end, now)]
        await self._batch.call(lua.SEED, keys, [*values, *expiries])  # after the settlements queued
        if not new_calendar:
            await self.read(tuple(totals), self._clock())


def _kept(window_end: float, now: float) -> int:
    """Seconds a window's counter is kept: to its end on the proxy's clock, and a few days more."""
    return max(1, int(window_end - now)) + KEEP_AFTER_WINDOW_S


def _nanos_or_none(usd: float | None) -> int:
    return -1 if usd is None else round(usd * NANO)
