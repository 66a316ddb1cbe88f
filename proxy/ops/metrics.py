"""The metric set, on an injected registry. Names are a contract with the dashboards.

Per-request numbers are recorded by one accounting sink (`observe`) into
lock-free tallies (`proxy.ops.tallies`), so a request costs dictionary updates.
State-derived gauges (budgets, cooldowns, rate limits, in-flight, credits) are
read only when Prometheus scrapes, by a collector.

Labels stay bounded: a virtual model label is a configured name (else
`direct` for a real slug, `unknown` for a 404), a model label a configured
chain member (else `other`), a key label a configured key name (else `none`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.config import Config
from proxy.core.breakers import CircuitBreakers
from proxy.core.budget import SpendBook
from proxy.core.ratelimits import RateLimits, Reading
from proxy.core.record import RequestRecord
from proxy.ops.tallies import LatencyTally, Tally, TallyCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OTHER, DIRECT, UNKNOWN, NO_KEY = "other", "direct", "unknown", "none"


@dataclass
class Gauges:
    """Live values the collector reads at scrape time (set by the app, not per request)."""

    in_flight: int = 0
    credits_remaining: dict[str, float] = field(default_factory=dict)
    credits_used_today: dict[str, float] = field(default_factory=dict)
    downgrade_step: Callable[[], int] = lambda: -1
    extra: list[Callable[[], Iterator[Metric]]] = field(default_factory=list)


class Metrics:
    def __init__(self, registry: CollectorRegistry, config: Config) -> None:
        self.registry = registry
        self._virtual = frozenset(config.models)
        self.models = frozenset(m.model for vm in config.models.values() for m in vm.chain or ())
        self._keys = frozenset(k.name for k in config.keys)
        self.gauges = Gauges()
        self.requests = Tally("orproxy_requests", "Client requests by outcome", ["virtual_model", "model", "status"])
        self.cost = Tally("orproxy_cost_usd", "Money spent upstream, USD", ["virtual_model", "model", "key"])
        self.baseline = Tally(
            "orproxy_baseline_cost_usd",
            "What the savings baseline model would have cost, USD",
            ["virtual_model", "key"],
        )
        self.tokens = Tally("orproxy_tokens", "Tokens billed", ["model", "kind"])
        self.duration = LatencyTally(
            "orproxy_request_duration_seconds", "Whole request as the client saw it", ["virtual_model"], LATENCY_BUCKETS
        )
        self.upstream_duration = LatencyTally(
            "orproxy_upstream_duration_seconds", "One upstream attempt", ["model"], LATENCY_BUCKETS
        )
        self.ttft = LatencyTally(
            "orproxy_time_to_first_token_seconds", "Time to the first streamed chunk", ["model"], LATENCY_BUCKETS
        )
        self.attempts = Tally("orproxy_attempts", "Upstream attempts by outcome", ["model", "outcome"])
        self.fallbacks = Tally(
            "orproxy_fallbacks", "Moves to the next chain member", ["virtual_model", "from_model", "reason"]
        )
        registry.register(
            TallyCollector(
                [
                    self.requests,
                    self.cost,
                    self.baseline,
                    self.tokens,
                    self.duration,
                    self.upstream_duration,
                    self.ttft,
                    self.attempts,
                    self.fallbacks,
                ]
            )
        )

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: its names become the allowed label values (series seen stay)."""
        self._virtual = frozenset(config.models)
        self.models = frozenset(m.model for vm in config.models.values() for m in vm.chain or ())
        self._keys = frozenset(k.name for k in config.keys)

    # -- label hygiene ---------------------------------------------------------------------
    def virtual_label(self, record: RequestRecord) -> str:
        if record.requested_model in self._virtual:
            return record.requested_model
        return DIRECT if record.model else UNKNOWN

    def model_label(self, model: str | None) -> str:
        return model if model in self.models else (OTHER if model else "none")

    def key_label(self, key: str | None) -> str:
        return key if key in self._keys else NO_KEY

    # -- the accounting sink -------------------------------------------------------------
    def observe(self, record: RequestRecord) -> None:
        virtual = self.virtual_label(record)
        model = self.model_label(record.model)
        key = self.key_label(record.key_name)
        self.requests.add((virtual, model, str(record.status)))
        self.duration.observe((virtual,), record.latency_s)
        if record.cost is not None and record.cost.usd:
            self.cost.add((virtual, model, key), record.cost.usd)
        if record.baseline_usd:
            self.baseline.add((virtual, key), record.baseline_usd)
        usage = record.usage
        if usage is not None:
            self.tokens.add((model, "prompt"), usage.prompt_tokens)
            self.tokens.add((model, "completion"), usage.completion_tokens)
        if record.ttft_s is not None and record.streamed:
            self.ttft.observe((model,), record.ttft_s)
        previous = None
        for attempt in record.attempts:
            attempt_model = self.model_label(attempt.target.model)
            self.attempts.add((attempt_model, attempt.outcome))
            self.upstream_duration.observe((attempt_model,), attempt.duration_s)
            if previous is not None and previous.target != attempt.target:
                self.fallbacks.add((virtual, self.model_label(previous.target.model), previous.outcome))
            previous = attempt


