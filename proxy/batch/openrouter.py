"""`batches.upstream: openrouter`: a batch's lines go to OpenRouter's own Batch API
(`POST /batches` with `endpoint`, `model` and an inline `requests` array; one model per upstream
batch), which runs them at its batch price. The proxy polls each upstream batch (`GET /batches/{id}`,
every `batches.poll_s`) and, once it has ended, pages through `GET /batches/{id}/results`, maps each
result back to its line and books its own `usage.cost` (the discounted price) in the ledger.

Lines whose first member is not on an OpenRouter upstream, or a batch OpenRouter refuses (a model it
does not batch), run on the proxy instead. Each booked line's request id is its batch's and line's,
and the ledger is asked before booking, so a restart between a booking and its result never books
a line twice.

Never submitted twice: lines are noted `submitting` (with the upstream, the model and the time)
before the upstream batch is created. A crash before its id is noted leaves them so; the next start
looks for that batch in OpenRouter's list (same model, as many requests, created since) and claims
it, or, when there is none, sends them again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from proxy.core.apis import APIS
from proxy.core.batch import ENDPOINTS, TERMINAL, BatchRecord, InputLine, LineResult, cheapest_first
from proxy.core.errors import ProxyError
from proxy.core.failures import dropped_failure
from proxy.core.record import RequestRecord
from proxy.core.routing import Target, UnknownModel
from proxy.money.accounting import Accountant
from proxy.money.batch_store import BatchStore
from proxy.ops.metrics import Metrics
from proxy.ops.runtime import Runtime
from proxy.upstream.client import UpstreamError

log = logging.getLogger("orproxy.batch")
RESULTS_PAGE = 1000  # OpenRouter's largest page of results
MAX_SUBMIT = 50_000  # lines per upstream batch
CLOCK_SKEW_S = 300.0  # how far OpenRouter's clock may be behind ours when a lost submission is looked for


class UpstreamBatches:
    """State only: which batches fell back to running on the proxy, and when each upstream batch
    was last polled (both rebuilt harmlessly after a restart)."""

    def __init__(self, store: BatchStore, accountant: Accountant, metrics: Metrics, clock: Callable[[], float]) -> None:
        self._store = store
        self._accountant = accountant
        self._metrics = metrics
        self._clock = clock
        self._local: set[str] = set()
        self._polled: dict[str, float] = {}  # monotonic seconds
        self._retry_at: dict[str, float] = {}  # batch id -> when a failed submission may be tried again

    def runs_locally(self, batch_id: str) -> bool:
        return batch_id in self._local

    # --- submitting ----------------------------------------------------------------------
    async def submit(self, batch: BatchRecord, runtime: Runtime) -> None:
        """Send the batch's pending lines upstream, one upstream batch per model; after a failed
        submission (OpenRouter unreachable), again `batches.poll_s` later."""
        if time.monotonic() < self._retry_at.get(batch.id, -math.inf):
            return
        pending = [line for line, _ in await self._store.lines(batch.id, "pending", MAX_SUBMIT)]
        groups: dict[Target, list[InputLine]] = {}
        api = _api(batch)
        policy = runtime.policy
        for line in pending:
            features = api.features(line.body, {})
            try:
                plan = policy.router.plan(line.body["model"], features)
            except (ProxyError, UnknownModel):
                self._local.add(batch.id)  # the proxy's own run answers it with the right error
                return
            if runtime.config.batches.prefer == "cheapest":
                plan = cheapest_first(plan, policy.prices, features.prompt_tokens, features.max_tokens)
            target = plan.targets[0] if plan.targets else None
            client = runtime.clients.get(target.upstream) if target is not None else None
            if target is None or client is None or client.kind != "openrouter" or client.api_key is None:
                self._local.add(batch.id)
                return
            groups.setdefault(target, []).append(line)
        for target, lines in groups.items():
            if not await self._submit_group(batch, runtime, target, lines):
                self._local.add(batch.id)
                return

    async def _submit_group(self, batch: BatchRecord, runtime: Runtime, target: Target, lines: list[InputLine]) -> bool:
        client, api = runtime.clients[target.upstream], _api(batch)
        numbers = [line.line for line in lines]
        marker = f"{target.upstream}:?{target.model}@{self._clock():.0f}"
        await self._store.mark_submitted(batch.id, numbers, marker, state="submitting")
        requests = [
            {"custom_id": line.custom_id, "body": orjson.loads(api.prepare(line.body, target.model, client.kind))}
            for line in lines
        ]
        # `endpoint` and `model` before `requests`: OpenRouter reads the body as a stream.
        body = {"endpoint": batch.endpoint, "model": target.model, "completion_window": "24h", "requests": requests}
        try:
            status, answer = await client.call("POST", "/batches", payload=orjson.dumps(body))
        except UpstreamError as exc:  # it may have been created all the same: resolved like a crash's
            log.warning("batch %s: OpenRouter batch submission failed (%s); looked for later", batch.id, exc)
            self._retry_at[batch.id] = time.monotonic() + runtime.config.batches.poll_s
            return True
        upstream_id = answer.get("id") if isinstance(answer, dict) else None
        if status >= 300 or not isinstance(upstream_id, str):
            log.warning(
                "batch %s: OpenRouter refused a batch of %d line(s) for %s (HTTP %d); the proxy runs them itself",
                batch.id,
                len(lines),
                target.model,
                status,
            )
            await self._store.mark_submitted(batch.id, numbers, "", state="pending")
            return False
        await self._store.mark_submitted(batch.id, numbers, f"{target.upstream}:{upstream_id}")
        log.info("batch %s: %d line(s) submitted to OpenRouter as %s", batch.id, len(lines), upstream_id)
        return True

    # --- polling -------------------------------------------------------------------------
    async def resolve(self, batch: BatchRecord, runtime: Runtime) -> None:
        """Lines left `submitting` (a crash, or a submission whose answer was lost): claim the upstream
        batch created for them, else put them back to be sent again."""
        groups = await self._store.submitted(batch.id, state="submitting")
        if not groups or time.monotonic() < self._retry_at.get(batch.id, -math.inf):
            return
        known = await self._store.known_upstream_batches()
        for marker, lines in groups.items():
            upstream, _, rest = marker.partition(":?")
            model, _, since = rest.rpartition("@")
            client = runtime.clients.get(upstream)
            if client is None:
                continue
            try:
                status, listed = await client.call("GET", "/batches", params={"limit": "100"})
            except UpstreamError as exc:
                log.warning("batch %s: cannot list OpenRouter batches (%s); looked for later", batch.id, exc)
                return
            if status != 200 or not isinstance(listed, dict):
                return
            found = _claim(listed.get("data") or (), model, len(lines), float(since or 0), upstream, known)
            numbers = [line.line for line in lines]
            if found is None:
                await self._store.mark_submitted(batch.id, numbers, "", state="pending")
                log.info("batch %s: %d line(s) were not submitted after all; sending them again", batch.id, len(lines))
            else:
                await self._store.mark_submitted(batch.id, numbers, f"{upstream}:{found}")
                known.add(f"{upstream}:{found}")
                log.info("batch %s: %d line(s) found in OpenRouter batch %s", batch.id, len(lines), found)

    async def poll(self, batch: BatchRecord, runtime: Runtime) -> None:
        await self.resolve(batch, runtime)
        now = time.monotonic()  # a pace, not a date: the injected wall clock of budgets does not drive it
        for where, lines in (await self._store.submitted(batch.id)).items():
            if now - self._polled.get(where, -math.inf) < runtime.config.batches.poll_s:
                continue
            self._polled[where] = now
            upstream, _, upstream_id = where.partition(":")
            client = runtime.clients.get(upstream)
            if client is None:
                log.warning("batch %s: upstream %r is no longer configured; cannot poll %s", batch.id, upstream, where)
                continue
            try:
                status, answer = await client.call("GET", f"/batches/{upstream_id}")
                if status != 200 or not isinstance(answer, dict) or answer.get("status") not in TERMINAL:
                    continue
                results = await self._results(runtime, upstream, upstream_id)
            except UpstreamError as exc:
                log.warning("batch %s: polling OpenRouter batch %s failed: %s", batch.id, upstream_id, exc)
                continue
            await self._book(batch, runtime, upstream, str(answer.get("model") or ""), lines, results)
            self._polled.pop(where, None)

    async def _results(self, runtime: Runtime, upstream: str, upstream_id: str) -> dict[str, dict[str, Any]]:
        client = runtime.clients[upstream]
        found: dict[str, dict[str, Any]] = {}
        params: dict[str, str] = {"limit": str(RESULTS_PAGE)}
        while True:
            status, page = await client.call("GET", f"/batches/{upstream_id}/results", params=params)
            if status != 200 or not isinstance(page, dict):
                raise UpstreamError(dropped_failure(f"results of {upstream_id}: HTTP {status}"))
            for item in page.get("data") or ():
                if isinstance(item, dict) and isinstance(item.get("custom_id"), str):
                    found[item["custom_id"]] = item
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not isinstance(cursor, str):
                return found
            params = {"limit": str(RESULTS_PAGE), "cursor": cursor}

    async def _book(
        self,
        batch: BatchRecord,
        runtime: Runtime,
        upstream: str,
        model: str,
        lines: Sequence[InputLine],
        results: dict[str, dict[str, Any]],
    ) -> None:
        """Each line's ledger row (unless a run before a restart wrote it), then its result."""
        ids = {line.line: f"{batch.id}-{line.line}" for line in lines}
        billed = await self._store.billed(ids.values())
        api, policy = _api(batch), runtime.policy
        done: list[tuple[int, LineResult]] = []
        for line in lines:
            request_id = ids[line.line]
            item = results.get(line.custom_id)
            result = _result(line, request_id, item)
            if request_id not in billed and item is not None:
                record = RequestRecord(
                    request_id,
                    self._accountant.now(),
                    str(line.body.get("model", model)),
                    None,
                    False,
                    key_name=batch.key_name,
                    status=result.status_code or 502,
                    model=model or None,
                    upstream=upstream,
                    api=api.name,
                    batch_id=batch.id,
                    custom_id=line.custom_id,
                )
                if result.body is not None and result.succeeded:
                    record.usage = api.usage(result.body)
                    record.note_origin(result.body)
                else:
                    record.error = result.error_code or "upstream_error"
                await self._accountant.settle(record, None, policy)
            done.append((line.line, result))
            self._metrics.batch_lines.add(("completed" if result.succeeded else "failed",))
        await self._store.finish_lines(batch.id, done)


