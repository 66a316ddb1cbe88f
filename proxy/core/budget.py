"""Pure budget logic: spend so far, money reserved by requests in flight, downgrade steps.

No IO: the ledger feeds `SpendCounters.load` at start-up, the handler asks
`SpendBook.try_reserve` before going upstream and `settle` afterwards. The
counters are long-lived state; a `SpendBook` is built per config snapshot and
brings that config's limits and steps to them.
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
        # "Exhausted" only when it is: otherwise it is this request's worst case that does not fit.
        left = self.limit - self.spent - self.reserved
        state = "is exhausted" if left <= 0 else f"has {_usd(left, 4)} left, less than this request's worst case"
        return (
            f"Request refused: {budget} {state}. Spent {_usd(self.spent, 4)} of {_usd(self.limit, 2)}"
            f" ({_usd(self.reserved, 4)} more reserved by requests in flight); this request may cost up to"
            f" {_usd(needed, 4)}. The budget resets at {reset} (in {_duration(self.resets_at - now)})."
        )


@dataclass(slots=True)
class Reservation:
    scope: str
    amount: float
    settled: bool = False
    hold: str = ""  # the hold's id in a shared store ("": held in this process's book)


@dataclass(slots=True)
class _Counters:
    day: float = 0.0
    month: float = 0.0
    reserved: float = 0.0


@dataclass(slots=True)
class BudgetCalendar:
    """The current day and month of the budget's time zone, as epoch seconds."""

    tz: ZoneInfo
    day_start: float = 0.0
    day_end: float = 0.0
    month_start: float = 0.0
    month_end: float = 0.0

    @classmethod
    def at(cls, tz: ZoneInfo, now: float) -> BudgetCalendar:
        calendar = cls(tz)
        calendar.place(now)
        return calendar

    def place(self, now: float) -> None:
        local = datetime.fromtimestamp(now, self.tz)
        # fold=0: where midnight happens twice (America/Havana in November), the day starts at the
        # first one; a `now` in the repeated hour carries fold=1, which replace() would keep.
        day = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
        month = day.replace(day=1)
        next_month = (month + timedelta(days=32)).replace(day=1)
        self.day_start, self.day_end = day.timestamp(), _next_midnight(day).timestamp()
        self.month_start, self.month_end = month.timestamp(), next_month.timestamp()


def _next_midnight(day: datetime) -> datetime:
    # Via the calendar date, not +24h: days around a DST change are 23 or 25 hours long.
    return datetime.combine(day.date() + timedelta(days=1), day.time(), day.tzinfo)


class SpendCounters:
    """The long-lived state: spend this day and month and money reserved, per scope, in the
    budget's calendar. Holds no limits: those come from the config snapshot (`SpendBook`), so a
    reload changes limits without touching what has been spent. Every key's spend is counted,
    configured or not, so a key added by a reload starts from what it already spent today."""

    def __init__(self, tz: ZoneInfo | str = "UTC", now: float = 0.0) -> None:
        self.calendar = BudgetCalendar.at(ZoneInfo(tz) if isinstance(tz, str) else tz, now)
        self._scopes: dict[str, _Counters] = {GLOBAL: _Counters()}

    def scope(self, name: str) -> _Counters:
        found = self._scopes.get(name)
        if found is None:
            found = self._scopes[name] = _Counters()
        return found

    def peek(self, name: str) -> _Counters | None:
        return self._scopes.get(name)

    def load(self, day: Mapping[str, float], month: Mapping[str, float]) -> None:
        """Spend already recorded this day / month, per key name ("" = no key); the global total is
        their sum. Replaces what was counted (the ledger is the truth); reservations stay."""
        for counters in self._scopes.values():
            counters.day = counters.month = 0.0
        total = self._scopes[GLOBAL]
        for name, amount in day.items():
            if name != GLOBAL:
                self.scope(name).day += amount
            total.day += amount
        for name, amount in month.items():
            if name != GLOBAL:
                self.scope(name).month += amount
            total.month += amount

    def rebase(self, calendar: BudgetCalendar, day: Mapping[str, float], month: Mapping[str, float]) -> None:
        """A new time zone: its day and month, with what the ledger holds for them."""
        self.calendar = calendar
        self.load(day, month)

    def book(self, name: str, amount: float, started_at: float) -> None:
        """Add `amount` (negative: a correction) to the scope's day and month, in the day and
        month the request STARTED: one reserved before midnight and settled after it is
        yesterday's, like its ledger row, and counts against no budget of today."""
        calendar = self.calendar
        counters = self.scope(name)
        if started_at >= calendar.day_start:
            counters.day = max(0.0, counters.day + amount)
        if started_at >= calendar.month_start:
            counters.month = max(0.0, counters.month + amount)

    def roll(self, now: float) -> None:
        """Start a new day or month when one has begun."""
        calendar = self.calendar
        if now < calendar.day_end:
            return
        new_month = now >= calendar.month_end
        calendar.place(now)
        for counters in self._scopes.values():
            counters.day = 0.0
            if new_month:
                counters.month = 0.0


@dataclass(frozen=True, slots=True)
class _Limits:
    daily: float | None
    monthly: float | None


