"""Runs batches: dispatches their lines through the same routing, fallback, budget and ledger as
interactive requests (in-process, not over HTTP), at `batches.concurrency` lines at once, after
live traffic, within `batches.budget_share` of the day's budget; finalizes output and error files.

Durability: a line's request id is stored before it is sent, its answer as soon as it is in, then
its ledger row is committed, then it is done; what a crash leaves in between is taken over by
`recovery` (at start-up and every `RECOVER_EVERY_S` after).

Replicas: several runners may share one store (PostgreSQL). Each claims the lines it runs under
its own id (`claim_lines`: a line is claimed by one runner), renews its claims' lease while it
lives, and adopts only lines whose owner stopped (`adopt`: on PostgreSQL, once their lease has
lapsed; a replica that died is recovered by those that live on). Finishing a batch is a
compare-and-set on its status, so one replica moves it to `finalizing`. A batch sent to
OpenRouter's Batch API (`batches.upstream: openrouter`) is held by one replica at a time (`hold`,
the same lease): only it submits, resolves and polls its upstream batches, so none is sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from proxy.batch.lifecycle import finalize
from proxy.batch.openrouter import UpstreamBatches
from proxy.batch.recovery import Recovery
from proxy.core.admission import admit
from proxy.core.apis import APIS, Api
from proxy.core.batch import (
    CANCELLING,
    ENDPOINTS,
    FINALIZING,
    BatchRecord,
    InputLine,
    LineResult,
    cheapest_first,
    dispatch_wait,
    finished_status,
    share_left,
)
from proxy.core.errors import BudgetExceeded, ProxyError
from proxy.core.record import RequestRecord
from proxy.core.routing import UnknownModel
from proxy.http.api import blocked, model_not_found
from proxy.http.proxy_headers import route_header
from proxy.money.accounting import Accountant
from proxy.money.batch_store import LEASE_S, BatchStore
from proxy.ops.metrics import Gauges, Metrics
from proxy.ops.runtime import Runtime, RuntimeRef, SharedState
from proxy.upstream.client import UpstreamClient

log = logging.getLogger("orproxy.batch")
APIS_BY_NAME: Mapping[str, Api] = {api.name: api for api in APIS}
YIELD_POLL_S = 0.02  # while live traffic is high, how often a finished line looks again
COALESCE_S = 0.02  # lines finishing together are replaced in one step
PRUNE_EVERY_S = 6 * 3600.0  # how often batches and files past ledger.retention_days are forgotten
RENEW_EVERY_S = LEASE_S / 3  # how often a runner renews the lease of the lines it runs
RECOVER_EVERY_S = LEASE_S / 2  # how often lines of a runner that stopped are looked for


class BatchRunner:
    """Long-lived: the lines in flight and the loop that starts them. Config comes from the
    snapshot current at each step; everything durable is in the store."""

    def __init__(
        self,
        store: BatchStore,
        accountant: Accountant,
        runtimes: RuntimeRef,
        state: SharedState,
        gauges: Gauges,
        metrics: Metrics,
        *,
        tick_s: float = 0.25,
    ) -> None:
        self._store = store
        self._accountant = accountant
        self._runtimes = runtimes
        self._state = state
        self._gauges = gauges
        self._metrics = metrics
        self._tick_s = tick_s
        self._clock: Callable[[], float] = state.clock
        self._tasks: dict[asyncio.Task[None], str] = {}  # lines in flight -> their batch
        self._wake = asyncio.Event()
        self._stopping = False
        self._upstream = UpstreamBatches(store, accountant, metrics, self._clock)
        # This runner's claims: the host and process, and a token (a restarted process is another owner).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._recovery = Recovery(store, accountant, runtimes, metrics, self.owner, APIS_BY_NAME)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        renewer = asyncio.create_task(self._renew_forever(), name="batch-leases")
        try:
            await self._loop()
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        try:
            await self._store.retire(self.owner)  # stopped cleanly: what it left is adopted at once
        except Exception:
            log.exception("batch runner: ending its leases failed; they lapse within %.0f s", LEASE_S)

    async def _loop(self) -> None:
        pruned = recovered = -math.inf
        while not self._stopping:
            try:
                if time.monotonic() - recovered >= RECOVER_EVERY_S:
                    await self._recovery.run()
                    recovered = time.monotonic()
                if time.monotonic() - pruned >= PRUNE_EVERY_S:
                    pruned = time.monotonic()
                    await self._prune()
                await self._step()
            except Exception:
                log.exception("batch runner step failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._tick_s)
            await asyncio.sleep(COALESCE_S)  # lines finishing together are replaced in one step
            self._wake.clear()

    def halt(self) -> None:
        """Start no new line (shutdown began); lines in flight go on."""
        self._stopping = True
        self._wake.set()

    async def _renew_forever(self) -> None:
        """Apart from the loop (a slow step never lets a lease lapse), while lines may run."""
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                await self._store.renew(self.owner)
            except Exception:
                log.exception("batch runner: renewing its leases failed; retrying")

    async def stop(self, timeout_s: float) -> None:
        """Start no line; let those in flight finish within `timeout_s`, then cancel them (each
        is booked at its reservation, as interactive requests are at shutdown)."""
        self.halt()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _prune(self) -> None:
        """ledger.retention_days applies to what batches keep as it does to ledger rows."""
        retention_s = self._runtimes.current.config.ledger.retention_days * 86_400.0
        removed = await self._store.prune(self._clock() - retention_s)
        if removed:
            log.info("batches: forgot %d batch(es) that ended before the retention period", removed)

    # --- the loop ----------------------------------------------------------------------
    async def _step(self) -> None:
        runtime = self._runtimes.current
        now = self._clock()
        for batch in await self._store.active_batches():
            in_flight = sum(1 for owner in self._tasks.values() if owner == batch.id)
            if batch.status == FINALIZING:
                await finalize(self._store, batch, FINALIZING, self._metrics, now)
                continue
            stopping = batch.status == CANCELLING or now >= batch.expires_at
            if batch.upstream == "openrouter":
                if not await self._store.hold(batch.id, self.owner):
                    continue  # another replica submits, polls and runs it (never two: no double submission)
                await self._upstream.poll(batch, runtime)
            started = not stopping and await self._dispatch(batch, runtime, now)
            if not started and in_flight == 0 and await self._drained(batch):
                status = finished_status(batch, now)
                log.info("batch %s: no line left to run: %s", batch.id, status)
                await finalize(self._store, batch, batch.status, self._metrics, now, status)

    async def _drained(self, batch: BatchRecord) -> bool:
        """No line of it runs or waits on an upstream batch (pending lines of a stopped batch stay).
        One question to the store: asked state by state, a line another replica claims meanwhile
        (pending, then running) slipped between the questions and the batch ended without it."""
        states = ["running", "answered", "submitting", "submitted"]
        if batch.status != CANCELLING and self._clock() < batch.expires_at:
            states.append("pending")
        return not await self._store.unfinished(batch.id, states)

    async def _dispatch(self, batch: BatchRecord, runtime: Runtime, now: float) -> bool:
        """Start what may start of this batch's lines; False when it has none left to start."""
        settings = runtime.config.batches
        if batch.paused_until is not None:
            if now < batch.paused_until:
                return True
            batch = replace(batch, paused_until=None)
            await self._store.save_batch(batch, expect=batch.status)
        if await self._share_spent(runtime, now):
            calendar = self._state.counters.calendar
            until = min(calendar.day_end, float(batch.expires_at))
            log.info("batch %s: batches.budget_share of today's budget is spent; paused until %.0f", batch.id, until)
            await self._store.save_batch(replace(batch, paused_until=until), expect=batch.status)
            return True
        if batch.upstream == "openrouter" and not self._upstream.runs_locally(batch.id):
            await self._upstream.submit(batch, runtime)
            if not self._upstream.runs_locally(batch.id):
                return False  # all submitted: the poll books them
        free = settings.concurrency - len(self._tasks)
        wait = dispatch_wait(
            interactive_in_flight=self._gauges.in_flight,
            busy_in_flight=settings.busy_in_flight,
            rate_limited=bool(self._state.ratelimits.active(now)),
        )
        if wait is not None or free <= 0:
            return True
        pending = await self._store.claim_lines(batch.id, free, self.owner)
        for line in pending:
            request_id = f"{batch.id}-{line.line}"  # as claim_lines noted it
            task = asyncio.create_task(self._line(batch, line, request_id), name=f"batch-line:{request_id}")
            self._tasks[task] = batch.id
            task.add_done_callback(self._line_done)
        return bool(pending)

    def _line_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch line failed: %s", task.exception())
        self._wake.set()

    async def _share_spent(self, runtime: Runtime, now: float) -> bool:
        settings, budget = runtime.config.batches, runtime.config.budget
        if settings.budget_share >= 1.0 or budget.daily_usd is None:
            return False
        self._state.counters.roll(now)
        spent = await self._store.batch_spend_since(self._state.counters.calendar.day_start)
        left = share_left(spent, budget.daily_usd, settings.budget_share)
        return left is not None and left <= 0

    # --- one line ----------------------------------------------------------------------
    async def _line(self, batch: BatchRecord, line: InputLine, request_id: str) -> None:
        runtimes = self._runtimes
        runtime = runtimes.acquire()
        try:
            result = await self._execute(runtime, batch, line, request_id)
        finally:
            runtimes.release(runtime)
        if result is not None:
            await self._store.finish_lines(batch.id, [(line.line, result)])
            self._metrics.batch_lines.add(("completed" if result.succeeded else "failed",))

    async def _execute(
        self, runtime: Runtime, batch: BatchRecord, line: InputLine, request_id: str
    ) -> LineResult | None:
        """Run one line as an interactive request would run; None when the budget refused it
        before anything was sent (the line waits, the batch pauses)."""
        policy, api = runtime.policy, APIS_BY_NAME[ENDPOINTS[batch.endpoint]]
        body = line.body
        model = body["model"]
        features = api.features(body, {})
        started = time.monotonic()
        record = RequestRecord(
            request_id,
            self._accountant.now(),
            model,
            None,
            False,
            key_name=batch.key_name,
            prompt_estimate=features.prompt_estimate,
            api=api.name,
            batch_id=batch.id,
            custom_id=line.custom_id,
        )
        now = self._accountant.now()
        try:
            view = blocked(self._state.breakers, self._state.ratelimits, runtime, api, now, batch.key_name)
            admission = admit(policy, batch.key_name, model, features, view, now)
        except BudgetExceeded as exc:
            await self._store.release_line(batch.id, line.line)
            until = min(now + (exc.retry_after or 60.0), float(batch.expires_at))
            current = await self._store.batch(batch.id)
            if current is not None and current.paused_until is None:
                await self._store.save_batch(replace(current, paused_until=until), expect=current.status)
            log.info("batch %s: the budget refused line %d (%s); paused", batch.id, line.line, exc.message)
            return None
        except (ProxyError, UnknownModel) as exc:
            error = model_not_found(exc, runtime) if isinstance(exc, UnknownModel) else exc
            record.status, record.error = error.status, error.code
            await self._accountant.settle(record, None, policy)
            return LineResult(line.custom_id, request_id, error.status, error.payload())
        plan = admission.plan
        if runtime.config.batches.prefer == "cheapest":
            plan = cheapest_first(plan, policy.prices, features.prompt_tokens, features.max_tokens)
        record.virtual_model, record.downgrade = plan.chain_owner, admission.downgrade
        complete = _completer(api)
        result: LineResult
        try:
            answer = await runtime.executor.run(plan, body, complete, batch.key_name, api)
            record.model, record.upstream, record.attempts = (
                answer.target.model,
                answer.target.upstream,
                answer.attempts,
            )
            _, payload = answer.result
            record.usage = api.usage(payload)
            record.note_origin(payload)
            record.status = 200
            result = LineResult(line.custom_id, request_id, 200, payload)
        except ProxyError as exc:
            record.status, record.error, record.attempts = exc.status, exc.code, list(exc.attempts)
            result = LineResult(line.custom_id, request_id, exc.status, exc.payload())
        except asyncio.CancelledError:  # shutdown gave up on it: booked at its reservation
            record.abandoned, record.status, record.error = True, 503, "shutdown"
            record.latency_s = time.monotonic() - started
            await self._accountant.settle(record, admission.reservation, policy, wait=False)
            raise
        record.route = route_header(plan, record.attempts)
        record.latency_s = time.monotonic() - started
        result.extra = {
            "started_at": record.started_at,
            "requested_model": model,
            "virtual_model": record.virtual_model,
            "model": record.model,
            "upstream": record.upstream,
            "error": record.error,
        }
        await self._store.answer_line(batch.id, line.line, result)
        await self._yield_to_live(runtime)
        await self._accountant.settle(record, admission.reservation, policy)
        return result

    async def _yield_to_live(self, runtime: Runtime) -> None:
        """Booking and storing a finished line wait while live traffic is high: interactive
        requests never queue behind batch work on the event loop."""
        busy = runtime.config.batches.busy_in_flight
        while self._gauges.in_flight >= busy and not self._stopping:
            await asyncio.sleep(YIELD_POLL_S)


def _completer(api: Api) -> Callable[[UpstreamClient, bytes, str], Any]:
    async def complete(client: UpstreamClient, payload: bytes, model: str) -> tuple[bytes, dict[str, Any]]:
        response = await client.post(payload, stream=False, model=model, path=api.path)
        return await client.read_json(response, api.content_key)

    return complete
