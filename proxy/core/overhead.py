"""Pure: the proxy's own time on one request, the figure `x-proxy-overhead-ms` and the
`orproxy_overhead_seconds` histogram publish.

Overhead = the wall time from taking the request to handing over the answer, minus the waits on
the upstream (each attempt, from sending it to having its answer or first stream read, and the
backoff sleeps between attempts). What is left is the proxy's work and its queueing on the event
loop: reading and checking the body, routing, admission, the ledger commit, building the answer.
A stream's header can only say what happened before its headers went out; the histogram also
counts the work on each relayed read (inspecting and metering its events, not the write, which
may wait on the client) and the commit before its end. The clock is read by the callers (IO
edges): `now` is `time.perf_counter()`.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER = "x-proxy-overhead-ms"
# The histogram's buckets, in seconds: from 10 us (a cache hit's bookkeeping) to 100 ms (a stalled loop).
BUCKETS = (1e-5, 2.5e-5, 5e-5, 7.5e-5, 1e-4, 1.5e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)


@dataclass(slots=True)
class Overhead:
    started: float  # perf_counter() when the proxy took the request
    waited_s: float = 0.0  # on the upstream: attempts and the backoff between them
    at_headers_s: float | None = None  # a stream's overhead when its headers went out
    streaming_s: float = 0.0  # a stream's proxy work after its headers

    def until(self, now: float) -> float:
        """The overhead from the start to `now` (never below 0)."""
        return max(0.0, now - self.started - self.waited_s)

    def total(self, now: float) -> float:
        """The whole request's overhead: a stream's up to its headers plus its work after them."""
        if self.at_headers_s is None:
            return self.until(now)
        return self.at_headers_s + self.streaming_s


def milliseconds(seconds: float) -> str:
    """The header's value: milliseconds with microsecond resolution, e.g. `0.084`."""
    return f"{seconds * 1000:.3f}"
