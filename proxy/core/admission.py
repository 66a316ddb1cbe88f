"""Admission: turn a request into a plan the budget can afford, or refuse it.

Route with the downgrade step that today's spend calls for, reserve the plan's
worst-case cost, and when that does not fit either step down to the cheapest
chain (`on_exhausted: cheapest`) or refuse with a message naming the budget.
No IO: the only state touched is the in-memory spend book.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, replace

from proxy.config import DowngradeStep
from proxy.core.budget import Refusal, Reservation
from proxy.core.errors import BudgetExceeded
from proxy.core.features import RequestFeatures
from proxy.core.policy import Policy
from proxy.core.pricing import PriceBook
from proxy.core.routing import BlockLookup, Plan, Router


@dataclass(frozen=True, slots=True)
class Admission:
    plan: Plan
    reservation: Reservation
    downgrade: str | None  # for the x-proxy-downgrade header; None when nothing was rewritten


def worst_case(prices: PriceBook, plan: Plan, prompt_tokens: int, max_tokens: int | None) -> float:
    """The most a plan can cost: the dearest member decides, since a fallback may land on it."""
    return max((prices.worst_case(t.model, prompt_tokens, max_tokens) for t in plan.targets), default=0.0)


def budgeted_plan(
    policy: Policy,
    key: str | None,
    model: str,
    features: RequestFeatures,
    blocked: BlockLookup | None,
    now: float,
) -> tuple[Plan, tuple[int, DowngradeStep] | None, float]:
    """The plan under today's downgrade step, the step (index, rule) and the plan's worst-case cost.
    Reserves nothing: `admit` and explain both start here."""
    book = policy.book
    step = book.downgrade_step(book.fraction(key, now)) if policy.config.budget.downgrade else None
    plan = policy.router.plan(model, features, blocked, step[1].map if step else None)
    return plan, step, worst_case(policy.prices, plan, features.prompt_tokens, features.max_tokens)


def admit(
    policy: Policy,
    key: str | None,
    model: str,
    features: RequestFeatures,
    blocked: BlockLookup | None,
    now: float,
) -> Admission:
    """Admission against the in-process spend book: `admission` driven by `SpendBook.try_reserve`."""
    steps = admission(policy, key, model, features, blocked, now)
    amount = next(steps)
    try:
        while True:
            amount = steps.send(policy.book.try_reserve(key, amount, now))
    except StopIteration as done:
        return done.value


def admission(
    policy: Policy,
    key: str | None,
    model: str,
    features: RequestFeatures,
    blocked: BlockLookup | None,
    now: float,
) -> Generator[float, Reservation | Refusal, Admission]:
    """The admission decision without the reserving (sans-IO): yields each amount to reserve and is
    sent what the spend store said (a Reservation or a Refusal); returns the Admission or raises
    BudgetExceeded. The in-process book answers at once (`admit`), a shared one over the network."""
    plan, step, estimate = budgeted_plan(policy, key, model, features, blocked, now)
    outcome, needed = (yield estimate), estimate
    if isinstance(outcome, Reservation):
        return Admission(plan, outcome, _describe(plan, f"step {step[0]} at {step[1].at:.0%}" if step else ""))
    if policy.config.budget.on_exhausted == "cheapest":
        cheaper = _cheapest_plan(policy.router, policy.prices, features, blocked, plan)
        if cheaper is not None:
            cheap_plan, cheap_estimate = cheaper
            second = yield cheap_estimate
            if isinstance(second, Reservation):
                return Admission(cheap_plan, second, _describe(cheap_plan, "budget exhausted: cheapest"))
            outcome, needed = second, cheap_estimate  # quote what was tried last, not the dearer plan
    raise _refusal_error(outcome, needed, now)


def _cheapest_plan(
    router: Router, prices: PriceBook, features: RequestFeatures, blocked: BlockLookup | None, original: Plan
) -> tuple[Plan, float] | None:
    """The chain model whose worst case is lowest for this very request."""
    best: tuple[Plan, float] | None = None
    for name in router.chain_models_of(features.kind):
        plan = router.plan(name, features, blocked)
        if not plan.targets:
            continue
        cost = worst_case(prices, plan, features.prompt_tokens, features.max_tokens)
        if best is None or cost < best[1]:
            best = (plan, cost)
    if best is None or best[0].chain_owner == original.chain_owner:
        return None
    requested = original.requested
    plan = best[0]
    return replace(plan, requested=requested, rewrites=((requested, plan.chain_owner or ""),)), best[1]


def _describe(plan: Plan, why: str) -> str | None:
    if not plan.rewrites:
        return None
    return ", ".join(f"{a}->{b}" for a, b in plan.rewrites) + (f" ({why})" if why else "")


def _refusal_error(refusal: Refusal, needed: float, now: float) -> BudgetExceeded:
    return BudgetExceeded(refusal.message(needed, now), retry_after=max(1.0, refusal.resets_at - now))