class SpendBook:
    """The budget of one config snapshot: its limits and downgrade steps, over the shared
    `SpendCounters`. Checking and reserving happen in one synchronous call, so on one event loop
    concurrent requests cannot all squeeze through the same remaining dollars."""

    def __init__(
        self,
        budget: Budget,
        keys: tuple[ProxyKey, ...] = (),
        now: float = 0.0,
        counters: SpendCounters | None = None,
    ) -> None:
        self._budget = budget
        self._limits: dict[str, _Limits] = {GLOBAL: _Limits(budget.daily_usd, budget.monthly_usd)}
        for key in keys:
            self._limits[key.name] = _Limits(key.daily_usd, key.monthly_usd)
        self.counters = counters if counters is not None else SpendCounters(budget.timezone, now)

    @property
    def calendar(self) -> BudgetCalendar:
        return self.counters.calendar

    # -- start-up ---------------------------------------------------------------------------
    def load(self, day: Mapping[str, float], month: Mapping[str, float]) -> None:
        """Spend already recorded this day / month, per key name ("" = no key); the global total is their sum."""
        self.counters.load(day, month)

    # -- per request ------------------------------------------------------------------------
    def roll(self, now: float) -> None:
        self.counters.roll(now)

    def fraction(self, key: str | None, now: float) -> float:
        """The highest share of any budget that applies to this key, spent or reserved so far.
        Reserved counts: under a burst, requests in flight have not spent yet, and without their
        reservations every one of them would pick the step of an idle budget."""
        self.counters.roll(now)
        fractions = [0.0]
        for name in (GLOBAL, key) if key else (GLOBAL,):
            limits = self._limits.get(name)
            counters = self.counters.peek(name)
            if limits is None or counters is None:
                continue
            if limits.daily:
                fractions.append((counters.day + counters.reserved) / limits.daily)
            if limits.monthly:
                fractions.append((counters.month + counters.reserved) / limits.monthly)
        return max(fractions)

    def downgrade_step(self, fraction: float) -> tuple[int, DowngradeStep] | None:
        """The highest step whose threshold has been reached, with its index."""
        found = None
        for index, step in enumerate(self._budget.downgrade):
            if fraction >= step.at:
                found = (index, step)
        return found

    def try_reserve(self, key: str | None, amount: float, now: float) -> Reservation | Refusal:
        refusal = self.would_refuse(key, amount, now)
        if refusal is not None:
            return refusal
        for name in (GLOBAL, key) if key else (GLOBAL,):
            self.counters.scope(name).reserved += amount
        return Reservation(key or GLOBAL, amount)

    def would_refuse(self, key: str | None, amount: float, now: float) -> Refusal | None:
        """What try_reserve would say, without reserving anything (for explain)."""
        self.counters.roll(now)
        for name in (GLOBAL, key) if key else (GLOBAL,):
            refusal = self._would_exceed(name, amount)
            if refusal is not None:
                return refusal
        return None

    def _would_exceed(self, name: str, amount: float) -> Refusal | None:
        limits = self._limits.get(name)
        if limits is None:
            return None
        counters = self.counters.scope(name)
        calendar = self.counters.calendar
        for window, spent, limit, resets in (
            ("daily", counters.day, limits.daily, calendar.day_end),
            ("monthly", counters.month, limits.monthly, calendar.month_end),
        ):
            if limit is not None and spent + counters.reserved + amount > limit:
                return Refusal(name, window, spent, counters.reserved, limit, resets)
        return None

    def settle(self, reservation: Reservation, cost: float, now: float, started_at: float | None = None) -> None:
        """Release the reservation and book the real cost (once, however often called), in the
        day and month the request started (`started_at`, default `now`)."""
        if reservation.settled:
            return
        reservation.settled = True
        self.counters.roll(now)
        for name in {GLOBAL, reservation.scope}:
            counters = self.counters.scope(name)
            left = counters.reserved - reservation.amount
            counters.reserved = left if left > 1e-12 else 0.0  # float residue of many reservations is none
            self.counters.book(name, cost, now if started_at is None else started_at)

    def add_spend(self, key: str | None, cost: float, now: float, started_at: float | None = None) -> None:
        """Book a cost that had no reservation (a stream billed after the fact)."""
        self.settle(Reservation(key or GLOBAL, 0.0), cost, now, started_at)

    def adjust(self, key: str | None, delta: float, started_at: float, now: float) -> None:
        """Correct a booked cost by `delta` (reconciliation): only the part that falls in the
        current day and month moves the counters; an older day's figure is the ledger's alone."""
        self.counters.roll(now)
        for name in {GLOBAL, key or GLOBAL}:
            self.counters.book(name, delta, started_at)

    # -- reporting --------------------------------------------------------------------------
    def snapshot(self) -> list[tuple[str, str, float, float | None]]:
        """(scope, window, spent, limit) for every configured scope: what the metrics and /admin show."""
        rows = []
        for name, limits in self._limits.items():
            counters = self.counters.peek(name) or _Counters()
            rows.append((name, "daily", counters.day, limits.daily))
            rows.append((name, "monthly", counters.month, limits.monthly))
        return rows

    def reserved(self, key: str | None = None) -> float:
        counters = self.counters.peek(key or GLOBAL)
        return counters.reserved if counters else 0.0


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
