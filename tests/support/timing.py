"""Time in the tests: a wall clock that moves only when a test moves it, and bounded polls for
what happens in the background, instead of fixed sleeps.

A test that still waits on the real clock (a timeout or a latency over a real socket, a sleep
inside the proxy that no injected clock reaches, a real subprocess or signal) is marked
`realtime`, with a comment saying why.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from proxy.cache.response_cache import ResponseCache


class Clock:
    """For `create_app(clock=...)` (the `make_proxy` fixture's `clock=`), `RateLimits`, `Ledger.open`
    and `ResponseCache.open`: it reads `now` and moves only on `advance`.

    It starts at the real time by default, because some of the proxy still reads the real clock
    (the executor's breaker windows and Retry-After waits): the two must agree to within the
    seconds a test runs. A test with no upstream failures may pin any time (`Clock.at(...)`)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    @classmethod
    def at(cls, year: int, month: int, day: int, hour: int = 12) -> Clock:
        """A clock pinned to a UTC moment, e.g. mid-month at noon: far from every day and month boundary."""
        return cls(datetime(year, month, day, hour, tzinfo=UTC).timestamp())

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


async def wait_for(
    condition: Callable[[], Any | Awaitable[Any]],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str | Callable[[], str] = "",
) -> Any:
    """Poll `condition` (plain or async) until it returns something truthy, and return that; fail
    after `timeout` seconds. The bound only matters when the condition never holds, so it is generous."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            detail = message() if callable(message) else message
            raise AssertionError(f"not reached within {timeout:g} s: {detail or getattr(condition, '__name__', '')}")
        await asyncio.sleep(interval)


# The proxy stores a fresh answer in a task running `ResponseCache.put`, started before the answer
# (or a stream's final [DONE]) goes out. Matched by its code object, so a rename fails loudly here.
_CACHE_PUT = ResponseCache.put.__code__


def _pending_cache_writes() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "cr_code", None) is _CACHE_PUT
    ]


async def cache_writes_settled(timeout: float = 5.0) -> None:
    """Wait until no cache write the proxy started is still running. The test server runs on this
    event loop, and the write is started before the answer is sent: once the client has the answer,
    this sees the write until it has finished (stored, or refused)."""
    await wait_for(lambda: not _pending_cache_writes(), timeout, message="a cache write is still running")
