"""Upstream work that outlives its client: the app owns it, shutdown waits for it.

aiohttp cancels a handler when its client disconnects. The upstream call behind a request, and
the booking of what it cost, must not go with it: the upstream bills the answer all the same
(an SDK `timeout=` or a load balancer's idle cut-off would otherwise make requests free and
invisible to budgets). The handler runs that work as a task registered here and waits on it
through `asyncio.shield`; a hang-up cancels the wait, never the task.

At shutdown the app waits for the tasks until `shutdown_timeout_s` after the shutdown began,
then cancels what is left; each task books its own cancellation (the reservation's worst case).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("orproxy")
T = TypeVar("T")


class InFlight:
    """The app's registry of upstream work that a client hang-up must not cancel."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deadline: float | None = None  # monotonic; set when the shutdown begins

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def shutdown_began(self, timeout_s: float) -> None:
        """The shutdown's clock starts: what is still running `timeout_s` from now is cancelled."""
        if self._deadline is None:
            self._deadline = time.monotonic() + timeout_s

    async def drain(self, timeout_s: float) -> None:
        """Wait for the tasks until the deadline (`timeout_s` from the shutdown's start, or from
        now), then cancel the rest and wait for them to book themselves."""
        self.shutdown_began(timeout_s)
        assert self._deadline is not None
        # A task may start another as it ends (a stream the client left is then closed and booked),
        # hence the loop: it ends when nothing is left.
        while self._tasks:
            pending = set(self._tasks)
            _done, pending = await asyncio.wait(pending, timeout=max(0.0, self._deadline - time.monotonic()))
            if pending:
                log.warning("shutdown: %d upstream call(s) still running at the timeout; cancelled", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
