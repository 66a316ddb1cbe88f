"""Admission: turn a request into a plan the budget can afford, or refuse it.

Route with the downgrade step that today's spend calls for, reserve the plan's
worst-case cost, and when that does not fit either step down to the cheapest
chain (`on_exhausted: cheapest`) or refuse with a message naming the budget.
No IO: the only state touched is the in-memory spend book.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import Config, DowngradeStep
from proxy.core.budget import Refusal, Reservation
from proxy.core.errors import BudgetExceeded
from proxy.core.features import RequestFeatures
from proxy.core.routing import BlockLookup, Plan, Router
from proxy.money.accounting import Accountant


@dataclass(frozen=True, slots=True)
class Admission:
    plan: Plan
    reservation: Reservation
    downgrade: str | None  # for the x-proxy-downgrade header; None when nothing was rewritten


def budgeted_plan(
    config: Config,
    router: Router,
    accountant: Accountant,
    key: str | None,
    model: str,
    features: RequestFeatures,
    blocked: BlockLookup | None,
    now: float,
) -> tuple[Plan, tuple[int, DowngradeStep] | None, float]:
    """The plan under today's downgrade step, the step (index, rule) and the plan's worst-case cost.
    Reserves nothing: `admit` and explain both start here."""
    book = accountant.book
    step = book.downgrade_step(book.fraction(key, now)) if config.budget.downgrade else None
    plan = router.plan(model, features, blocked, step[1].map if step else None)
    return plan, step, accountant.worst_case(plan, features.prompt_tokens, features.max_tokens)


def admit(
    config: Config,
    router: Router,
    accountant: Accountant,
    key: str | None,
    model: str,
    features: RequestFeatures,
    blocked: BlockLookup | None,
    now: float,
) -> Admission:
    plan, step, estimate = budgeted_plan(config, router, accountant, key, model, features, blocked, now)
    outcome, needed = accountant.reserve(key, estimate), estimate
    if isinstance(outcome, Reservation):
        return Admission(plan, outcome, _describe(plan, f"step {step[0]} at {step[1].at:.0%}" if step else ""))
    if config.budget.on_exhausted == "cheapest":
        cheaper = _cheapest_plan(router, accountant, features, blocked, plan)
        if cheaper is not None:
            cheap_plan, cheap_estimate = cheaper
            second = accountant.reserve(key, cheap_estimate)
            if isinstance(second, Reservation):
                return Admission(cheap_plan, second, _describe(cheap_plan, "budget exhausted: cheapest"))
            outcome, needed = second, cheap_estimate  # quote what was tried last, not the dearer plan
    raise _refusal_error(outcome, needed, now)


def _cheapest_plan(
    router: Router, accountant: Accountant, features: RequestFeatures, blocked: BlockLookup | None, original: Plan
) -> tuple[Plan, float] | None:
    """The chain model whose worst case is lowest for this very request."""
    best: tuple[Plan, float] | None = None
    for name in router.chain_models:
        plan = router.plan(name, features, blocked)
        if not plan.targets:
            continue
        cost = accountant.worst_case(plan, features.prompt_tokens, features.max_tokens)
        if best is None or cost < best[1]:
            best = (plan, cost)
    if best is None or best[0].chain_owner == original.chain_owner:
        return None
    requested = original.requested
    plan = best[0]
    rewritten = Plan(
        requested, plan.chain_owner, plan.steps, plan.targets, plan.skipped, ((requested, plan.chain_owner or ""),)
    )
    return rewritten, best[1]


def _describe(plan: Plan, why: str) -> str | None:
    if not plan.rewrites:
        return None
    return ", ".join(f"{a}->{b}" for a, b in plan.rewrites) + (f" ({why})" if why else "")


def _refusal_error(refusal: Refusal, needed: float, now: float) -> BudgetExceeded:
    return BudgetExceeded(refusal.message(needed, now), retry_after=max(1.0, refusal.resets_at - now))
