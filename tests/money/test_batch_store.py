"""The batch store, on both backends: a real SQLite file beside the ledger, and a real PostgreSQL
schema beside `orproxy_requests`. A line's way through its states, the compare-and-set that keeps a
cancel from being overwritten, retention, the three ledger reads, and the claims that let several
runners (replicas) share one store: a line is claimed once, and adopted only from a runner that
stopped."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest

from proxy.core.batch import BatchRecord, FileRecord, InputLine, LineResult
from proxy.money.batch_store import BatchStore
from proxy.money.batch_store_pg import SCHEMA, SCHEMA_OBJECTS, PgBatchStore
from proxy.money.batch_store_sqlite import SqliteBatchStore
from proxy.money.ledger import Ledger
from proxy.money.ledger_api import LedgerStore
from proxy.money.ledger_pg import PgLedger
from proxy.money.ledger_pg_schema import TABLE
from proxy.money.ledger_rows import LedgerRow, to_nano
from tests.support.postgres import scratch_schema

DAY = 86_400
NOW = 1_800_000_000


def record(batch_id: str, status: str, created_at: int, file_id: str, total: int = 2) -> BatchRecord:
    return BatchRecord(
        batch_id, "/v1/chat/completions", file_id, "24h", status, created_at, created_at + DAY, total=total
    )


def lines(count: int = 2) -> list[InputLine]:
    return [InputLine(1 + 2 * i, f"c{i}", {"model": "cheap", "n": i}) for i in range(count)]


@dataclass
class Stores:
    ledger: LedgerStore
    open: object  # () -> Awaitable[BatchStore]: another connection to the same database
    backend: str


@pytest.fixture(params=["sqlite", "postgres"])
async def stores(request, tmp_path: Path) -> AsyncIterator[Stores]:
    """The ledger (its tables made) and a way to open batch stores on its database."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"
        ledger: LedgerStore = await Ledger.open(path, prune=False)

        async def open_sqlite() -> BatchStore:
            return await SqliteBatchStore.open(path)

        try:
            yield Stores(ledger, open_sqlite, "sqlite")
        finally:
            await ledger.close()
        return
    async with scratch_schema() as (_, dsn):
        ledger = await PgLedger.open(dsn, prune=False)

        async def open_pg(lease_s: float = 30.0) -> BatchStore:
            return await PgBatchStore.open(dsn, pool_size=2, lease_s=lease_s)

        try:
            yield Stores(ledger, open_pg, "postgres")
        finally:
            await ledger.close()


@pytest.fixture
async def store(stores: Stores) -> AsyncIterator[BatchStore]:
    opened = await stores.open()  # type: ignore[operator]
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_line_goes_pending_running_answered_done(store: BatchStore) -> None:
    await store.create_batch(record("batch_1", "in_progress", NOW, "file-1"), lines())
    assert [(x.line, rid) for x, rid in await store.lines("batch_1", "pending", 10)] == [(1, None), (3, None)]
    assert [x.line for x in await store.claim_lines("batch_1", 1, "me")] == [1]
    assert [(x.line, rid) for x, rid in await store.lines("batch_1", "running", 10)] == [(1, "batch_1-1")]
    answer = LineResult("c0", "batch_1-1", 200, {"id": "gen-1"}, extra={"model": "m"})
    await store.answer_line("batch_1", 1, answer)
    assert [x.line for x, _ in await store.lines("batch_1", "answered", 10)] == [1]
    await store.finish_lines("batch_1", [(1, answer)])
    await store.finish_lines("batch_1", [(1, LineResult("c0", "x", 500))])  # done is done: not overwritten
    await store.answer_line("batch_1", 1, LineResult("c0", "x", 500))  # nor is it answered again
    assert await store.results("batch_1") == [(1, answer)]
    assert await store.line_counts("batch_1") == (1, 1, 1)
    assert await store.billed(["batch_1-1"]) == set()  # no ledger row yet


async def test_whether_lines_are_unfinished_is_one_question_over_every_state_asked(store: BatchStore) -> None:
    await store.create_batch(record("batch_1", "in_progress", NOW, "file-1"), lines())
    live = ["running", "answered", "submitting", "submitted"]
    assert await store.unfinished("batch_1", [*live, "pending"])
    assert not await store.unfinished("batch_1", live)  # both pending: none claimed yet
    await store.claim_lines("batch_1", 1, "me")  # what another replica does between two questions
    assert await store.unfinished("batch_1", live)
    answer = LineResult("c0", "batch_1-1", 200, {"id": "gen-1"})
    await store.answer_line("batch_1", 1, answer)
    assert await store.unfinished("batch_1", ["answered"]) and not await store.unfinished("batch_1", ["running"])
    await store.finish_lines("batch_1", [(1, answer)])
    assert not await store.unfinished("batch_1", live)
    assert await store.unfinished("batch_1", ["pending"])
    assert not await store.unfinished("batch_2", [*live, "pending"])  # another batch's lines are not asked


