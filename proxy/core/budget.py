"""Pure budget logic: spend so far, money reserved by requests in flight, downgrade steps.

No IO: the ledger feeds `SpendBook.load` at start-up, the handler asks
`try_reserve` before going upstream and `settle` afterwards. Checking and
reserving happen in one synchronous call, so on one event loop concurrent
requests cannot all squeeze through the same remaining dollars.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from proxy.config import Budget, DowngradeStep, ProxyKey

GLOBAL = ""  # the scope name of the proxy-wide budget


@dataclass(frozen=True, slots=True)
class Refusal:
    scope: str  # "" for the proxy-wide budget, else the key's name
    window: str  # daily | monthly
    spent: float
    reserved: float
    limit: float
    resets_at: float  # epoch seconds

    def message(self, needed: float, now: float) -> str:
        budget = f"the {self.window} budget" + (f" of key '{self.scope}'" if self.scope else "")
        reset = datetime.fromtimestamp(self.resets_at, ZoneInfo("UTC")).strftime("%Y-%m-%d %H:%M UTC")
        return (
            f"Request refused: {budget} is exhausted. Spent {_usd(self.spent, 4)} of {_usd(self.limit, 2)}"
            f" ({_usd(self.reserved, 4)} more reserved by requests in flight); this request may cost up to"
            f" {_usd(needed, 4)}. The budget resets at {reset} (in {_duration(self.resets_at - now)})."
        )


@dataclass(slots=True)
class Reservation:
    scope: str
    amount: float
    settled: bool = False


@dataclass(slots=True)
class _Scope:
    daily_limit: float | None
    monthly_limit: float | None
    day: float = 0.0
    month: float = 0.0
    reserved: float = 0.0


@dataclass(slots=True)
class _Calendar:
    tz: ZoneInfo
    day_start: float = 0.0
    day_end: float = 0.0
    month_start: float = 0.0
    month_end: float = 0.0

    def place(self, now: float) -> None:
        local = datetime.fromtimestamp(now, self.tz)
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        month = day.replace(day=1)
        next_month = (month + timedelta(days=32)).replace(day=1)
        self.day_start, self.day_end = day.timestamp(), _next_midnight(day).timestamp()
        self.month_start, self.month_end = month.timestamp(), next_month.timestamp()


def _next_midnight(day: datetime) -> datetime:
    # Via the calendar date, not +24h: days around a DST change are 23 or 25 hours long.
    return datetime.combine(day.date() + timedelta(days=1), day.time(), day.tzinfo)


class SpendBook:
    def __init__(self, budget: Budget, keys: tuple[ProxyKey, ...] = (), now: float = 0.0) -> None:
        self._budget = budget
        self._scopes: dict[str, _Scope] = {GLOBAL: _Scope(budget.daily_usd, budget.monthly_usd)}
        for key in keys:
            self._scopes[key.name] = _Scope(key.daily_usd, key.monthly_usd)
        self.calendar = _Calendar(ZoneInfo(budget.timezone))
        self.calendar.place(now)

    # -- start-up ---------------------------------------------------------------------------
    def load(self, day: Mapping[str, float], month: Mapping[str, float]) -> None:
        """Spend already recorded this day / month, per key name ("" = no key); the global total is their sum."""
        for scope in self._scopes.values():
            scope.day = scope.month = 0.0
        for name, amount in day.items():
            self._scope_for(name).day += amount
            self._scopes[GLOBAL].day += amount if name != GLOBAL else 0.0
        for name, amount in month.items():
            self._scope_for(name).month += amount
            self._scopes[GLOBAL].month += amount if name != GLOBAL else 0.0

    def _scope_for(self, name: str) -> _Scope:
        scope = self._scopes.get(name)
        return scope if scope is not None else _Scope(None, None)  # keys since removed: global only

    # -- per request ------------------------------------------------------------------------
    def roll(self, now: float) -> None:
        """Start a new day or month when one has begun."""
        calendar = self.calendar
        if now < calendar.day_end:
            return
        new_month = now >= calendar.month_end
        calendar.place(now)
        for scope in self._scopes.values():
            scope.day = 0.0
            if new_month:
                scope.month = 0.0

    def fraction(self, key: str | None, now: float) -> float:
        """The highest share of any budget that applies to this key, spent so far."""
        self.roll(now)
        fractions = [0.0]
        for name in (GLOBAL, key) if key else (GLOBAL,):
            scope = self._scopes.get(name)
            if scope is None:
                continue
            if scope.daily_limit:
                fractions.append(scope.day / scope.daily_limit)
            if scope.monthly_limit:
                fractions.append(scope.month / scope.monthly_limit)
        return max(fractions)

    def downgrade_step(self, fraction: float) -> tuple[int, DowngradeStep] | None:
        """The highest step whose threshold has been reached, with its index."""
        found = None
        for index, step in enumerate(self._budget.downgrade):
            if fraction >= step.at:
                found = (index, step)
        return found

    def try_reserve(self, key: str | None, amount: float, now: float) -> Reservation | Refusal:
        self.roll(now)
        names = (GLOBAL, key) if key else (GLOBAL,)
        for name in names:
            refusal = self._would_exceed(name, amount)
            if refusal is not None:
                return refusal
        for name in names:
            if name in self._scopes:
                self._scopes[name].reserved += amount
        return Reservation(key or GLOBAL, amount)

    def would_refuse(self, key: str | None, amount: float, now: float) -> Refusal | None:
        """What try_reserve would say, without reserving anything (for explain)."""
        self.roll(now)
        for name in (GLOBAL, key) if key else (GLOBAL,):
            refusal = self._would_exceed(name, amount)
            if refusal is not None:
                return refusal
        return None

    def reconfigure(
        self,
        budget: Budget,
        keys: tuple[ProxyKey, ...],
        now: float,
        day_by_key: Mapping[str, float] | None = None,
        month_by_key: Mapping[str, float] | None = None,
    ) -> None:
        """New limits from a reloaded config; spend and reservations carry over. A key new to
        the book starts from what the ledger says it spent (day_by_key / month_by_key)."""
        self._budget = budget
        scopes = {GLOBAL: self._scopes[GLOBAL]}
        scopes[GLOBAL].daily_limit, scopes[GLOBAL].monthly_limit = budget.daily_usd, budget.monthly_usd
        for key in keys:
            scope = self._scopes.get(key.name)
            if scope is None:
                scope = _Scope(
                    None, None, (day_by_key or {}).get(key.name, 0.0), (month_by_key or {}).get(key.name, 0.0)
                )
            scope.daily_limit, scope.monthly_limit = key.daily_usd, key.monthly_usd
            scopes[key.name] = scope
        self._scopes = scopes
        if ZoneInfo(budget.timezone) != self.calendar.tz:
            self.calendar = _Calendar(ZoneInfo(budget.timezone))
            self.calendar.place(now)

    def _would_exceed(self, name: str, amount: float) -> Refusal | None:
        scope = self._scopes.get(name)
        if scope is None:
            return None
        calendar = self.calendar
        for window, spent, limit, resets in (
            ("daily", scope.day, scope.daily_limit, calendar.day_end),
            ("monthly", scope.month, scope.monthly_limit, calendar.month_end),
        ):
            if limit is not None and spent + scope.reserved + amount > limit:
                return Refusal(name, window, spent, scope.reserved, limit, resets)
        return None

    def settle(self, reservation: Reservation, cost: float, now: float) -> None:
        """Release the reservation and book the real cost (once, however often called)."""
        if reservation.settled:
            return
        reservation.settled = True
        self.roll(now)
        names = {GLOBAL, reservation.scope}
        for name in names:
            scope = self._scopes.get(name)
            if scope is None:
                continue
            scope.reserved = max(0.0, scope.reserved - reservation.amount)
            scope.day += cost
            scope.month += cost

    def add_spend(self, key: str | None, cost: float, now: float) -> None:
        """Book a cost that had no reservation (a stream billed after the fact)."""
        self.settle(Reservation(key or GLOBAL, 0.0), cost, now)

    # -- reporting --------------------------------------------------------------------------
    def snapshot(self) -> list[tuple[str, str, float, float | None]]:
        """(scope, window, spent, limit) for every scope: what the metrics and /admin show."""
        rows = []
        for name, scope in self._scopes.items():
            rows.append((name, "daily", scope.day, scope.daily_limit))
            rows.append((name, "monthly", scope.month, scope.monthly_limit))
        return rows

    def reserved(self, key: str | None = None) -> float:
        scope = self._scopes.get(key or GLOBAL)
        return scope.reserved if scope else 0.0


def _usd(value: float, places: int) -> str:
    """Dollars with at least `places` decimals, more when fewer would misstate a small amount
    (a $0.002 budget must not read "$0.00")."""
    text = f"{value:.{places}f}"
    while places < 9 and abs(float(text) - value) > abs(value) * 0.005:
        places += 1
        text = f"{value:.{places}f}"
    return "$" + text


def _duration(seconds: float) -> str:
    seconds = max(0, math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
