"""Pure: which ledger rows reconciliation looks up, when, and what OpenRouter's answer says.

A row's cost is an estimate when the proxy could not read the upstream's own figure: a stream
cut before its usage chunk (`estimate`, from the text seen), or a request given up at shutdown
(`reserved`, the reservation's worst case). On an OpenRouter upstream the exact figure can be
fetched afterwards from `GET /generation?id=<generation id>`, which answers 404 until the
generation is recorded (usually within seconds). The lookups, the ledger update and the budget
correction are done by `proxy.money.reconcile`; the decisions are here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.core.pricing import Tokens

ESTIMATED_SOURCES = frozenset(("estimate", "reserved"))
# Seconds to wait before each lookup of one generation: the first soon (OpenRouter records a
# generation within seconds), then backing off to an hour. After the last, the row keeps its
# estimate; the number of lookups made is kept in the ledger, so a restart does not start over.
SCHEDULE = (1.0, 3.0, 10.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
# Rows older than this are not looked up at start-up (an outage of the proxy past it leaves them as they are).
HORIZON_S = 7 * 86_400.0


def qualifies(cost_source: str, generation_id: str | None, upstream_kind: str | None) -> bool:
    """Whether a row's cost can and should be corrected with OpenRouter's own figure."""
    return cost_source in ESTIMATED_SOURCES and bool(generation_id) and upstream_kind == "openrouter"


def next_delay(tries: int, schedule: tuple[float, ...] = SCHEDULE) -> float | None:
    """Seconds until lookup number `tries + 1`, or None when `tries` lookups were the last."""
    return schedule[tries] if 0 <= tries < len(schedule) else None


@dataclass(frozen=True, slots=True)
class Generation:
    """What OpenRouter billed for one generation."""

    cost_usd: float
    tokens: Tokens
    cancelled: bool


def read_generation(payload: Any) -> Generation | None:
    """The figures of a `GET /generation` answer (`{"data": {...}}`), or None when it has no
    usable cost. Token counts are the provider's own (`native_tokens_*`, what usage reports and
    the bill is made of), else OpenRouter's normalised ones."""
    data = payload.get("data") if isinstance(payload, Mapping) else None
    if not isinstance(data, Mapping):
        return None
    cost = data.get("total_cost")
    if isinstance(cost, bool) or not isinstance(cost, int | float) or not math.isfinite(cost) or cost < 0:
        return None
    prompt = _count(data, "native_tokens_prompt", "tokens_prompt")
    completion = _count(data, "native_tokens_completion", "tokens_completion")
    cached = _count(data, "native_tokens_cached")
    return Generation(float(cost), Tokens(prompt, completion, min(cached, prompt)), data.get("cancelled") is True)


def _count(data: Mapping[str, Any], *names: str) -> int:
    for name in names:
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0
