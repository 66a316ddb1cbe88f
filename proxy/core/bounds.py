"""Pure: bounds on the figures of one ledger row, checked when the row is built.

A figure past its bound is a bug or a hostile upstream, never a real bill: a `usage.cost` of
$9.2e9 would overflow SQLite's 64-bit integer (money is stored in nano-dollars) and fail the
whole batch of rows it was written with, and would exhaust every budget it was booked against.
Such a figure is clamped to the bound, the row says so in `flags`, and the accountant logs it
once; the request and every other row go on as usual.
"""

from __future__ import annotations

import math

from proxy.core.pricing import Tokens

# No single chat completion costs this much: the dearest models bill about $600 per million
# tokens, so even 2 million tokens of context on them stay two orders of magnitude below.
MAX_ROW_USD = 10_000.0
# Past every model's context window (the largest are a few million tokens) by far.
MAX_ROW_TOKENS = 100_000_000


def bound_usd(name: str, value: float, clamped: list[str]) -> float:
    """`value` within [0, MAX_ROW_USD]; a NaN counts as 0. Names a clamped figure in `clamped`."""
    if math.isnan(value) or value < 0:
        clamped.append(name)
        return 0.0
    if value > MAX_ROW_USD:
        clamped.append(name)
        return MAX_ROW_USD
    return value


def bound_tokens(tokens: Tokens, clamped: list[str]) -> Tokens:
    """Every count within [0, MAX_ROW_TOKENS] (the usage parser already refuses negatives)."""
    if max(tokens) <= MAX_ROW_TOKENS:
        return tokens
    fields = Tokens._fields
    clamped.extend(f"{name}_tokens" for name, count in zip(fields, tokens) if count > MAX_ROW_TOKENS)
    return Tokens(*(min(count, MAX_ROW_TOKENS) for count in tokens))


def flags_of(clamped: list[str]) -> str | None:
    """What the ledger's `flags` column says about the clamped figures (None: none were)."""
    return "clamped:" + ",".join(clamped) if clamped else None
