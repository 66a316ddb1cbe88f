"""The batch store on a real SQLite file beside the ledger: a line's way through its states, the
compare-and-set that keeps a cancel from being overwritten, and retention."""

from __future__ import annotations

from dataclasses import replace

from proxy.core.batch import BatchRecord, FileRecord, InputLine, LineResult
from proxy.money.batch_store import SqliteBatchStore
from proxy.money.ledger import Ledger

DAY = 86_400
NOW = 1_800_000_000


def record(batch_id: str, status: str, created_at: int, file_id: str) -> BatchRecord:
    return BatchRecord(batch_id, "/v1/chat/completions", file_id, "24h", status, created_at, created_at + DAY, total=2)


def lines() -> list[InputLine]:
    return [InputLine(1, "a", {"model": "cheap"}), InputLine(3, "b", {"model": "cheap"})]


async def test_a_line_goes_pending_running_answered_done(tmp_path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3", prune=False)  # makes the requests table
    store = await SqliteBatchStore.open(tmp_path / "ledger.sqlite3")
    try:
        await store.create_batch(record("batch_1", "in_progress", NOW, "file-1"), lines())
        assert [(x.line, rid) for x, rid in await store.lines("batch_1", "pending", 10)] == [(1, None), (3, None)]
        await store.mark_running("batch_1", [1])
        assert [(x.line, rid) for x, rid in await store.lines("batch_1", "running", 10)] == [(1, "batch_1-1")]
        answer = LineResult("a", "batch_1-1", 200, {"id": "gen-1"}, extra={"model": "m"})
        await store.answer_line("batch_1", 1, answer)
        assert await store.answered("batch_1") == [(1, answer)]
        await store.finish_lines("batch_1", [(1, answer)])
        await store.finish_lines("batch_1", [(1, LineResult("a", "x", 500))])  # done is done: not overwritten
        assert await store.results("batch_1") == [(1, answer)]
        assert await store.line_counts("batch_1") == (1, 1, 1)
        assert await store.billed(["batch_1-1"]) == set()  # no ledger row yet
    finally:
        await store.close()
        await ledger.close()


async def test_a_stale_copy_never_overwrites_a_cancel(tmp_path) -> None:
    store = await SqliteBatchStore.open(tmp_path / "ledger.sqlite3")
    try:
        batch = record("batch_1", "in_progress", NOW, "file-1")
        await store.create_batch(batch, lines())
        assert await store.save_batch(replace(batch, status="cancelling"), expect="in_progress")
        assert not await store.save_batch(replace(batch, paused_until=1.0), expect="in_progress")
        stored = await store.batch("batch_1")
        assert stored is not None and (stored.status, stored.paused_until) == ("cancelling", None)
    finally:
        await store.close()


async def test_retention_forgets_old_ended_batches_and_unused_files(tmp_path) -> None:
    store = await SqliteBatchStore.open(tmp_path / "ledger.sqlite3")
    try:
        for file_id, created in (("file-old", NOW - 10 * DAY), ("file-running", NOW - 10 * DAY), ("file-new", NOW)):
            await store.add_file(FileRecord(file_id, "batch", f"{file_id}.jsonl", 2, created), b"{}")
        await store.create_batch(record("batch_old", "completed", NOW - 10 * DAY, "file-old"), lines())
        await store.create_batch(record("batch_running", "in_progress", NOW - 10 * DAY, "file-running"), lines())
        await store.create_batch(record("batch_new", "completed", NOW, "file-new"), lines())
        assert await store.prune(NOW - 5 * DAY) == 1
        assert [b.id for b in await store.batches(10)] == ["batch_running", "batch_new"]
        assert await store.lines("batch_old", "pending", 10) == []
        assert len(await store.lines("batch_running", "pending", 10)) == 2
        assert await store.file("file-old") is None
        assert await store.file("file-running") is not None  # a running batch still reads it
        assert await store.file("file-new") is not None
    finally:
        await store.close()
