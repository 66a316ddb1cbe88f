"""A batch's lifecycle beyond its lines: cancelling it, and its end. The output file (answers of
200) and the error file (every other answer, and the lines an expiry or a cancel left unrun) are
written once, under ids derived from the batch's: a finalization cut short by a crash and done
again writes the same files, not new ones."""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from proxy.core.batch import (
    CANCELLED,
    CANCELLING,
    EXPIRED,
    FINALIZING,
    IN_PROGRESS,
    TERMINAL,
    VALIDATING,
    BatchRecord,
    FileRecord,
    LineResult,
    counts,
    finished_status,
    line_id,
    result_line,
)
from proxy.money.batch_store import BatchStore

if TYPE_CHECKING:
    from proxy.ops.metrics import Metrics

UNRUN = {
    EXPIRED: ("batch_expired", "This request could not be executed before the completion window expired."),
    CANCELLED: ("batch_cancelled", "This request was not executed: the batch was cancelled."),
}


def new_id(prefix: str, now: float) -> str:
    """Time-ordered (a listing sorts by id, newest first), unique: 48 bits of ms, 64 random bits."""
    return f"{prefix}{int(now * 1000):012x}{secrets.token_hex(8)}"


async def finalize(
    store: BatchStore, batch: BatchRecord, expect: str, metrics: Metrics, now: float, status: str | None = None
) -> BatchRecord | None:
    """Move a batch with nothing left to run to its terminal status, writing its files; None when
    its status changed meanwhile (a cancel), to be looked at again on the next step."""
    status = status or finished_status(batch, now)
    if batch.status != FINALIZING:
        batch = replace(batch, status=FINALIZING, finalizing_at=int(now))
        if not await store.save_batch(batch, expect=expect):
            return None
    results = await store.results(batch.id)
    output, errors = bytearray(), bytearray()
    for line, result in results:
        (output if result.succeeded else errors).extend(result_line(line_id(batch.id, line), result))
    if status in UNRUN:
        code, message = UNRUN[status]
        unrun = await store.lines(batch.id, "pending", 10_000_000)
        for line_, _ in unrun:
            result = LineResult(line_.custom_id, None, None, None, code, message)
            errors.extend(result_line(line_id(batch.id, line_.line), result))
        if unrun:
            metrics.batch_lines.add(("expired" if status == EXPIRED else "cancelled",), len(unrun))
    stem = batch.id.removeprefix("batch_")
    output_id = await _write(store, f"file-{stem}-output", f"{batch.id}_output.jsonl", bytes(output), batch, now)
    error_id = await _write(store, f"file-{stem}-errors", f"{batch.id}_error.jsonl", bytes(errors), batch, now)
    completed, failed = counts([result for _, result in results])
    stamp = int(now)
    final = replace(
        batch,
        status=status,
        output_file_id=output_id,
        error_file_id=error_id,
        completed=completed,
        failed=failed,
        paused_until=None,
        completed_at=stamp if status not in UNRUN else batch.completed_at,
        expired_at=stamp if status == EXPIRED else batch.expired_at,
        cancelled_at=stamp if status == CANCELLED else batch.cancelled_at,
    )
    await store.save_batch(final, expect=FINALIZING)
    return final


async def _write(
    store: BatchStore, file_id: str, name: str, content: bytes, batch: BatchRecord, now: float
) -> str | None:
    if not content:
        return None
    if await store.file(file_id) is None:
        record = FileRecord(file_id, "batch_output", name, len(content), int(now), batch.key_name)
        await store.add_file(record, content)
    return file_id


async def cancel(store: BatchStore, batch: BatchRecord, now: float) -> BatchRecord | None:
    """Ask a running batch to stop: no new line starts, lines in flight finish and are kept. The
    batch itself (`cancelling`, else its record as it is); None when it has already ended."""
    if batch.status in (CANCELLING, CANCELLED):
        return batch
    if batch.status not in (VALIDATING, IN_PROGRESS):
        return None
    cancelling = replace(batch, status=CANCELLING, cancelling_at=int(now))
    if await store.save_batch(cancelling, expect=batch.status):
        return cancelling
    current = await store.batch(batch.id)
    return await cancel(store, current, now) if current is not None else None


async def render(store: BatchStore, batch: BatchRecord) -> dict[str, Any]:
    """The batch object with its progress and cost so far read live (GET /v1/batches/{id}, and
    `orproxy batches`): the proxy's own figures under `x_proxy`."""
    done, succeeded, left = await store.line_counts(batch.id)
    if batch.status not in TERMINAL:
        batch = replace(batch, completed=succeeded, failed=done - succeeded)
    view = batch.to_object(await store.batch_cost(batch.id))
    view["x_proxy"]["lines_left"] = left if batch.status not in TERMINAL else 0
    return view
