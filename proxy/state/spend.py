"""The spend book as the request path sees it: admit (reserve a plan's worst case) before going
upstream, settle (release the hold, book the cost) after. `LocalSpend` is today's in-process book;
`RedisSpend` (proxy.state.redis_spend) shares one book between replicas."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from proxy.core.admission import Admission, admit
from proxy.core.budget import Reservation
from proxy.core.features import RequestFeatures
from proxy.core.policy import Policy
from proxy.core.routing import BlockLookup


class SpendStore(Protocol):
    async def admit(
        self,
        policy: Policy,
        key: str | None,
        model: str,
        features: RequestFeatures,
        blocked: BlockLookup | None,
        now: float,
    ) -> Admission:
        """The plan the budget affords, with its worst case reserved; raises BudgetExceeded."""
        ...

    async def settle(
        self, policy: Policy, reservation: Reservation | None, key: str | None, cost: float, now: float, started: float
    ) -> None:
        """Release the reservation (None: there was none) and book `cost` in the day and month the
        request started. Never raises."""
        ...

    async def adjust(self, policy: Policy, key: str | None, delta: float, started: float, now: float) -> None:
        """Correct a booked cost (reconciliation). Never raises."""
        ...

    async def refresh(self, policy: Policy) -> None:
        """Bring the book's figures (policy.book over the shared counters) up to date, for reports."""
        ...

    async def drain(self) -> None:
        """Settlements this process queued are applied (a shared book may send them a moment later)."""
        ...

    async def seed(self, day: Mapping[str, float], month: Mapping[str, float]) -> None:
        """What the ledger holds for this day and month, per key name ("" = no key)."""
        ...


class LocalSpend:
    """The book in this process: every call is answered from memory, synchronously."""

    async def admit(
        self,
        policy: Policy,
        key: str | None,
        model: str,
        features: RequestFeatures,
        blocked: BlockLookup | None,
        now: float,
    ) -> Admission:
        return admit(policy, key, model, features, blocked, now)

    async def settle(
        self, policy: Policy, reservation: Reservation | None, key: str | None, cost: float, now: float, started: float
    ) -> None:
        settle_locally(policy, reservation, key, cost, now, started)

    async def adjust(self, policy: Policy, key: str | None, delta: float, started: float, now: float) -> None:
        policy.book.adjust(key, delta, started, now)

    async def refresh(self, policy: Policy) -> None:
        return None

    async def drain(self) -> None:
        return None

    async def seed(self, day: Mapping[str, float], month: Mapping[str, float]) -> None:
        return None  # the counters were loaded from the ledger: they are the book


def settle_locally(
    policy: Policy, reservation: Reservation | None, key: str | None, cost: float, now: float, started: float
) -> None:
    if reservation is not None:
        policy.book.settle(reservation, cost, now, started)
    elif cost:
        policy.book.add_spend(key, cost, now, started)
