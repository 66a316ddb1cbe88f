"""What will this config cost? Pure cost simulation of a traffic mix, and replay of the ledger
through another config.

Pricing rule for both: a virtual model costs what its chain's PRIMARY member costs (fallbacks
only serve when the primary fails, so the primary is what a healthy day pays). A rule-routed
model (`auto`) is first resolved by its rules: for a mix, with a request that has no features
(no task, tools, images or JSON mode; 0 estimated prompt tokens), which lands on the catch-all
unless a rule matches such a bare request; for a ledger row, with what the ledger recorded.

Units: `Price` holds USD per TOKEN. A request of T tokens with prompt share p has p*T prompt
tokens and (1-p)*T completion tokens, so it costs p*T*prompt + (1-p)*T*completion + request fee.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.core.features import RequestFeatures
from proxy.core.pricing import PER_MILLION, Price, PriceBook
from proxy.core.routing import Router, UnknownModel

if TYPE_CHECKING:  # the ledger module pulls in aiosqlite; the simulation itself stays pure
    from proxy.config import Config
    from proxy.money.ledger_rows import LedgerRow

DAYS_PER_MONTH = 30
SHARE_TOLERANCE = 1e-6
SECONDS_PER_DAY = 86_400

LEDGER_FEATURES_NOTE = (
    "routing saw only what the ledger records: the prompt tokens (the upstream's count) and "
    "whether the request streamed; task, tools, images, JSON mode and message text are not "
    "recorded, so they count as absent"
)


class SimulationError(ValueError):
    """Input that cannot be simulated; the message says what to change."""


# ------------------------------------------------------------------ the mix


def parse_mix(text: str) -> dict[str, float]:
    """'cheap=0.6,balanced=0.4' -> {'cheap': 0.6, 'balanced': 0.4}."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, share = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SimulationError(f"--mix: '{part}' is not NAME=SHARE (e.g. cheap=0.6,balanced=0.4)")
        try:
            value = float(share)
        except ValueError:
            raise SimulationError(f"--mix: the share of '{name}' is '{share.strip()}', not a number") from None
        if not math.isfinite(value) or value < 0:
            raise SimulationError(f"--mix: the share of '{name}' must be a number >= 0, got {share.strip()}")
        if name in mix:
            raise SimulationError(f"--mix: '{name}' is listed twice; give each virtual model once")
        mix[name] = value
    if not mix:
        raise SimulationError("--mix is empty: give NAME=SHARE pairs, e.g. cheap=0.6,balanced=0.4")
    return mix


def check_mix(mix: Mapping[str, float], virtual_models: Sequence[str]) -> None:
    unknown = [name for name in mix if name not in virtual_models]
    if unknown:
        raise SimulationError(
            f"--mix names {', '.join(repr(n) for n in unknown)}, not virtual model(s) of the "
            f"config (known: {', '.join(virtual_models)})"
        )
    total = math.fsum(mix.values())
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise SimulationError(
            f"--mix shares add up to {total:.6g}, not 1: adjust them so they sum to 1 "
            f"(e.g. {','.join(f'{n}={v / total:.4g}' for n, v in mix.items())})"
            if total > 0
            else "--mix shares add up to 0: give at least one positive share"
        )


@dataclass(frozen=True, slots=True)
class MixLine:
    virtual_model: str
    share: float
    chain_owner: str  # the virtual model whose chain serves it (itself, unless routed)
    model: str  # that chain's primary member
    price_source: str  # catalogue | override | dearest (not in the catalogue)
    prompt_usd_per_mtok: float
    completion_usd_per_mtok: float
    requests_per_day: float
    cost_per_request_usd: float
    daily_usd: float
    monthly_usd: float


@dataclass(frozen=True)
class MixSimulation:
    requests_per_day: float
    tokens_per_request: float
    prompt_share: float
    prompt_tokens_per_request: float
    completion_tokens_per_request: float
    days_per_month: int
    lines: tuple[MixLine, ...]
    daily_usd: float
    monthly_usd: float
    baseline_model: str
    baseline_cost_per_request_usd: float
    baseline_daily_usd: float
    baseline_monthly_usd: float
    savings_daily_usd: float  # negative: the mix costs more than the baseline
    savings_monthly_usd: float
    savings_pct: float | None  # of the baseline; None when the baseline costs nothing
    notes: tuple[str, ...] = field(default=())