class StateCollector(Collector):
    """Gauges computed from live state when Prometheus scrapes."""

    def __init__(
        self,
        metrics: Metrics,
        book: SpendBook,
        breakers: CircuitBreakers,
        ratelimits: RateLimits,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._book = book
        self._breakers = breakers
        self._ratelimits = ratelimits
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        gauges = self._metrics.gauges
        now = self._clock()
        in_flight = GaugeMetricFamily("orproxy_in_flight_requests", "Client requests being served")
        in_flight.add_metric([], gauges.in_flight)
        yield in_flight
        yield from self._budget(now)
        cooldown = GaugeMetricFamily(
            "orproxy_model_cooldown", "1 while a model is skipped by its circuit breaker", labels=["model"]
        )
        open_now = {t.model for t in self._breakers.active(now)}
        for model in sorted(self._metrics.models):
            cooldown.add_metric([model], 1.0 if model in open_now else 0.0)
        yield cooldown
        yield from self._rate_limits(now)
        credits = GaugeMetricFamily(
            "orproxy_upstream_credits_remaining_usd", "Credits left on the upstream key", labels=["upstream"]
        )
        for upstream, value in gauges.credits_remaining.items():
            credits.add_metric([upstream], value)
        yield credits
        used = GaugeMetricFamily(
            "orproxy_upstream_usage_daily_usd", "The upstream key's spend today, as it reports", labels=["upstream"]
        )
        for upstream, value in gauges.credits_used_today.items():
            used.add_metric([upstream], value)
        yield used
        for extra in gauges.extra:
            yield from extra()

    def _budget(self, now: float) -> Iterator[Metric]:
        self._book.roll(now)
        spent = GaugeMetricFamily(
            "orproxy_budget_spent_usd", "Spend in the current budget window, USD", labels=["window", "key"]
        )
        limit = GaugeMetricFamily(
            "orproxy_budget_limit_usd", "Budget limit of the window, USD", labels=["window", "key"]
        )
        for scope, window, amount, cap in self._book.snapshot():
            label = scope or "all"
            spent.add_metric([window, label], amount)
            if cap is not None:
                limit.add_metric([window, label], cap)
        yield spent
        yield limit
        # Lets a dashboard project spend to the end of the budget's own day, in the budget's time zone.
        ends = GaugeMetricFamily(
            "orproxy_budget_window_end_timestamp_seconds",
            "When the current budget window ends (epoch seconds)",
            labels=["window"],
        )
        ends.add_metric(["daily"], self._book.calendar.day_end)
        ends.add_metric(["monthly"], self._book.calendar.month_end)
        yield ends
        step = GaugeMetricFamily("orproxy_budget_downgrade_step", "Index of the downgrade step in force (-1: none)")
        step.add_metric([], self._metrics.gauges.downgrade_step())
        yield step

    def _rate_limits(self, now: float) -> Iterator[Metric]:
        names = ("orproxy_ratelimit_remaining", "orproxy_ratelimit_limit", "orproxy_ratelimit_reset_timestamp_seconds")
        helps = ("Upstream rate limit left", "Upstream rate limit size", "When the upstream rate limit resets")
        families = [GaugeMetricFamily(n, h, labels=["upstream", "scope", "model"]) for n, h in zip(names, helps)]
        for labels, reading in self._rate_limit_series(now).items():
            families[0].add_metric(list(labels), reading.remaining)
            if reading.limit is not None:
                families[1].add_metric(list(labels), reading.limit)
            if reading.reset_at is not None:
                families[2].add_metric(list(labels), reading.reset_at)
        yield from families

    def _rate_limit_series(self, now: float) -> dict[tuple[str, str, str], Reading]:
        """One reading per label set. Direct slugs all share the model label `other`, so several
        readings can land on one series: the most constrained one is shown (a duplicate series
        would make Prometheus drop samples). A reading whose reset has passed says the window is
        full again (its limit), or nothing when the limit is unknown."""
        series: dict[tuple[str, str, str], Reading] = {}
        for (target, scope), reading in self._ratelimits.readings().items():
            if reading.reset_at is not None and reading.reset_at <= now:
                if reading.limit is None:
                    continue
                reading = Reading(reading.limit, reading.limit, reading.reset_at)
            labels = (target.upstream, scope, self._metrics.model_label(target.model))
            shown = series.get(labels)
            if shown is None or reading.remaining < shown.remaining:
                series[labels] = reading
        return series
