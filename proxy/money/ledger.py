"""The spend ledger: one SQLite row per client request, durable before the answer.

Durability and speed come from group commit. `record()` only enqueues; a
dedicated writer thread with its own connection (`proxy.money.ledger_writer`)
takes everything queued (up to `max_batch`), inserts it in one transaction and
commits once, then wakes the event loop once to resolve every caller of that
group. A burst of N concurrent requests therefore costs one commit, not N, and a
caller whose `record()` returned knows its row is in the WAL: a SIGKILL
afterwards loses nothing. (With `synchronous="NORMAL"` an OS crash or power cut
may still lose the last commits; `"FULL"` fsyncs every commit, which group
commit amortises.)

Queries, reconciliation updates and pruning use a second connection (aiosqlite).
In WAL mode it sees only committed rows, never a group the writer is about to
roll back; an asyncio lock keeps its queries out of pruning's open transaction.

Money is stored as INTEGER nano-dollars, not REAL dollars: integer sums are
exact and independent of row order and SQLite version (SQLite before 3.43 sums
REAL naively), so spend rebuilt at start-up equals the per-key figures to the
last unit. Micro-dollars would be too coarse: a short request on a cheap model
costs well under $0.000001. Nano-dollars overflow int64 only past $9e9.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import aiosqlite

from proxy.money.ledger_front import QueuedLedger
from proxy.money.ledger_rows import (
    COLUMNS,
    ESTIMATED_SOURCES,
    GROUP_COLUMNS,
    MIGRATIONS,
    SCHEMA_SQL,
    SCHEMA_VERSION,
    SELECT_ROWS,
    SYNCHRONOUS_MODES,
    LedgerClosed,
    LedgerRow,
    LedgerSchemaError,
    Reconciled,
    SummaryRow,
    from_nano,
    from_record,
    summary_row,
    to_nano,
)
from proxy.money.ledger_writer import LedgerWriter
from proxy.money.ledger_writer import connect as writer_connection

log = logging.getLogger("orproxy.ledger")
_PRUNE_CHUNK = 10_000  # rows deleted per transaction, so pruning never stalls the writer for long


class Ledger(QueuedLedger):
    """Spend records in one SQLite file; build with `await Ledger.open(path)`, end with `close()`."""

    _writer: LedgerWriter

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        *,
        retention_days: int,
        clock: Callable[[], float],
        writer: LedgerWriter,
    ) -> None:
        self._db = db  # queries, reconciliation updates and pruning; the writer has its own connection
        self._path = path
        self._retention_s = retention_days * 86_400.0
        self._clock = clock
        self._lock = asyncio.Lock()  # one transaction or query at a time on the shared connection
        self._closed = False
        self._shutdown: asyncio.Task[None] | None = None
        self._writer = writer
        self._watch = asyncio.create_task(self._watch_writer(), name=f"ledger-writer:{path.name}")

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        retention_days: int = 400,
        synchronous: str = "NORMAL",
        max_batch: int = 512,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 5.0,
        prune: bool = True,
        commit_delay_s: float = 0.0,
        busy: Callable[[], int] | None = None,
    ) -> Ledger:
        path = Path(path)
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"ledger synchronous={synchronous!r}: use one of {sorted(SYNCHRONOUS_MODES)}")
        if retention_days < 1 or max_batch < 1:
            raise ValueError(f"ledger needs retention_days >= 1 and max_batch >= 1 (got {retention_days}, {max_batch})")
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the writer issues BEGIN/COMMIT itself instead of
        # relying on the sqlite3 module's implicit transactions.
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await _prepare(db, path, synchronous, busy_timeout_s)
        except BaseException:
            await db.close()
            raise
        try:
            connection = await asyncio.to_thread(writer_connection, path, synchronous, busy_timeout_s)
        except BaseException:
            await db.close()
            raise
        writer = LedgerWriter(
            connection,
            path,
            max_batch=max_batch,
            loop=asyncio.get_running_loop(),
            commit_delay_s=commit_delay_s,
            busy=busy,
        )
        ledger = cls(db, path, retention_days=retention_days, clock=clock, writer=writer)
        if prune:  # the proxy prunes; tools that only read (report, explain, simulate) pass prune=False
            await ledger.prune()
        return ledger

    @property
    def path(self) -> Path:
        return self._path

    @property
    def where(self) -> str:
        return str(self._path)

    # --- writing (QueuedLedger: record, record_nowait, flush, close) ------------

    def _taking(self) -> bool:
        return not self._closed and not self._watch.done()

    def _stopped(self) -> bool:
        return self._closed

    def _stop_taking(self) -> None:
        self._closed = True
        self._writer.stop()

    async def _finish(self) -> None:
        await asyncio.wait([self._watch])  # wait, not await: a cancelled watcher must not fail close()
        await asyncio.to_thread(self._writer.join)  # it has ended or is ending: its connection is closed
        await self._db.close()

    async def _watch_writer(self) -> None:
        """Lives as long as the writer thread. Torn down without close() (the loop's tasks are
        cancelled), it stops the thread after what is queued and stops aiosqlite's thread, which
        is not a daemon and would keep the process from exiting after the event loop is gone."""
        try:
            await asyncio.shield(self._writer.stopped)
            self._closed = True  # the thread has ended (after close(), or by a bug): nothing more is taken
        except asyncio.CancelledError:
            self._closed = True
            self._writer.stop()
            stopped = self._db.stop()
            if stopped is not None:
                await stopped
            raise

    # --- reading -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerClosed(f"ledger {self._path} is closed; open it again to query it")

    async def _fetchall(self, sql: str, params: Sequence = ()) -> list:
        self._check_open()
        async with self._lock:
            return list(await self._db.execute_fetchall(sql, params))

    async def spend_between(self, start: float, end: float | None = None, *, key_name: str | None = None) -> float:
        """Committed cost in [start, end); all keys unless `key_name` is given."""
        params: tuple[object, ...]
        if key_name is None:
            sql, params = "SELECT sum(cost_nusd) FROM requests WHERE ts >= ? AND ts < ?", (start, _end(end))
        else:
            sql = "SELECT sum(cost_nusd) FROM requests WHERE key_name = ? AND ts >= ? AND ts < ?"
            params = (key_name, start, _end(end))
        ((total,),) = await self._fetchall(sql, params)
        return from_nano(total)

    async def spend_by_key_between(self, start: float, end: float | None = None) -> dict[str, float]:
        """Cost in [start, end) per key name; requests without a key are under ""."""
        found = await self._fetchall(
            "SELECT coalesce(key_name, ''), sum(cost_nusd) FROM requests WHERE ts >= ? AND ts < ? GROUP BY 1",
            (start, _end(end)),
        )
        return {key: from_nano(total) for key, total in found}

    async def summary(
        self, start: float, end: float, by: Literal["model", "virtual", "key", "api", "batch"]
    ) -> list[SummaryRow]:
        """Per-group figures for [start, end), largest cost first; a missing group value is ""."""
        column = GROUP_COLUMNS.get(by)
        if column is None:
            raise ValueError(f"ledger summary by={by!r}: use one of {sorted(GROUP_COLUMNS)}")
        found = await self._fetchall(
            f"SELECT coalesce({column}, '') AS grp, count(*), sum(prompt_tokens), sum(completion_tokens), "
            "sum(cost_nusd), max(cost_nusd), sum(baseline_cost_nusd), sum(cached), sum(saved_nusd) FROM requests "
            "WHERE ts >= ? AND ts < ? GROUP BY grp ORDER BY sum(cost_nusd) DESC, grp",
            (start, end),
        )
        return [summary_row(*values) for values in found]

    async def totals(self, start: float, end: float) -> SummaryRow:
        (values,) = await self._fetchall(
            "SELECT count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost_nusd), "
            "max(cost_nusd), sum(baseline_cost_nusd), sum(cached), sum(saved_nusd) FROM requests "
            "WHERE ts >= ? AND ts < ?",
            (start, end),
        )
        return summary_row("total", *values)

    async def rows(self, start: float | None = None, end: float | None = None) -> list[LedgerRow]:
        """Committed rows in [start, end), oldest first."""
        found = await self._fetchall(SELECT_ROWS, (-math.inf if start is None else start, _end(end)))
        return [from_record(values) for values in found]

    # --- reconciliation ------------------------------------------------------

    async def unreconciled(self, since: float, upstreams: Sequence[str], max_tries: int) -> list[LedgerRow]:
        """Rows since `since` whose cost is still an estimate (`estimate`, `reserved`) on one of
        `upstreams`, with a generation id to look up and fewer than `max_tries` lookups made."""
        if not upstreams:
            return []
        marks = ", ".join("?" * len(upstreams))
        sources = ", ".join("?" * len(ESTIMATED_SOURCES))
        found = await self._fetchall(
            f"SELECT {', '.join(COLUMNS)} FROM requests WHERE cost_source IN ({sources}) "
            f"AND generation_id IS NOT NULL AND ts >= ? AND upstream IN ({marks}) AND reconcile_tries < ? "
            "ORDER BY ts, id",
            (*ESTIMATED_SOURCES, since, *upstreams, max_tries),
        )
        return [from_record(values) for values in found]

    async def reconcile(self, request_id: str, generation_id: str, correction: Reconciled) -> bool:
        """Replace an estimated cost with the upstream's own figure; the estimate is kept in
        `estimate_nusd`. False when the row is not (or no longer) an estimate: nothing changes."""
        sources = ", ".join("?" * len(ESTIMATED_SOURCES))
        return await self._update(
            "UPDATE requests SET estimate_nusd = cost_nusd, cost_nusd = ?, cost_source = 'reconciled', "
            "prompt_tokens = ?, completion_tokens = ?, cached_tokens = ?, baseline_cost_nusd = ?, "
            "reconcile_tries = reconcile_tries + 1 "
            f"WHERE request_id = ? AND generation_id = ? AND cost_source IN ({sources})",
            (
                to_nano(correction.cost_usd),
                correction.prompt_tokens,
                correction.completion_tokens,
                correction.cached_tokens,
                to_nano(correction.baseline_cost_usd),
                request_id,
                generation_id,
                *ESTIMATED_SOURCES,
            ),
        )

    async def note_reconcile_try(self, request_id: str, generation_id: str) -> bool:
        """Count a lookup that found nothing yet, so a restart does not retry forever."""
        return await self._update(
            "UPDATE requests SET reconcile_tries = reconcile_tries + 1 WHERE request_id = ? AND generation_id = ?",
            (request_id, generation_id),
        )

    async def _update(self, sql: str, params: Sequence) -> bool:
        """One UPDATE, its own transaction (autocommit), behind the lock that keeps it out of a batch."""
        self._check_open()
        async with self._lock, self._db.execute(sql, params) as cursor:
            return cursor.rowcount > 0

    # --- retention -----------------------------------------------------------

    async def prune(self, now: float | None = None, *, retention_days: int | None = None) -> int:
        """Delete rows older than retention_days (default: the one the ledger was opened with) before
        `now` (default: the clock); return how many."""
        self._check_open()
        retention_s = self._retention_s if retention_days is None else retention_days * 86_400.0
        cutoff = (self._clock() if now is None else now) - retention_s
        deleted = 0
        while True:
            # Chunked, releasing the lock between chunks, so a first prune of a
            # large backlog does not hold up the requests being recorded meanwhile.
            async with self._lock:
                await _exec(self._db, "BEGIN IMMEDIATE")
                try:
                    async with self._db.execute(
                        "DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE ts < ? LIMIT ?)",
                        (cutoff, _PRUNE_CHUNK),
                    ) as cursor:
                        count = cursor.rowcount
                    await self._db.commit()
                except BaseException:
                    await _rollback_quietly(self._db)
                    raise
            deleted += count
            if count < _PRUNE_CHUNK:
                break
        if deleted:
            log.info("ledger %s: pruned %d request(s) older than %.0f days", self._path, deleted, retention_s / 86_400)
        return deleted


async def _prepare(db: aiosqlite.Connection, path: Path, synchronous: str, busy_timeout_s: float) -> None:
    await _exec(db, f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    ((mode,),) = await db.execute_fetchall("PRAGMA journal_mode = WAL")
    if mode.lower() != "wal":
        log.warning("ledger %s: SQLite refused WAL (journal_mode=%s); commits will be slower", path, mode)
    await _exec(db, f"PRAGMA synchronous = {synchronous}")
    ((version,),) = await db.execute_fetchall("PRAGMA user_version")
    if version > SCHEMA_VERSION:
        raise LedgerSchemaError(
            f"ledger {path} has schema version {version}, but this proxy knows only up to "
            f"{SCHEMA_VERSION}; run a newer proxy or point ledger.path at another file"
        )
    if version < SCHEMA_VERSION:
        # One transaction, so a crash mid-way never leaves tables without their version.
        steps = SCHEMA_SQL if version == 0 else "\n".join(MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
        script = f"BEGIN IMMEDIATE;\n{steps}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
        try:
            async with db.executescript(script):
                pass
        except BaseException:
            await _rollback_quietly(db)
            raise


async def _exec(db: aiosqlite.Connection, sql: str, params: Sequence = ()) -> None:
    async with db.execute(sql, params):
        pass


async def _rollback_quietly(db: aiosqlite.Connection) -> None:
    try:
        if db.in_transaction:
            await db.rollback()
    except Exception as exc:  # the original error is the one worth reporting
        log.warning("ledger rollback failed: %s", exc)


def _end(end: float | None) -> float:
    return math.inf if end is None else end
