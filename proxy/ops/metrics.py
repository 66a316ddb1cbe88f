"""The metric set, on an injected registry. Names are a contract with the dashboards.

Per-request numbers are recorded by one accounting sink (`observe`) into
lock-free tallies (`proxy.ops.tallies`), so a request costs dictionary updates.
State-derived gauges (budgets, cooldowns, rate limits, in-flight, credits) are
read only when Prometheus scrapes, by a collector.

Labels stay bounded (`proxy.core.policy.Labels`): a virtual model label is a
configured name (else `direct` for a real slug, `unknown` for a 404), a model
label a configured chain member (else `other`), a key label a configured key
name (else `none`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.cache.response_cache import CacheSlot
from proxy.core.breakers import CircuitBreakers
from proxy.core.policy import Policy
from proxy.core.ratelimits import RateLimits, Reading
from proxy.core.record import RequestRecord
from proxy.ops.fleet import FleetFiles, FleetLatencyTally, FleetTally, MultiProcessCollector
from proxy.ops.tallies import LatencyTally, Tally, TallyCollector

if TYPE_CHECKING:
    from proxy.ops.runtime import Runtime
    from proxy.state.redis_backend import RedisState

IN_FLIGHT_HELP = "Client requests being served"
CACHE_HITS_HELP = "Requests answered from the response cache"
CACHE_MISSES_HELP = "Cacheable requests that had to go upstream"
STATE_ERRORS_HELP = "Calls to the shared state backend that failed"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Gauges:
    """Live values the collector reads at scrape time (set by the app, not per request)."""

    in_flight: int = 0
    credits_remaining: dict[str, float] = field(default_factory=dict)
    credits_used_today: dict[str, float] = field(default_factory=dict)


class Metrics:
    """The per-request tallies (state only): label values come bounded by the policy of the
    snapshot each request ran on."""

    def __init__(self, registry: CollectorRegistry, fleet: FleetFiles | None = None) -> None:
        self.registry = registry
        self.gauges = Gauges()
        self.fleet = fleet

        def tally(name: str, documentation: str, labels: list[str]) -> Tally:
            return (
                Tally(name, documentation, labels) if fleet is None else FleetTally(name, documentation, labels, fleet)
            )

        def histogram(name: str, documentation: str, labels: list[str]) -> LatencyTally:
            if fleet is None:
                return LatencyTally(name, documentation, labels, LATENCY_BUCKETS)
            return FleetLatencyTally(name, documentation, labels, LATENCY_BUCKETS, fleet)

        self.requests = tally(
            "orproxy_requests", "Client requests by outcome", ["virtual_model", "model", "status", "api"]
        )
        self.cost = tally("orproxy_cost_usd", "Money spent upstream, USD", ["virtual_model", "model", "key", "api"])
        self.baseline = tally(
            "orproxy_baseline_cost_usd",
            "What the savings baseline model would have cost, USD",
            ["virtual_model", "key"],
        )
        self.cache_saved = tally(
            "orproxy_cache_saved_usd",
            "What answers from the response cache saved: their cost when they were bought, USD",
            ["virtual_model", "key"],
        )
        self.tokens = tally("orproxy_tokens", "Tokens billed", ["model", "kind", "api"])
        self.duration = histogram(
            "orproxy_request_duration_seconds", "Whole request as the client saw it", ["virtual_model", "api"]
        )
        self.upstream_duration = histogram("orproxy_upstream_duration_seconds", "One upstream attempt", ["model"])
        self.ttft = histogram("orproxy_time_to_first_token_seconds", "Time to the first streamed chunk", ["model"])
        self.attempts = tally("orproxy_attempts", "Upstream attempts by outcome", ["model", "outcome"])
        self.fallbacks = tally(
            "orproxy_fallbacks", "Moves to the next chain member", ["virtual_model", "from_model", "reason"]
        )
        self.batch_lines = tally("orproxy_batch_lines", "Batch lines by what became of them", ["outcome"])
        self.batch_cost = tally("orproxy_batch_cost_usd", "Money spent upstream on batch lines, USD", ["key"])
        tallies: list[Tally | LatencyTally] = [
            self.batch_lines,
            self.batch_cost,
            self.requests,
            self.cost,
            self.baseline,
            self.cache_saved,
            self.tokens,
            self.duration,
            self.upstream_duration,
            self.ttft,
            self.attempts,
            self.fallbacks,
        ]
        if fleet is None:
            registry.register(TallyCollector(tallies))
        else:  # every worker's files, this one's included
            MultiProcessCollector(registry, str(fleet.directory))

    # -- the accounting sink -------------------------------------------------------------
    def observe(self, record: RequestRecord, policy: Policy) -> None:
        labels = policy.labels
        virtual = labels.virtual(record.requested_model, record.model is not None)
        model = labels.model(record.model)
        key = labels.key(record.key_name)
        api = record.api  # one of the proxy's own API names: bounded
        self.requests.add((virtual, model, str(record.status), api))
        self.duration.observe((virtual, api), record.latency_s)
        if record.cost is not None and record.cost.usd:
            self.cost.add((virtual, model, key, api), record.cost.usd)
            if record.batch_id is not None:
                self.batch_cost.add((key,), record.cost.usd)
        if record.baseline_usd:
            self.baseline.add((virtual, key), record.baseline_usd)
        if record.cached and record.saved_usd:
            self.cache_saved.add((virtual, key), record.saved_usd)
        usage = record.usage
        if usage is not None:
            self.tokens.add((model, "prompt", api), usage.prompt_tokens)
            self.tokens.add((model, "completion", api), usage.completion_tokens)
        if record.ttft_s is not None and record.streamed:
            self.ttft.observe((model,), record.ttft_s)
        previous = None
        for attempt in record.attempts:
            attempt_model = labels.model(attempt.target.model)
            self.attempts.add((attempt_model, attempt.outcome))
            self.upstream_duration.observe((attempt_model,), attempt.duration_s)
            if previous is not None and previous.target != attempt.target:
                self.fallbacks.add((virtual, labels.model(previous.target.model), previous.outcome))
            previous = attempt


class StateCollector(Collector):
    """Gauges computed from live state when Prometheus scrapes."""

    def __init__(
        self,
        metrics: Metrics,
        current: Callable[[], Runtime | None],
        breakers: CircuitBreakers,
        ratelimits: RateLimits,
        cache: CacheSlot,
        clock: Callable[[], float] = time.time,
        shared: RedisState | None = None,
    ) -> None:
        self._shared = shared  # None: the state is in this process
        self._metrics = metrics
        self._current = current
        self._cache = cache
        self._breakers = breakers
        self._ratelimits = ratelimits
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        runtime = self._current()
        if runtime is None:
            return
        gauges = self._metrics.gauges
        now = self._clock()
        policy = runtime.policy
        fleet = self._metrics.fleet
        if fleet is not None:  # per process: written out for MultiProcessCollector to sum
            self._write_out(fleet)
        else:
            in_flight = GaugeMetricFamily("orproxy_in_flight_requests", IN_FLIGHT_HELP)
            in_flight.add_metric([], gauges.in_flight)
            yield in_flight
        yield from self._budget(policy, now)
        cooldown = GaugeMetricFamily(
            "orproxy_model_cooldown", "1 while a model is skipped by its circuit breaker", labels=["model"]
        )
        open_now = {t.model for t in self._breakers.active(now)}
        for model in sorted(policy.labels.models):
            cooldown.add_metric([model], 1.0 if model in open_now else 0.0)
        yield cooldown
        yield from self._rate_limits(policy, now)
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
        if fleet is None:
            yield from self._cache_counters()
        yield from self._state_health(fleet is None)

    def _write_out(self, fleet: FleetFiles) -> None:
        """This worker's per-process figures, into its files (the others write theirs every second)."""
        fleet.gauge("orproxy_in_flight_requests", IN_FLIGHT_HELP, self._metrics.gauges.in_flight)
        file = self._cache.file
        if file is not None:
            fleet.counter("orproxy_cache_hits", CACHE_HITS_HELP, file.hits)
            fleet.counter("orproxy_cache_misses", CACHE_MISSES_HELP, file.misses)
        if self._shared is not None:
            fleet.counter("orproxy_state_errors", STATE_ERRORS_HELP, self._shared.health.errors)

    def write_out(self) -> None:
        if self._metrics.fleet is not None:
            self._write_out(self._metrics.fleet)

    def _state_health(self, with_errors: bool) -> Iterator[Metric]:
        """Whether the shared state answers, as this process sees it (each worker connects on its own)."""
        up = GaugeMetricFamily(
            "orproxy_state_backend_up", "1 while the shared state backend answers (local: always)", labels=["backend"]
        )
        shared = self._shared
        up.add_metric(["local" if shared is None else "redis"], 1.0 if shared is None or shared.health.up else 0.0)
        yield up
        if with_errors:  # in a fleet, the count is every worker's, through the files
            errors = CounterMetricFamily("orproxy_state_errors", STATE_ERRORS_HELP)
            errors.add_metric([], 0 if shared is None else shared.health.errors)
            yield errors

    def _budget(self, policy: Policy, now: float) -> Iterator[Metric]:
        book = policy.book
        book.roll(now)
        spent = GaugeMetricFamily(
            "orproxy_budget_spent_usd", "Spend in the current budget window, USD", labels=["window", "key"]
        )
        limit = GaugeMetricFamily(
            "orproxy_budget_limit_usd", "Budget limit of the window, USD", labels=["window", "key"]
        )
        for scope, window, amount, cap in book.snapshot():
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
        ends.add_metric(["daily"], book.calendar.day_end)
        ends.add_metric(["monthly"], book.calendar.month_end)
        yield ends
        step = GaugeMetricFamily("orproxy_budget_downgrade_step", "Index of the downgrade step in force (-1: none)")
        found = book.downgrade_step(book.fraction(None, now))
        step.add_metric([], found[0] if found else -1)
        yield step

    def _cache_counters(self) -> Iterator[Metric]:
        file = self._cache.file
        if file is None:
            return
        hits = CounterMetricFamily("orproxy_cache_hits", CACHE_HITS_HELP)
        hits.add_metric([], file.hits)
        yield hits
        misses = CounterMetricFamily("orproxy_cache_misses", CACHE_MISSES_HELP)
        misses.add_metric([], file.misses)
        yield misses

    def _rate_limits(self, policy: Policy, now: float) -> Iterator[Metric]:
        names = ("orproxy_ratelimit_remaining", "orproxy_ratelimit_limit", "orproxy_ratelimit_reset_timestamp_seconds")
        helps = ("Upstream rate limit left", "Upstream rate limit size", "When the upstream rate limit resets")
        families = [GaugeMetricFamily(n, h, labels=["upstream", "scope", "model"]) for n, h in zip(names, helps)]
        for labels, reading in self._rate_limit_series(policy, now).items():
            families[0].add_metric(list(labels), reading.remaining)
            if reading.limit is not None:
                families[1].add_metric(list(labels), reading.limit)
            if reading.reset_at is not None:
                families[2].add_metric(list(labels), reading.reset_at)
        yield from families

    def _rate_limit_series(self, policy: Policy, now: float) -> dict[tuple[str, str, str], Reading]:
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
            labels = (target.upstream, scope, policy.labels.model(target.model))
            shown = series.get(labels)
            if shown is None or reading.remaining < shown.remaining:
                series[labels] = reading
        return series
