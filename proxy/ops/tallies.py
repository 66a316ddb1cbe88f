"""Lock-free counters and histograms for the per-request metrics.

prometheus_client's metrics take a threading lock on every update, which the
single-threaded event loop does not need; with ten updates per request that
was a measurable share of the proxy's own overhead. These tallies are plain
dictionaries updated on the loop, turned into Prometheus families only when
Prometheus scrapes (`TallyCollector`). Same names, same exposition.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

Labels = tuple[str, ...]


class Tally:
    """A counter family: label values -> total."""

    __slots__ = ("documentation", "labelnames", "name", "values")

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.values: dict[Labels, float] = {}

    def add(self, labels: Labels, amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class LatencyTally:
    """A histogram family: label values -> (count per bucket, sum)."""

    __slots__ = ("bounds", "documentation", "labelnames", "name", "values")

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], bounds: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(sorted(bounds))
        self.values: dict[Labels, list[float]] = {}  # per bucket counts (+Inf last), then the sum

    def observe(self, labels: Labels, value: float) -> None:
        slots = self.values.get(labels)
        if slots is None:
            slots = self.values[labels] = [0.0] * (len(self.bounds) + 2)
        slots[bisect_left(self.bounds, value)] += 1
        slots[-1] += value

    def bounds_index(self, value: float) -> int:
        """The bucket `value` falls in (the last one: above every bound)."""
        return bisect_left(self.bounds, value)

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*(repr(float(b)) if b != int(b) else f"{float(b)}" for b in self.bounds), "+Inf"]
        for labels, slots in self.values.items():
            running = 0.0
            buckets = []
            for edge, count in zip(edges, slots[:-1]):
                running += count
                buckets.append((edge, running))
            family.add_metric(list(labels), buckets, sum_value=slots[-1])
        return family


class TallyCollector(Collector):
    def __init__(self, tallies: Sequence[Tally | LatencyTally]) -> None:
        self._tallies = tallies

    def collect(self) -> Iterator[Metric]:
        for tally in self._tallies:
            yield tally.family()