async def test_a_released_line_is_pending_again_and_claimed_again(store: BatchStore) -> None:
    await store.create_batch(record("batch_1", "in_progress", NOW, "file-1"), lines())
    assert [x.line for x in await store.claim_lines("batch_1", 5, "me")] == [1, 3]
    assert await store.claim_lines("batch_1", 5, "other") == []
    await store.release_line("batch_1", 3)
    assert [(x.line, rid) for x, rid in await store.lines("batch_1", "pending", 10)] == [(3, None)]
    assert [x.custom_id for x in await store.claim_lines("batch_1", 5, "other")] == ["c1"]


async def test_a_stale_copy_never_overwrites_a_cancel(store: BatchStore) -> None:
    batch = record("batch_1", "in_progress", NOW, "file-1")
    await store.create_batch(batch, lines())
    assert await store.save_batch(replace(batch, status="cancelling"), expect="in_progress")
    assert not await store.save_batch(replace(batch, paused_until=1.0), expect="in_progress")
    stored = await store.batch("batch_1")
    assert stored is not None and (stored.status, stored.paused_until) == ("cancelling", None)
    assert await store.save_batch(replace(stored, paused_until=2.0))  # no expectation: written
    assert [b.paused_until for b in await store.active_batches()] == [2.0]


async def test_files_and_listing_pages(store: BatchStore) -> None:
    await store.add_file(FileRecord("file-1", "batch", "a.jsonl", 3, NOW, "team"), b"abc")
    assert await store.file("file-1") == FileRecord("file-1", "batch", "a.jsonl", 3, NOW, "team")
    assert await store.file_content("file-1") == b"abc"
    assert await store.file("file-2") is None and await store.file_content("file-2") is None
    for i in range(5):
        await store.create_batch(record(f"batch_{i}", "completed", NOW + i, "file-1"), [])
    first = await store.batches(2)
    assert [b.id for b in first] == ["batch_4", "batch_3"]
    assert [b.id for b in await store.batches(10, after=first[-1].id)] == ["batch_2", "batch_1", "batch_0"]
    assert await store.delete_file("file-1") and not await store.delete_file("file-1")


async def test_retention_forgets_old_ended_batches_and_unused_files(store: BatchStore) -> None:
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


def ledger_row(request_id: str, batch_id: str | None, cost: float, ts: float) -> LedgerRow:
    return LedgerRow(
        ts, request_id, None, "cheap", "cheap", "m", "openrouter", None, 10, 5, cost, "upstream", cost, 0.1, None,
        200, 1, False, batch_id=batch_id, custom_id="c" if batch_id else None,
    )  # fmt: skip


async def test_what_the_ledger_says_billed_cost_and_todays_batch_spend(stores: Stores, store: BatchStore) -> None:
    for row in (
        ledger_row("batch_1-1", "batch_1", 0.000123456, NOW - 2 * DAY),  # before today
        ledger_row("batch_1-3", "batch_1", 0.000000789, NOW + 10),
        ledger_row("batch_2-1", "batch_2", 0.5, NOW + 20),
        ledger_row("live-1", None, 7.0, NOW + 30),  # interactive: no batch's
    ):
        await stores.ledger.record(row)
    assert await store.billed(["batch_1-1", "batch_1-3", "batch_1-5"]) == {"batch_1-1", "batch_1-3"}
    assert to_nano(await store.batch_cost("batch_1")) == 123_456 + 789
    assert await store.batch_cost("batch_9") == 0
    assert to_nano(await store.batch_spend_since(NOW)) == 789 + 500_000_000


async def test_two_runners_claiming_at_once_never_take_the_same_line(stores: Stores) -> None:
    """Each runner on its own connection, claiming together until nothing is left."""
    count = 200
    one, two = await stores.open(), await stores.open()  # type: ignore[operator]
    try:
        await one.create_batch(record("batch_1", "in_progress", NOW, "file-1", count), lines(count))
        taken: dict[str, list[int]] = {"one": [], "two": []}

        async def runner(name: str, store: BatchStore) -> None:
            while claimed := await store.claim_lines("batch_1", 7, name):
                taken[name] += [x.line for x in claimed]
                await asyncio.sleep(0)

        await asyncio.gather(runner("one", one), runner("two", two))
        assert sorted(taken["one"] + taken["two"]) == [x.line for x in lines(count)]  # each line once
        assert await one.line_counts("batch_1") == (0, 0, count)
    finally:
        await one.close()
        await two.close()


