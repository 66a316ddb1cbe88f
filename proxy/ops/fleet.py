"""Metrics of a fleet of workers (`orproxy serve --workers N`), summed in every scrape.

The N workers share one port, so a scrape reaches one of them at random. Each
worker therefore writes its counters and histograms through to memory-mapped
files in a directory the supervisor owns, in prometheus_client's multiprocess
format, and whichever worker is scraped answers with prometheus_client's
`MultiProcessCollector` over all of them. A worker that dies leaves its file
behind, so totals never go backwards (which Prometheus would read as a counter
reset); its replacement writes a file of its own. Live gauges (requests in
flight) are written per process and dropped by the supervisor when that
process is gone (`mark_process_dead`). Gauges read from shared state (budgets,
breakers) come from the scraped worker: on the Redis backend every worker
reads the same figures.

A write is a store into a shared page: no system call on the request path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.utils import floatToGoString

from proxy.ops.tallies import Labels, LatencyTally, Tally

__all__ = ["FleetFiles", "FleetLatencyTally", "FleetTally", "MultiProcessCollector", "mark_process_dead"]


class FleetFiles:
    """This process's files in the fleet's metrics directory."""

    def __init__(self, directory: Path, pid: int | None = None) -> None:
        self.directory = directory
        pid = os.getpid() if pid is None else pid
        self.counters = MmapedDict(str(directory / f"counter_{pid}.db"))
        self.histograms = MmapedDict(str(directory / f"histogram_{pid}.db"))
        self.live = MmapedDict(str(directory / f"gauge_livesum_{pid}.db"))

    def gauge(self, name: str, documentation: str, value: float) -> None:
        """A gauge summed over the live workers (its file goes when the worker does)."""
        self.live.write_value(mmap_key(name, name, [], [], documentation), value, 0.0)

    def counter(self, name: str, documentation: str, value: float) -> None:
        """A counter this process keeps elsewhere (the cache's hits): its running total, written out."""
        self.counters.write_value(mmap_key(name, name + "_total", [], [], documentation), value, 0.0)

    def close(self) -> None:
        for file in (self.counters, self.histograms, self.live):
            file.close()


class FleetTally(Tally):
    """A counter family kept in memory and written through to this worker's file."""

    __slots__ = ("_file", "_keys")

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], files: FleetFiles) -> None:
        super().__init__(name, documentation, labelnames)
        self._file = files.counters
        self._keys: dict[Labels, str] = {}

    def add(self, labels: Labels, amount: float = 1.0) -> None:
        values = self.values
        value = values[labels] = values.get(labels, 0.0) + amount
        key = self._keys.get(labels)
        if key is None:
            key = self._keys[labels] = mmap_key(
                self.name, self.name + "_total", list(self.labelnames), list(labels), self.documentation
            )
        self._file.write_value(key, value, 0.0)


class FleetLatencyTally(LatencyTally):
    """A histogram family written through: per-bucket counts (not cumulative) and the sum, as
    `MultiProcessCollector` expects them."""

    __slots__ = ("_file", "_keys")

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], bounds: Sequence[float], files: FleetFiles
    ) -> None:
        super().__init__(name, documentation, labelnames, bounds)
        self._file = files.histograms
        self._keys: dict[Labels, list[str]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        super().observe(labels, value)
        keys = self._keys.get(labels)
        if keys is None:
            keys = self._keys[labels] = list(self._series(labels))
        slots = self.values[labels]
        index = self.bounds_index(value)
        self._file.write_value(keys[index], slots[index], 0.0)
        self._file.write_value(keys[-1], slots[-1], 0.0)

    def _series(self, labels: Labels) -> Iterator[str]:
        names = [*self.labelnames, "le"]
        for edge in (*self.bounds, float("inf")):
            yield mmap_key(
                self.name, self.name + "_bucket", names, [*labels, floatToGoString(edge)], self.documentation
            )
        yield mmap_key(self.name, self.name + "_sum", list(self.labelnames), list(labels), self.documentation)
