"""The ledger against real SQLite files: durability, group commit, aggregates, retention."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sqlite3
import struct
import sys
import threading
from pathlib import Path

import pytest

from proxy.money.ledger import SCHEMA_VERSION, Ledger, LedgerClosed, LedgerRow, LedgerSchemaError, SummaryRow

WRITER = Path(__file__).resolve().parent.parent / "support" / "ledger_writer.py"
DAY = 86_400.0
T0 = 1_750_000_000.0  # a fixed "now" so periods and retention are deterministic


def row(
    request_id: str,
    *,
    ts: float = T0,
    key: str | None = "alice",
    model: str | None = "openai/gpt-4o-mini",
    virtual: str | None = "cheap",
    cost: float = 0.001,
    baseline: float = 0.004,
    prompt: int = 100,
    completion: int = 50,
    **overrides,
) -> LedgerRow:
    fields = dict(
        ts=ts,
        request_id=request_id,
        key_name=key,
        requested_model=virtual or model or "?",
        virtual_model=virtual,
        model=model,
        upstream="openrouter",
        provider="OpenAI",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=cost,
        cost_source="upstream",
        baseline_cost_usd=baseline,
        latency_s=0.5,
        ttft_s=0.1,
        status=200,
        attempts=1,
        streamed=False,
    )
    fields.update(overrides)
    return LedgerRow(**fields)


# Hand-computed figures below are for this set (all inside [T0, T0 + DAY)).
SAMPLE = [
    row("r1", key="alice", model="m/a", virtual="cheap", cost=0.001, baseline=0.004, prompt=100, completion=10),
    row("r2", key="alice", model="m/a", virtual="cheap", cost=0.003, baseline=0.004, prompt=200, completion=20),
    row("r3", key="bob", model="m/b", virtual="smart", cost=0.010, baseline=0.008, prompt=300, completion=30),
    row(
        "r4",
        key=None,
        model="m/b",
        virtual=None,
        cost=0.002,
        baseline=0.0,
        prompt=400,
        completion=40,
        streamed=True,
        cached=True,
        cost_source="cached",
        generation_id="gen-4",
        ttft_s=None,
    ),
    row(
        "r5",
        key="bob",
        model=None,
        virtual="smart",
        cost=0.0,
        baseline=0.0,
        prompt=0,
        completion=0,
        status=502,
        attempts=3,
        error="upstream_unavailable",
    ),
]


async def open_at_t0(path: Path, **options) -> Ledger:
    """Rows here are dated around T0, so the clock must be too, or opening would prune them."""
    return await Ledger.open(path, clock=lambda: T0, **options)


@pytest.fixture
async def ledger(tmp_path: Path):
    opened = await open_at_t0(tmp_path / "ledger.db")
    yield opened
    await opened.close()


async def test_rows_and_aggregates_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "ledger.db"
    first = await open_at_t0(path)
    await asyncio.gather(*(first.record(r) for r in SAMPLE))
    await first.close()

    second = await open_at_t0(path)
    try:
        assert await second.rows() == SAMPLE  # every field round-trips, booleans and None included
        assert await second.spend_between(T0) == pytest.approx(0.016)
        assert await second.spend_between(T0, T0 + DAY, key_name="alice") == pytest.approx(0.004)
        assert await second.spend_by_key_between(T0) == pytest.approx({"alice": 0.004, "bob": 0.010, "": 0.002})
        assert (await second.totals(T0, T0 + DAY)).requests == 5
    finally:
        await second.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        indexes = {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "requests_ts_key_cost" in indexes and "requests_key_ts_cost" not in indexes


async def test_spend_respects_half_open_periods_and_keys(ledger: Ledger) -> None:
    await asyncio.gather(
        ledger.record(row("yesterday", ts=T0 - 1, cost=0.5)),
        ledger.record(row("start", ts=T0, cost=0.25)),
        ledger.record(row("bob", ts=T0 + 10, key="bob", cost=0.125)),
        ledger.record(row("tomorrow", ts=T0 + DAY, cost=1.0)),
    )
    assert await ledger.spend_between(T0, T0 + DAY) == pytest.approx(0.375)
    assert await ledger.spend_between(T0) == pytest.approx(1.375)  # open-ended
    assert await ledger.spend_between(T0, T0 + DAY, key_name="alice") == pytest.approx(0.25)
    assert await ledger.spend_between(T0, key_name="nobody") == 0.0
    assert await ledger.spend_by_key_between(T0 - DAY, T0) == pytest.approx({"alice": 0.5})
    assert await ledger.spend_by_key_between(T0 + 2 * DAY) == {}


async def test_spend_sums_tiny_costs_exactly(ledger: Ledger) -> None:
    # 10,000 requests of $0.0000001: float sums drift, nano-dollar sums do not.
    await asyncio.gather(*(ledger.record(row(f"t{i}", cost=1e-7)) for i in range(10_000)))
    assert await ledger.spend_between(T0) == 0.001


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        (
            "model",
            [
                # group, requests, prompt, completion, cost, avg, max, baseline, savings, savings %,
                # cache hits, what they saved
                SummaryRow("m/b", 2, 700, 70, 0.012, 0.006, 0.010, 0.008, -0.004, -50.0, 1, 0.0),
                SummaryRow("m/a", 2, 300, 30, 0.004, 0.002, 0.003, 0.008, 0.004, 50.0),
                SummaryRow("", 1, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, None),
            ],
        ),
        (
            "virtual",
            [
                SummaryRow("smart", 2, 300, 30, 0.010, 0.005, 0.010, 0.008, -0.002, -25.0),
                SummaryRow("cheap", 2, 300, 30, 0.004, 0.002, 0.003, 0.008, 0.004, 50.0),
                SummaryRow("", 1, 400, 40, 0.002, 0.002, 0.002, 0.0, -0.002, None, 1, 0.0),
            ],
        ),
        (
            "key",
            [
                SummaryRow("bob", 2, 300, 30, 0.010, 0.005, 0.010, 0.008, -0.002, -25.0),
                SummaryRow("alice", 2, 300, 30, 0.004, 0.002, 0.003, 0.008, 0.004, 50.0),
                SummaryRow("", 1, 400, 40, 0.002, 0.002, 0.002, 0.0, -0.002, None, 1, 0.0),
            ],
        ),
    ],
)
async def test_summary_groups(ledger: Ledger, by: str, expected: list[SummaryRow]) -> None:
    await asyncio.gather(*(ledger.record(r) for r in SAMPLE))
    await ledger.record(row("outside", ts=T0 + DAY, cost=9.0))  # excluded by the period
    got = await ledger.summary(T0, T0 + DAY, by)
    assert [r.group for r in got] == [r.group for r in expected]
    for actual, wanted in zip(got, expected):
        assert dataclasses.astuple(actual) == pytest.approx(dataclasses.astuple(wanted))


async def test_totals(ledger: Ledger) -> None:
    assert await ledger.totals(T0, T0 + DAY) == SummaryRow("total", 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, None)
    await asyncio.gather(*(ledger.record(r) for r in SAMPLE))
    total = await ledger.totals(T0, T0 + DAY)
    assert dataclasses.astuple(total) == pytest.approx(
        ("total", 5, 1000, 100, 0.016, 0.0032, 0.010, 0.016, 0.0, 0.0, 1, 0.0)
    )
    with pytest.raises(ValueError, match="summary by='provider'"):
        await ledger.summary(T0, T0 + DAY, "provider")  # type: ignore[arg-type]


async def test_prune_by_retention_with_injected_clock(tmp_path: Path) -> None:
    now = [T0]
    path = tmp_path / "ledger.db"
    ledger = await Ledger.open(path, retention_days=30, clock=lambda: now[0])
    await asyncio.gather(
        ledger.record(row("old", ts=T0 - 31 * DAY)),
        ledger.record(row("edge", ts=T0 - 30 * DAY)),  # exactly at the cutoff: kept
        ledger.record(row("new", ts=T0 - DAY)),
    )
    assert await ledger.prune() == 1
    assert [r.request_id for r in await ledger.rows()] == ["edge", "new"]
    assert await ledger.prune(now=T0 + 0.5 * DAY) == 1
    assert await ledger.prune() == 0
    await ledger.close()

    now[0] = T0 + 40 * DAY  # opening prunes once
    reopened = await Ledger.open(path, retention_days=30, clock=lambda: now[0])
    assert await reopened.rows() == []
    await reopened.close()


def wal_commit_frames(db_path: Path) -> int:
    """Commit frames in the live WAL, read from the file itself (not from the ledger).

    A WAL frame header is 24 bytes: page number, database size after commit (non-zero
    only on a transaction's last frame), then the two salts of the WAL generation.
    """
    data = (db_path.parent / (db_path.name + "-wal")).read_bytes()
    (page_size,) = struct.unpack(">I", data[8:12])
    salts = data[16:24]
    commits, offset = 0, 32
    while offset + 24 + page_size <= len(data):
        header = data[offset : offset + 24]
        if header[8:16] != salts:
            break
        commits += struct.unpack(">I", header[4:8])[0] != 0
        offset += 24 + page_size
    return commits


async def test_burst_is_group_committed(ledger: Ledger) -> None:
    commits_before, frames_before = ledger.commits, wal_commit_frames(ledger.path)
    await asyncio.gather(*(ledger.record(row(f"b{i}", cost=0.001)) for i in range(500)))
    commits = ledger.commits - commits_before
    assert wal_commit_frames(ledger.path) - frames_before == commits  # the counter tells the truth
    assert 1 <= commits <= 5, f"{commits} commits for 500 rows"
    assert len(await ledger.rows()) == 500
    assert await ledger.spend_between(T0) == pytest.approx(0.5)


async def test_max_batch_caps_a_transaction(tmp_path: Path) -> None:
    ledger = await open_at_t0(tmp_path / "ledger.db", max_batch=100)
    await asyncio.gather(*(ledger.record(row(f"b{i}")) for i in range(450)))
    assert ledger.commits == 5
    await ledger.close()


async def test_close_flushes_pending_and_then_refuses(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await open_at_t0(path)
    futures = [ledger.record_nowait(row(f"p{i}")) for i in range(300)]
    await ledger.close()
    assert all(f.done() and f.exception() is None for f in futures)
    await ledger.close()  # idempotent
    with pytest.raises(LedgerClosed, match="late"):
        await ledger.record(row("late"))
    with pytest.raises(LedgerClosed):
        ledger.record_nowait(row("later"))
    with pytest.raises(LedgerClosed):
        await ledger.spend_between(T0)

    reopened = await open_at_t0(path)
    assert len(await reopened.rows()) == 300
    await reopened.close()


async def test_flush_waits_for_queued_rows(ledger: Ledger) -> None:
    futures = [ledger.record_nowait(row(f"f{i}")) for i in range(50)]
    await ledger.flush()
    assert all(f.done() for f in futures)
    assert len(await ledger.rows()) == 50


async def test_cancelled_caller_still_costs(ledger: Ledger) -> None:
    waiting = asyncio.ensure_future(ledger.record(row("gone")))
    await asyncio.sleep(0)
    waiting.cancel()
    await ledger.flush()
    assert [r.request_id for r in await ledger.rows()] == ["gone"]


async def test_bad_rows_are_refused_at_the_caller(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="cost_source 'guess'"):
        await ledger.record(row("bad", cost_source="guess"))
    with pytest.raises(ValueError, match="cost_usd"):
        ledger.record_nowait(row("nan", cost=float("nan")))
    await ledger.record(row("good"))
    assert [r.request_id for r in await ledger.rows()] == ["good"]


@pytest.mark.realtime  # SQLite's busy timeout (0.05 s) runs out on the real clock
async def test_db_error_fails_the_batch_and_the_writer_carries_on(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await open_at_t0(path, busy_timeout_s=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await ledger.record(row("blocked"))
        blocker.execute("ROLLBACK")
        await ledger.record(row("after"))
        assert [r.request_id for r in await ledger.rows()] == ["after"]
    finally:
        blocker.close()
        await ledger.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(LedgerSchemaError, match="schema version 99"):
        await Ledger.open(path)


@pytest.mark.slow  # a real writer process, killed with SIGKILL
async def test_sigkill_under_load_loses_no_acknowledged_row(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WRITER), str(path), "16", stdout=asyncio.subprocess.PIPE
    )
    acknowledged: list[str] = []
    try:
        async with asyncio.timeout(8):
            while len(acknowledged) < 400:
                line = await proc.stdout.readline()
                assert line, "the writer exited before printing enough ids"
                acknowledged.append(line.decode().strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Lines already in the pipe were printed after record() returned too.
    tail = await proc.stdout.read()
    acknowledged += [line for line in tail.decode().split("\n")[:-1] if line]

    ledger = await Ledger.open(path)
    try:
        recorded = {r.request_id for r in await ledger.rows()}
    finally:
        await ledger.close()
    missing = [rid for rid in acknowledged if rid not in recorded]
    assert not missing, f"{len(missing)} acknowledged rows lost, e.g. {missing[:5]}"
    assert len(recorded) >= len(acknowledged)


async def test_a_ledger_never_closed_does_not_hang_the_process(tmp_path: Path) -> None:
    # aiosqlite's worker thread is not a daemon; the writer must stop it when the loop tears down.
    script = (
        "import asyncio, sys\nfrom proxy.money.ledger import Ledger\n"
        "async def main():\n    await Ledger.open(sys.argv[1])\nasyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(tmp_path / "ledger.db"), stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(5):
            _, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert not stderr, stderr.decode()


async def test_a_version_1_ledger_is_migrated_in_place(tmp_path: Path) -> None:
    """Files written before cache savings were recorded keep their rows and gain the column."""
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as raw:
        raw.executescript("""
            CREATE TABLE requests (id INTEGER PRIMARY KEY, ts REAL NOT NULL, request_id TEXT NOT NULL,
              key_name TEXT, requested_model TEXT NOT NULL, virtual_model TEXT, model TEXT, upstream TEXT,
              provider TEXT, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
              cost_nusd INTEGER NOT NULL, cost_source TEXT NOT NULL, baseline_cost_nusd INTEGER NOT NULL,
              latency_s REAL NOT NULL, ttft_s REAL, status INTEGER NOT NULL, attempts INTEGER NOT NULL,
              streamed INTEGER NOT NULL, generation_id TEXT, cached INTEGER NOT NULL, error TEXT);
            INSERT INTO requests (ts, request_id, requested_model, prompt_tokens, completion_tokens, cost_nusd,
              cost_source, baseline_cost_nusd, latency_s, status, attempts, streamed, cached)
              VALUES (1.0, 'old-1', 'cheap', 10, 20, 1500, 'upstream', 3000, 0.1, 200, 1, 0, 0);
            PRAGMA user_version = 1;
        """)
    ledger = await Ledger.open(path, clock=lambda: 2.0)
    try:
        (row,) = await ledger.rows()
        assert (row.request_id, row.cost_usd, row.saved_usd) == ("old-1", 0.0000015, 0.0)
    finally:
        await ledger.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_a_version_2_ledger_is_migrated_in_place(tmp_path: Path) -> None:
    """Files written before cache tokens, reconciliation and flags keep their rows and gain the columns;
    an estimated row left by that version is found for reconciliation."""
    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as raw:
        raw.executescript("""
            CREATE TABLE requests (id INTEGER PRIMARY KEY, ts REAL NOT NULL, request_id TEXT NOT NULL,
              key_name TEXT, requested_model TEXT NOT NULL, virtual_model TEXT, model TEXT, upstream TEXT,
              provider TEXT, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
              cost_nusd INTEGER NOT NULL, cost_source TEXT NOT NULL, baseline_cost_nusd INTEGER NOT NULL,
              latency_s REAL NOT NULL, ttft_s REAL, status INTEGER NOT NULL, attempts INTEGER NOT NULL,
              streamed INTEGER NOT NULL, generation_id TEXT, cached INTEGER NOT NULL, error TEXT,
              saved_nusd INTEGER NOT NULL DEFAULT 0);
            CREATE INDEX requests_ts_key_cost ON requests (ts, key_name, cost_nusd);
            INSERT INTO requests (ts, request_id, requested_model, upstream, prompt_tokens, completion_tokens,
              cost_nusd, cost_source, baseline_cost_nusd, latency_s, status, attempts, streamed, cached,
              generation_id, saved_nusd)
              VALUES (1.0, 'old-1', 'cheap', 'openrouter', 10, 20, 1500, 'estimate', 3000, 0.1, 200, 1, 1, 0,
                      'gen-old', 700);
            PRAGMA user_version = 2;
        """)
    ledger = await Ledger.open(path, clock=lambda: 2.0)
    try:
        (row_,) = await ledger.rows()
        assert (row_.request_id, row_.cost_usd, row_.saved_usd, row_.cached_tokens) == ("old-1", 1.5e-6, 7e-7, 0)
        assert (row_.estimate_usd, row_.flags, row_.reconcile_tries) == (None, None, 0)
        (pending,) = await ledger.unreconciled(0.0, ["openrouter"], 8)
        assert pending.generation_id == "gen-old"
    finally:
        await ledger.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (6,)
        indexes = {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "requests_unreconciled" in indexes


async def test_a_version_4_file_gains_the_batch_columns(tmp_path) -> None:
    """Files written before the Batch API keep their rows (no batch), and take batch lines' rows."""
    path = tmp_path / "v4.db"
    ledger = await Ledger.open(path, prune=False)
    await ledger.record(row("before"))
    await ledger.close()
    with sqlite3.connect(path) as raw:  # back to version 4's shape, as a proxy of that version left it
        raw.executescript("""
            DROP INDEX requests_batch;
            ALTER TABLE requests DROP COLUMN batch_id;
            ALTER TABLE requests DROP COLUMN custom_id;
            PRAGMA user_version = 4;
        """)
    ledger = await Ledger.open(path, prune=False)
    try:
        await ledger.record(row("line", batch_id="batch_1", custom_id="item-7"))
        old, line = await ledger.rows()
        assert (old.request_id, old.batch_id, old.custom_id) == ("before", None, None)
        assert (line.batch_id, line.custom_id) == ("batch_1", "item-7")
        (grouped,) = [g for g in await ledger.summary(0, 1e12, "batch") if g.group == "batch_1"]
        assert grouped.requests == 1
    finally:
        await ledger.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_a_version_5_file_loses_the_key_first_index_and_per_key_spend_stays_covered(tmp_path) -> None:
    """Version 6 drops (key_name, ts, cost_nusd), which no query needed: one page less per commit.
    Per-key spend is still answered from the (ts, key_name, cost_nusd) index alone."""
    path = tmp_path / "v5.db"
    ledger = await open_at_t0(path)
    await ledger.record(row("before", key="alice", cost=0.25))
    await ledger.close()
    with sqlite3.connect(path) as raw:  # as a proxy of version 5 left it
        raw.executescript("""
            CREATE INDEX requests_key_ts_cost ON requests (key_name, ts, cost_nusd);
            PRAGMA user_version = 5;
        """)
    ledger = await open_at_t0(path)
    try:
        assert await ledger.spend_between(T0, T0 + DAY, key_name="alice") == pytest.approx(0.25)
    finally:
        await ledger.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (6,)
        indexes = {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "requests_key_ts_cost" not in indexes
        plan = " ".join(
            str(step[-1])
            for step in raw.execute(
                "EXPLAIN QUERY PLAN SELECT sum(cost_nusd) FROM requests WHERE key_name = ? AND ts >= ? AND ts < ?",
                ("alice", T0, T0 + DAY),
            )
        )
        assert "COVERING INDEX requests_ts_key_cost" in plan, plan


async def test_reconciling_a_row_keeps_its_estimate(ledger: Ledger) -> None:
    from proxy.money.ledger import Reconciled

    estimated = row("cut", cost=0.002, cost_source="estimate", generation_id="gen-cut", streamed=True)
    await ledger.record(estimated)
    await ledger.record(row("elsewhere", cost=0.001, cost_source="estimate", generation_id="gen-x", upstream="oa"))
    await ledger.record(row("exact", cost=0.003, generation_id="gen-exact"))
    assert [r.request_id for r in await ledger.unreconciled(T0 - 1, ["openrouter"], 8)] == ["cut"]
    assert await ledger.note_reconcile_try("cut", "gen-cut")
    assert await ledger.unreconciled(T0 - 1, ["openrouter"], 1) == []  # one lookup made, one allowed
    correction = Reconciled(0.0023456789, 120, 30, 100, 0.004)
    assert await ledger.reconcile("cut", "gen-cut", correction)
    assert not await ledger.reconcile("cut", "gen-cut", correction)  # once only
    assert not await ledger.reconcile("exact", "gen-exact", correction)  # an exact cost is never replaced
    done = next(r for r in await ledger.rows() if r.request_id == "cut")
    assert (done.cost_usd, done.cost_source, done.estimate_usd) == (0.002345679, "reconciled", 0.002)
    assert (done.prompt_tokens, done.completion_tokens, done.cached_tokens, done.reconcile_tries) == (120, 30, 100, 2)
    assert await ledger.spend_between(T0) == pytest.approx(0.002345679 + 0.001 + 0.003)


async def test_a_row_past_the_ceiling_is_refused_alone(ledger: Ledger) -> None:
    """The accountant clamps absurd figures (`proxy.core.bounds`); the ledger still refuses a row
    that would overflow, at its caller, so the rows of the same batch are written."""
    with pytest.raises(ValueError, match="cost_usd is past"):
        ledger.record_nowait(row("absurd", cost=9.2e9))
    await asyncio.gather(*(ledger.record(row(f"ok-{i}")) for i in range(5)))
    assert len(await ledger.rows()) == 5


# --- the writer thread ---------------------------------------------------------------------


async def test_a_row_is_committed_when_record_returns(ledger: Ledger) -> None:
    """Seen by another connection (another process would see the same) the moment each caller
    is woken: the guarantee the proxy's answers rest on."""
    raw = sqlite3.connect(ledger.path)
    seen_at_wake: dict[str, int] = {}

    async def one(request_id: str) -> None:
        await ledger.record(row(request_id))
        (count,) = raw.execute("SELECT count(*) FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        seen_at_wake[request_id] = count

    try:
        await asyncio.gather(*(one(f"c{i}") for i in range(40)))
    finally:
        raw.close()
    assert seen_at_wake == {f"c{i}": 1 for i in range(40)}


@pytest.mark.realtime  # the writer waits on SQLite's busy timeout, on the real clock
async def test_the_loop_keeps_turning_while_the_writer_waits_on_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await open_at_t0(path, busy_timeout_s=2.0)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the writer's BEGIN IMMEDIATE now waits for the lock
        pending = ledger.record_nowait(row("waits"))
        turns = 0
        for _ in range(20):  # the loop runs (and times) while the writer thread is blocked
            await asyncio.sleep(0.01)
            turns += 1
        assert turns == 20 and not pending.done()
        blocker.execute("ROLLBACK")
        await pending
        assert [r.request_id for r in await ledger.rows()] == ["waits"]
    finally:
        blocker.close()
        await ledger.close()


async def test_one_group_one_transaction_whatever_the_flush_barriers(ledger: Ledger) -> None:
    """Rows and flush barriers queued in one turn of the loop land in one group: one commit,
    one wake-up that resolves them all."""
    commits = ledger.commits
    futures = [ledger.record_nowait(row(f"g{i}")) for i in range(100)]
    barrier = asyncio.ensure_future(ledger.flush())
    await asyncio.gather(*futures, barrier)
    assert ledger.commits - commits <= 2  # the thread may have taken the first rows before the rest came
    assert ledger.rows_written == 100


async def test_close_commits_what_is_queued_and_stops_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await open_at_t0(path)
    threads_before = {t.name for t in threading.enumerate()}
    assert f"ledger-writer:{path.name}" in threads_before
    futures = [ledger.record_nowait(row(f"q{i}")) for i in range(1200)]  # more than one group (512)
    await ledger.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert f"ledger-writer:{path.name}" not in {t.name for t in threading.enumerate()}
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM requests").fetchone() == (1200,)


@pytest.mark.realtime  # the group waits on the real clock
@pytest.mark.parametrize("delay_s, commits", [(0.3, 1), (0.0, 2)])
async def test_under_load_a_commit_waits_for_the_requests_in_flight(
    tmp_path: Path, delay_s: float, commits: int
) -> None:
    """commit_delay_s, with other requests in flight: a row that comes while the first waits joins
    its commit; with no delay it gets a commit of its own (the contrast shows the wait did it)."""
    in_flight = 10  # what the proxy would say: nine others besides the first row's request
    ledger = await open_at_t0(tmp_path / "ledger.db", commit_delay_s=delay_s, busy=lambda: in_flight)
    try:
        first = ledger.record_nowait(row("first"))
        await asyncio.sleep(0.1)  # the thread has the first row by now
        second = ledger.record_nowait(row("second"))
        await asyncio.gather(first, second)
        assert (ledger.commits, ledger.rows_written) == (commits, 2)
    finally:
        await ledger.close()


@pytest.mark.realtime
async def test_with_nothing_else_in_flight_a_commit_does_not_wait(tmp_path: Path) -> None:
    """One client, requests back to back: the delay (here absurdly long) is never waited."""
    in_flight = 1
    ledger = await open_at_t0(tmp_path / "ledger.db", commit_delay_s=30.0, busy=lambda: in_flight)
    try:
        for i in range(3):
            await asyncio.wait_for(ledger.record(row(f"alone{i}")), timeout=10.0)
        assert (ledger.commits, ledger.rows_written) == (3, 3)
    finally:
        await ledger.close()


@pytest.mark.realtime
async def test_under_steady_load_the_writer_collects_hand_overs_without_being_woken(tmp_path: Path) -> None:
    """While others are in flight, the thread sleeps the delay and takes what came meanwhile: rows
    handed over one at a time, a few ms apart, are committed in fewer groups than rows, each
    acknowledged only once committed."""
    in_flight = 10
    ledger = await open_at_t0(tmp_path / "ledger.db", commit_delay_s=0.02, busy=lambda: in_flight)
    try:
        pending = []
        for i in range(30):
            pending.append(ledger.record_nowait(row(f"steady{i}")))
            await asyncio.sleep(0.002)  # one row per turn of the loop, as requests finishing one by one
        await asyncio.gather(*pending)
        assert ledger.rows_written == 30
        assert ledger.commits <= 10, f"{ledger.commits} commits for 30 rows 2 ms apart with a 20 ms delay"
        assert len(await ledger.rows()) == 30
    finally:
        await ledger.close()
