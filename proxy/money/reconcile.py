"""Reconciliation: replace estimated costs with what OpenRouter really billed.

Rows whose cost is an estimate (`proxy.core.reconcile` says which) are looked up at OpenRouter's
`GET /generation?id=` through the upstream's own client (its base URL and key), in the
background, a few at a time, with backoff while OpenRouter does not know the id yet. A found
figure replaces the row's cost (`cost_source: reconciled`, the estimate kept in `estimate_nusd`)
and corrects the budget by the difference, for the part that falls in the current day and month.

The ledger is the queue's memory: the rows still to look up, and how often each was tried, are
found again at start-up, so a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.core.policy import Policy
from proxy.core.reconcile import HORIZON_S, SCHEDULE, next_delay, qualifies, read_generation
from proxy.core.record import RequestRecord
from proxy.money.ledger_api import LedgerStore
from proxy.money.ledger_rows import LedgerRow, Reconciled
from proxy.ops.runtime import RuntimeRef
from proxy.state.spend import LocalSpend, SpendStore
from proxy.upstream.client import UpstreamError

log = logging.getLogger("orproxy.reconcile")


@dataclass(slots=True)
class Lookup:
    """One row to reconcile."""

    request_id: str
    generation_id: str
    upstream: str
    key_name: str | None
    started_at: float  # the row's ts: the day and month its cost was booked in
    booked_usd: float  # what the row and the budget hold now
    tries: int = 0


class Reconciler:
    """Looks rows up in the background (`run`); told of new estimated rows by `observe`, an
    accounting sink. Holds no config: the upstream clients come from the snapshot now serving."""

    def __init__(
        self,
        runtimes: RuntimeRef,
        ledger: Callable[[], LedgerStore | None],
        clock: Callable[[], float] = time.time,
        *,
        concurrency: int = 4,
        schedule: tuple[float, ...] = SCHEDULE,
        spend: SpendStore | None = None,
    ) -> None:
        self._spend = spend if spend is not None else LocalSpend()
        self._runtimes = runtimes
        self._ledger = ledger
        self._clock = clock
        self._schedule = schedule
        self._slots = asyncio.Semaphore(concurrency)
        self._due: list[tuple[float, int, Lookup]] = []  # (monotonic due time, tiebreak, lookup)
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._working: set[asyncio.Task[None]] = set()
        self.reconciled = 0  # rows corrected so far (tests and logs read it)

    @property
    def pending(self) -> int:
        return len(self._due) + len(self._working)

    # -- intake -----------------------------------------------------------------------------
    def observe(self, record: RequestRecord, policy: Policy) -> None:
        """The accounting sink: a settled request whose cost is an estimate is queued."""
        cost, upstream = record.cost, record.upstream
        if cost is None or upstream is None or record.generation_id is None:
            return
        upstream_config = policy.config.upstreams.get(upstream)
        kind = upstream_config.flavour if upstream_config is not None else None
        if qualifies(cost.source, record.generation_id, kind):
            lookup = Lookup(
                record.request_id, record.generation_id, upstream, record.key_name, record.started_at, cost.usd
            )
            self._schedule_next(lookup)

    async def load_pending(self, ledger: LedgerStore) -> int:
        """Queue the rows an earlier run left unreconciled; how many."""
        config = self._runtimes.current.config
        upstreams = [name for name, upstream in config.upstreams.items() if upstream.flavour == "openrouter"]
        rows = await ledger.unreconciled(self._clock() - HORIZON_S, upstreams, len(self._schedule))
        for row in rows:
            self._schedule_next(_lookup_of(row))
        if rows:
            log.info("reconciliation: %d estimated cost(s) from earlier runs to look up", len(rows))
        return len(rows)

    def _schedule_next(self, lookup: Lookup) -> None:
        delay = next_delay(lookup.tries, self._schedule)
        if delay is None:
            log.warning(
                "reconciliation: generation %s (request %s) not found after %d lookups; its cost stays an estimate",
                lookup.generation_id,
                lookup.request_id,
                lookup.tries,
            )
            return
        heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), lookup))
        self._wake.set()

    # -- the background task ----------------------------------------------------------------
    async def run(self) -> None:
        """Forever: wait for the next lookup that is due, start it (bounded), repeat."""
        try:
            while True:
                if not self._due:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                due_at = self._due[0][0]
                wait = due_at - time.monotonic()
                if wait > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):  # an earlier lookup arriving wakes the loop
                        await asyncio.wait_for(self._wake.wait(), wait)
                    continue
                _due, _, lookup = heapq.heappop(self._due)
                await self._slots.acquire()
                task = asyncio.get_running_loop().create_task(self._look_up(lookup))
                self._working.add(task)
                task.add_done_callback(self._working.discard)
        finally:
            for task in list(self._working):
                task.cancel()
            await asyncio.gather(*self._working, return_exceptions=True)

    async def _look_up(self, lookup: Lookup) -> None:
        try:
            await self._reconcile(lookup)
        except asyncio.CancelledError:
            raise
        except Exception:  # housekeeping never takes the proxy down; the row keeps its estimate
            log.exception("reconciliation of request %s failed", lookup.request_id)
        finally:
            self._slots.release()

    async def _reconcile(self, lookup: Lookup) -> None:
        ledger = self._ledger()
        runtime = self._runtimes.peek()
        if ledger is None or runtime is None:
            return
        client = runtime.clients.get(lookup.upstream)
        if client is None or client.kind != "openrouter":
            return  # the upstream was removed or changed kind by a reload: nothing to ask
        lookup.tries += 1
        try:
            payload = await client.generation(lookup.generation_id)
        except UpstreamError as exc:
            log.info("reconciliation: looking up %s failed (%s); will retry", lookup.generation_id, exc)
            payload = None
        generation = read_generation(payload) if payload is not None else None
        await ledger.flush()  # the row of a request settled a moment ago is committed before it is changed
        if generation is None:
            await ledger.note_reconcile_try(lookup.request_id, lookup.generation_id)
            self._schedule_next(lookup)
            return
        policy = runtime.policy
        tokens = generation.tokens
        correction = Reconciled(
            generation.cost_usd, tokens.prompt, tokens.completion, tokens.cached, policy.prices.baseline(tokens)
        )
        if not await ledger.reconcile(lookup.request_id, lookup.generation_id, correction):
            return  # reconciled already (another process, or a row that was pruned)
        delta = generation.cost_usd - lookup.booked_usd
        await self._spend.adjust(policy, lookup.key_name, delta, lookup.started_at, self._clock())
        self.reconciled += 1
        log.info(
            "reconciled request %s (generation %s): $%.9f estimated, $%.9f billed",
            lookup.request_id,
            lookup.generation_id,
            lookup.booked_usd,
            generation.cost_usd,
        )


def _lookup_of(row: LedgerRow) -> Lookup:
    assert row.generation_id is not None and row.upstream is not None
    return Lookup(
        row.request_id, row.generation_id, row.upstream, row.key_name, row.ts, row.cost_usd, row.reconcile_tries
    )
