"""What a batch runner takes over from one that stopped (at its start-up, and every
`RECOVER_EVERY_S` after: a replica that died is recovered by those that live on).

A line's request id is stored before it is sent, its answer as soon as it is in, then its ledger
row is committed, then it is done. So a line found `answered` is booked (unless its ledger row
made it) and done; a line found `running` was cut off in flight: it is never sent again (the
upstream may have billed it, and a non-streamed request cannot be looked up before its answer),
and is reported in the error file as `interrupted`. Only lines adopted from a runner that stopped
(`adopt`: on PostgreSQL, once their lease has lapsed), never another live one's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from proxy.core.apis import Api
from proxy.core.batch import ENDPOINTS, BatchRecord, LineResult
from proxy.core.record import RequestRecord
from proxy.money.accounting import Accountant
from proxy.money.batch_store import BatchStore
from proxy.ops.metrics import Metrics
from proxy.ops.runtime import RuntimeRef

log = logging.getLogger("orproxy.batch")


class Recovery:
    """One runner's recovery: lines are adopted under its `owner`."""

    def __init__(
        self,
        store: BatchStore,
        accountant: Accountant,
        runtimes: RuntimeRef,
        metrics: Metrics,
        owner: str,
        apis: Mapping[str, Api],
    ) -> None:
        self._store = store
        self._accountant = accountant
        self._runtimes = runtimes
        self._metrics = metrics
        self._owner = owner
        self._apis = apis  # by name

    async def run(self) -> None:
        """Lines a stopped runner left `answered` are booked once; those it left `running` are not
        sent twice. Only lines adopted from a runner that stopped: never another live one's."""
        for batch in await self._store.active_batches():
            await self._book_answered(batch)
            cut = await self._store.adopt(batch.id, "running", self._owner)
            if not cut:
                continue
            billed = await self._store.billed(taken.request_id for taken in cut if taken.request_id)
            done = []
            for line, request_id, _ in cut:
                was = "was billed (see its ledger row)" if request_id in billed else "may have been billed upstream"
                message = f"the proxy stopped while this request was in flight; it {was}, so it was not sent again"
                done.append((line.line, LineResult(line.custom_id, request_id, None, None, "interrupted", message)))
                self._metrics.batch_lines.add(("interrupted",))
            await self._store.finish_lines(batch.id, done)
            log.warning(
                "batch %s: %d line(s) in flight when their runner stopped reported as interrupted", batch.id, len(done)
            )

    async def _book_answered(self, batch: BatchRecord) -> None:
        adopted = await self._store.adopt(batch.id, "answered", self._owner)
        answered = [(taken.line.line, taken.result) for taken in adopted if taken.result is not None]
        if not answered:
            return
        billed = await self._store.billed(result.request_id for _, result in answered if result.request_id)
        runtime = self._runtimes.current
        api = self._apis[ENDPOINTS[batch.endpoint]]
        for _, result in answered:
            if result.request_id in billed:
                continue
            extra = result.extra
            record = RequestRecord(
                result.request_id or "",
                float(extra.get("started_at") or self._accountant.now()),
                str(extra.get("requested_model") or ""),
                extra.get("virtual_model"),
                False,
                key_name=batch.key_name,
                status=result.status_code or 0,
                model=extra.get("model"),
                upstream=extra.get("upstream"),
                error=extra.get("error"),
                api=api.name,
                batch_id=batch.id,
                custom_id=result.custom_id,
            )
            if result.succeeded and result.body is not None:
                record.usage = api.usage(result.body)
                record.note_origin(result.body)
            await self._accountant.settle(record, None, runtime.policy)
        await self._store.finish_lines(batch.id, answered)
        log.warning("batch %s: %d answered line(s) booked after the last stop", batch.id, len(answered))