def priced(book: PriceBook, model: str) -> tuple[Price, str]:
    """The price the proxy would charge for `model`: the dearest known price when it is unknown."""
    found = book.lookup(model)
    return found if found else (book.price_or_dearest(model), "dearest")


def primary_of(router: Router, name: str, features: RequestFeatures) -> tuple[str | None, str]:
    """(chain owner, primary model) for a request to `name`; owner None for a direct model slug."""
    owner, _steps = router.resolve(name, features)
    if owner is None:
        return None, name
    return owner, router.chain_of(owner)[0].model


def simulate_mix(
    router: Router,
    book: PriceBook,
    *,
    requests_per_day: float,
    tokens_per_request: float,
    mix: Mapping[str, float],
    prompt_share: float = 0.5,
    baseline: str | None = None,
    days_per_month: int = DAYS_PER_MONTH,
) -> MixSimulation:
    """Daily and monthly cost of `mix` (virtual model -> share of requests) against `baseline` alone."""
    if requests_per_day < 0 or tokens_per_request < 0:
        raise SimulationError("--requests-per-day and --tokens-per-request must be >= 0")
    if not 0 <= prompt_share <= 1:
        raise SimulationError(f"--prompt-share must be between 0 and 1, got {prompt_share:g}")
    check_mix(mix, router.virtual_models)
    baseline = baseline or book.baseline_model
    baseline_found = book.lookup(baseline)
    if baseline_found is None:
        raise SimulationError(
            f"baseline model '{baseline}' is not in the catalogue nor pricing.overrides: "
            "pass --baseline with a listed model (see `orproxy models`)"
        )
    prompt_tokens = tokens_per_request * prompt_share
    completion_tokens = tokens_per_request - prompt_tokens
    lines = []
    for name, share in mix.items():
        owner, model = primary_of(router, name, RequestFeatures())
        price, source = priced(book, model)
        per_request = price.cost(prompt_tokens, completion_tokens)  # type: ignore[arg-type]  # floats are fine
        requests = requests_per_day * share
        lines.append(
            MixLine(
                name,
                share,
                owner or name,
                model,
                source,
                price.prompt * PER_MILLION,
                price.completion * PER_MILLION,
                requests,
                per_request,
                requests * per_request,
                requests * per_request * days_per_month,
            )
        )
    daily = math.fsum(line.daily_usd for line in lines)
    baseline_per_request = baseline_found[0].cost(prompt_tokens, completion_tokens)  # type: ignore[arg-type]
    baseline_daily = requests_per_day * baseline_per_request
    notes = [f"each virtual model is priced at its chain's primary member; a month is {days_per_month} days"]
    if any(line.chain_owner != line.virtual_model for line in lines):
        notes.append(
            "rule-routed models are resolved for a request without features (no task, tools, images, "
            "JSON mode; 0 prompt tokens): usually their catch-all rule"
        )
    notes += [
        f"'{line.model}' is not in the catalogue: priced at the dearest catalogue price, as the proxy would"
        for line in lines
        if line.price_source == "dearest"
    ]
    return MixSimulation(
        requests_per_day,
        tokens_per_request,
        prompt_share,
        prompt_tokens,
        completion_tokens,
        days_per_month,
        tuple(lines),
        daily,
        daily * days_per_month,
        baseline,
        baseline_per_request,
        baseline_daily,
        baseline_daily * days_per_month,
        baseline_daily - daily,
        (baseline_daily - daily) * days_per_month,
        100.0 * (baseline_daily - daily) / baseline_daily if baseline_daily else None,
        tuple(notes),
    )


# ------------------------------------------------------------------ ledger replay


@dataclass(frozen=True, slots=True)
class ReplayGroup:
    requested_model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    actual_usd: float
    what_if_usd: float | None  # None: the other config cannot route this name
    routed_to: tuple[str, ...]  # 'owner: primary' pairs seen, e.g. ('cheap: mistralai/...',)

    @property
    def difference_usd(self) -> float | None:
        return None if self.what_if_usd is None else self.what_if_usd - self.actual_usd