def _claim(listed: Any, model: str, count: int, since: float, upstream: str, known: set[str]) -> str | None:
    """The id of the listed upstream batch made for a group: its model, as many requests, created
    since it was noted (to the second), and not already another group's."""
    for item in listed:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        counts = item.get("request_counts")
        total = counts.get("total") if isinstance(counts, dict) else None
        created = item.get("created_at")
        if (
            item.get("model") == model
            and total == count
            and isinstance(created, (int, float))
            and created >= since - CLOCK_SKEW_S
            and f"{upstream}:{item['id']}" not in known
        ):
            return item["id"]
    return None


def _result(line: InputLine, request_id: str, item: dict[str, Any] | None) -> LineResult:
    """OpenRouter's result row as the proxy's line result (its answer's body passes through)."""
    if item is None:
        return LineResult(line.custom_id, request_id, None, None, "batch_expired", "OpenRouter returned no result")
    response = item.get("response")
    error = item.get("error")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        body = response.get("body")
        return LineResult(line.custom_id, request_id, response["status_code"], body if isinstance(body, dict) else None)
    message = error.get("message") if isinstance(error, dict) else None
    code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
    return LineResult(line.custom_id, request_id, None, None, str(code or "upstream_error"), str(message or "failed"))


def _api(batch: BatchRecord) -> Any:
    name = ENDPOINTS[batch.endpoint]
    return next(api for api in APIS if api.name == name)