async def gone_process_owner() -> str:
    """A runner id of this machine whose process has exited (and been reaped)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:{secrets.token_hex(4)}"


@pytest.mark.realtime  # PostgreSQL's lease runs on the database's own clock: a 0.6 s lease lapses for real
async def test_lines_are_adopted_only_from_a_runner_that_stopped(stores: Stores) -> None:
    """PostgreSQL (replicas): a runner's lines are adopted only once its lease has lapsed; renewing
    keeps them. SQLite (one machine, `--workers` share the file): as soon as its process is gone;
    a live process's lines (a worker's, this process's) never."""
    lease = 0.6
    opener = stores.open
    if stores.backend == "postgres":
        one, two = await opener(lease_s=lease), await opener(lease_s=lease)  # type: ignore[operator]
        dead = "replica-a:1:cafe"
    else:
        one, two = await opener(), await opener()  # type: ignore[operator]
        dead = await gone_process_owner()
    live = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    try:
        await one.create_batch(record("batch_1", "in_progress", NOW, "file-1", 4), lines(4))
        await one.claim_lines("batch_1", 2, dead)  # lines 1, 3
        await one.answer_line("batch_1", 1, LineResult("c0", "batch_1-1", 200, {"id": "gen"}))
        await one.claim_lines("batch_1", 1, live)  # line 5: a live runner's
        assert await one.hold("batch_1", dead)  # it submits and polls the batch's OpenRouter batches
        if stores.backend == "postgres":
            assert await two.adopt("batch_1", "running", "alive") == []  # the owner's lease holds
            assert not await two.hold("batch_1", "alive")
            await asyncio.sleep(lease * 0.6)
            assert await one.renew(dead) == 2 and await one.renew(live) == 1
            await asyncio.sleep(lease * 0.6)
            assert await two.adopt("batch_1", "running", "alive") == []  # renewed: still held
            assert not await two.hold("batch_1", "alive")
            await asyncio.sleep(lease * 0.7)
            assert await one.renew(live) == 1  # the live one renews; `dead` stopped: its lease lapses
            await asyncio.sleep(lease * 0.6)
        assert await two.hold("batch_1", "alive")
        running = await two.adopt("batch_1", "running", "alive")
        assert [(x.line.line, x.request_id, x.result) for x in running] == [(3, "batch_1-3", None)]
        (answered,) = await two.adopt("batch_1", "answered", "alive")
        assert answered.line.line == 1 and answered.result == LineResult("c0", "batch_1-1", 200, {"id": "gen"})
        assert await two.adopt("batch_1", "running", "alive") == []  # its own, and the live one's: not adopted
        assert await two.renew("alive") == 2
        assert await one.adopt("batch_1", "running", live) == []  # nor the other way round
        assert not await one.hold("batch_1", live)
        await two.retire("alive")  # stopped cleanly: what it held is taken at once, by anyone
        assert [x.line.line for x in await one.adopt("batch_1", "running", live)] == [3]
        assert await one.hold("batch_1", live)
    finally:
        await one.close()
        await two.close()


async def test_an_older_sqlite_file_gets_the_owner_columns(tmp_path: Path) -> None:
    """A ledger file whose batch_lines table was made before claims had owners."""
    import aiosqlite

    path = tmp_path / "ledger.sqlite3"
    async with aiosqlite.connect(path) as db:
        await db.executescript(
            "CREATE TABLE batch_lines (batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, "
            "body BLOB NOT NULL, state TEXT NOT NULL, request_id TEXT, upstream_batch TEXT, result BLOB, "
            "succeeded INTEGER, PRIMARY KEY (batch_id, line));"
            "INSERT INTO batch_lines VALUES ('batch_1', 1, 'a', '{}', 'running', 'batch_1-1', NULL, NULL, NULL);"
        )
        await db.commit()
    store = await SqliteBatchStore.open(path)
    try:
        (cut,) = await store.adopt("batch_1", "running", "me")  # left by an older proxy: no owner
        assert (cut.line.line, cut.request_id) == (1, "batch_1-1")
    finally:
        await store.close()


async def test_a_replica_starting_beside_one_writing_takes_no_lock_on_the_ledger() -> None:
    """The batch tables exist: a second replica opening the store must not wait for (or deadlock
    with) another's open transaction on the ledger's table, as `CREATE INDEX IF NOT EXISTS` would
    (it takes a SHARE lock on the table before it looks). Seen as a deadlock in a scale-out test."""

    made = {m.group(1) for s in SCHEMA if (m := re.search(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", s))}
    assert made == set(SCHEMA_OBJECTS)  # what is looked up is what the schema makes
    async with scratch_schema() as (_, dsn):
        ledger = await PgLedger.open(dsn, prune=False)
        first = await PgBatchStore.open(dsn, pool_size=1)
        writer = await asyncpg.connect(dsn)
        try:
            transaction = writer.transaction()
            await transaction.start()  # a replica's ledger write in progress (ROW EXCLUSIVE, held)
            await writer.execute(f"LOCK TABLE {TABLE} IN ROW EXCLUSIVE MODE")
            second = await asyncio.wait_for(PgBatchStore.open(dsn, pool_size=1), timeout=10)
            await second.close()
            await transaction.rollback()
        finally:
            await writer.close()
            await first.close()
            await ledger.close()