@dataclass(frozen=True)
class Replay:
    start: float
    end: float
    requests: int
    groups: tuple[ReplayGroup, ...]
    actual_usd: float  # rows the other config can route (comparable with what_if_usd)
    what_if_usd: float
    unroutable_requests: int
    unroutable_actual_usd: float
    notes: tuple[str, ...] = field(default=())

    @property
    def difference_usd(self) -> float:
        return self.what_if_usd - self.actual_usd

    @property
    def difference_pct(self) -> float | None:
        return 100.0 * self.difference_usd / self.actual_usd if self.actual_usd else None


def ledger_features(row: LedgerRow) -> RequestFeatures:
    return RequestFeatures(prompt_tokens=row.prompt_tokens, stream=row.streamed)


def what_if_cost(row: LedgerRow, router: Router, book: PriceBook) -> tuple[float, str] | None:
    """(cost under the other config, 'owner: primary'); None when it cannot route the requested name.
    A cache hit stays free: the other config's cache would have answered it too."""
    try:
        owner, model = primary_of(router, row.requested_model, ledger_features(row))
    except UnknownModel:
        return None
    cost = 0.0 if row.cached else priced(book, model)[0].cost(row.prompt_tokens, row.completion_tokens)
    return cost, f"{owner or 'direct'}: {model}"


@dataclass
class _Tally:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    actual: list[float] = field(default_factory=list)
    what_if: list[float] = field(default_factory=list)
    routed_to: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    unroutable: bool = False

    def add(self, row: LedgerRow, result: tuple[float, str] | None) -> None:
        self.requests += 1
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        self.actual.append(row.cost_usd)
        if result is None:
            self.unroutable = True
        else:
            self.what_if.append(result[0])
            self.routed_to[result[1]] = None

    def group(self, name: str) -> ReplayGroup:
        return ReplayGroup(
            name,
            self.requests,
            self.prompt_tokens,
            self.completion_tokens,
            math.fsum(self.actual),
            None if self.unroutable else math.fsum(self.what_if),
            tuple(self.routed_to),
        )


def replay_rows(rows: Iterable[LedgerRow], router: Router, book: PriceBook, *, start: float, end: float) -> Replay:
    """Price every ledger row as the other config (its `router` and `book`) would have, per requested model."""
    tallies: dict[str, _Tally] = {}
    for row in rows:
        tallies.setdefault(row.requested_model, _Tally()).add(row, what_if_cost(row, router, book))
    groups = sorted(
        (tally.group(name) for name, tally in tallies.items()), key=lambda g: (-g.actual_usd, g.requested_model)
    )
    comparable = [g for g in groups if g.what_if_usd is not None]
    unroutable = [g for g in groups if g.what_if_usd is None]
    notes = [
        LEDGER_FEATURES_NOTE,
        "what-if prices each request at the primary of the chain it routes to, from the "
        "other config's catalogue and overrides; budget downgrades are not replayed; cache hits stay free",
    ]
    if unroutable:
        notes.append(
            f"{sum(g.requests for g in unroutable)} request(s) to "
            f"{', '.join(g.requested_model for g in unroutable)} cannot be routed by the other config "
            "(not a virtual model there, and not an allowed direct model): left out of the totals"
        )
    return Replay(
        start,
        end,
        sum(g.requests for g in groups),
        tuple(groups),
        math.fsum(g.actual_usd for g in comparable),
        math.fsum(g.what_if_usd or 0.0 for g in comparable),
        sum(g.requests for g in unroutable),
        math.fsum(g.actual_usd for g in unroutable),
        tuple(notes),
    )


async def read_ledger(
    config: Config, env: Mapping[str, str], *, days: float, now: float
) -> tuple[list[LedgerRow], float, float]:
    """The rows of the ledger `config` names (SQLite or PostgreSQL) of the last `days` days before
    `now`, with the window's bounds."""
    from proxy.money.ledger_api import open_ledger

    if days <= 0:
        raise SimulationError(f"--days must be > 0, got {days:g}")
    start = now - days * SECONDS_PER_DAY
    ledger = await open_ledger(config, env, prune=False)  # read-only: no pruning
    try:
        return await ledger.rows(start, now), start, now
    finally:
        await ledger.close()
