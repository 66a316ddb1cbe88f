"""Why would a request go where it goes? The same decision the proxy makes, with
nothing sent upstream and nothing reserved: the rules that matched, the
downgrade step in force, the ordered chain, who is skipped and why, and the
worst-case cost. Used by `POST /v1/route/explain` and `orproxy explain`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.core.admission import budgeted_plan
from proxy.core.features import RequestFeatures, extract_features
from proxy.core.policy import Policy
from proxy.core.routing import BlockLookup, UnknownModel


def explain(
    policy: Policy,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    *,
    key: str | None,
    blocked: BlockLookup | None,
    now: float,
) -> dict[str, Any]:
    """The routing decision for `body`, as plain data: the same `budgeted_plan` that admission uses."""
    features = extract_features(body, headers)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise UnknownModel(str(model), sorted(policy.config.models))
    plan, step, estimate = budgeted_plan(policy, key, model, features, blocked, now)
    fraction = policy.book.fraction(key, now)
    worst = {
        str(t): usd(policy.prices.worst_case(t.model, features.prompt_tokens, features.max_tokens))
        for t in plan.targets
    }
    refusal = policy.book.would_refuse(key, estimate, now)
    return {
        "requested_model": model,
        "features": _features(features),
        "rules": [{"virtual_model": s.virtual_model, "rule": s.rule} for s in plan.steps],
        "budget": {
            "spent_fraction": round(fraction, 6),
            "downgrade_step": None if step is None else {"index": step[0], "at": step[1].at, "map": step[1].map},
            "rewrites": [{"from": a, "to": b} for a, b in plan.rewrites],
            "would_refuse": None
            if refusal is None
            else {
                "budget": refusal.window,
                "key": refusal.scope or None,
                "spent_usd": usd(refusal.spent),
                "reserved_usd": usd(refusal.reserved),
                "limit_usd": refusal.limit,
                "resets_at": refusal.resets_at,
                "on_exhausted": policy.config.budget.on_exhausted,
            },
        },
        "virtual_model": plan.chain_owner,
        "direct": plan.direct,
        "chain": [{"model": t.model, "upstream": t.upstream, "worst_case_usd": worst[str(t)]} for t in plan.targets],
        "skipped": [
            {"model": t.model, "upstream": t.upstream, "reason": b.reason, "until": b.until, "detail": b.detail}
            for t, b in plan.skipped
        ],
        "estimated_worst_case_usd": usd(estimate),
        "route": plan.describe(),
    }


def usd(amount: float) -> float:
    """Dollars to the nano-dollar (the ledger's own precision): 0.0150008, not 0.015000800000000002."""
    return round(amount, 9)


def _features(f: RequestFeatures) -> dict[str, Any]:
    return {
        "task": f.task,
        "has_tools": f.has_tools,
        "has_images": f.has_images,
        "json_mode": f.json_mode,
        "stream": f.stream,
        "prompt_tokens_estimate": f.prompt_tokens,
        "max_tokens": f.max_tokens,
    }
