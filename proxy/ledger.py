"""The spend ledger: one SQLite row per client request, durable before the answer.

Durability and speed come from group commit. `record()` only enqueues; a single
writer task takes everything queued (up to `max_batch`), inserts it in one
transaction and commits once, then wakes every caller of that batch. A burst of
N concurrent requests therefore costs one commit, not N, and a caller whose
`record()` returned knows its row is in the WAL: a SIGKILL afterwards loses
nothing. (With `synchronous="NORMAL"` an OS crash or power cut may still lose
the last commits; `"FULL"` fsyncs every commit, which group commit amortises.)

One long-lived connection serves the writer and the queries. An asyncio lock
keeps queries out of an open write transaction, so a query never sees rows that
a failing batch is about to roll back.

Money is stored as INTEGER nano-dollars, not REAL dollars: integer sums are
exact and independent of row order and SQLite version (SQLite before 3.43 sums
REAL naively), so spend rebuilt at start-up equals the per-key figures to the
last unit. Micro-dollars would be too coarse: a short request on a cheap model
costs well under $0.000001. Nano-dollars overflow int64 only past $9e9.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import aiosqlite

log = logging.getLogger("orproxy.ledger")

SCHEMA_VERSION = 2
COST_SOURCES = frozenset({"upstream", "catalogue", "override", "estimate", "cached"})
NANO_PER_USD = 1_000_000_000

_SYNCHRONOUS_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_GROUP_COLUMNS = {"model": "model", "virtual": "virtual_model", "key": "key_name"}
_PRUNE_CHUNK = 10_000   # rows deleted per transaction, so pruning never stalls the writer for long

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id                 INTEGER PRIMARY KEY,
    ts                 REAL    NOT NULL,   -- epoch seconds
    request_id         TEXT    NOT NULL,
    key_name           TEXT,
    requested_model    TEXT    NOT NULL,
    virtual_model      TEXT,
    model              TEXT,
    upstream           TEXT,
    provider           TEXT,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    cost_nusd          INTEGER NOT NULL,   -- nano-dollars
    cost_source        TEXT    NOT NULL,
    baseline_cost_nusd INTEGER NOT NULL,   -- nano-dollars
    latency_s          REAL    NOT NULL,
    ttft_s             REAL,
    status             INTEGER NOT NULL,
    attempts           INTEGER NOT NULL,
    streamed           INTEGER NOT NULL,
    generation_id      TEXT,
    cached             INTEGER NOT NULL,
    error              TEXT,
    saved_nusd         INTEGER NOT NULL DEFAULT 0   -- what a cache hit saved, nano-dollars
);
-- Covering indexes: period spend, per-key spend and pruning never touch the table.
CREATE INDEX IF NOT EXISTS requests_ts_key_cost ON requests (ts, key_name, cost_nusd);
CREATE INDEX IF NOT EXISTS requests_key_ts_cost ON requests (key_name, ts, cost_nusd);
CREATE INDEX IF NOT EXISTS requests_request_id ON requests (request_id);
"""

_COLUMNS = (
    "ts", "request_id", "key_name", "requested_model", "virtual_model", "model", "upstream",
    "provider", "prompt_tokens", "completion_tokens", "cost_nusd", "cost_source",
    "baseline_cost_nusd", "latency_s", "ttft_s", "status", "attempts", "streamed",
    "generation_id", "cached", "error", "saved_nusd",
)
# Schema migrations: version -> the statements that take a file from it to the next version.
_MIGRATIONS = {1: "ALTER TABLE requests ADD COLUMN saved_nusd INTEGER NOT NULL DEFAULT 0;"}
_INSERT = f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
# SQLite caps the host parameters of one statement (32766 since 3.32, 999 before).
_ROWS_PER_STATEMENT = (32766 if sqlite3.sqlite_version_info >= (3, 32) else 999) // len(_COLUMNS)


@functools.lru_cache(maxsize=64)
def _insert_many(count: int) -> str:
    one = f"({', '.join('?' * len(_COLUMNS))})"
    return f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES {', '.join([one] * count)}"


_SELECT_ROWS = f"SELECT {', '.join(_COLUMNS)} FROM requests WHERE ts >= ? AND ts < ? ORDER BY ts, id"


class LedgerError(RuntimeError):
    """Base of the ledger's own errors."""


class LedgerClosed(LedgerError):
    """The ledger was closed (or its writer stopped); the row was not recorded."""


class LedgerSchemaError(LedgerError):
    """The file was written by a newer proxy whose schema this one does not know."""


@dataclass(frozen=True, slots=True)
class LedgerRow:
    ts: float
    request_id: str
    key_name: str | None
    requested_model: str
    virtual_model: str | None
    model: str | None
    upstream: str | None
    provider: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cost_source: str
    baseline_cost_usd: float
    latency_s: float
    ttft_s: float | None
    status: int
    attempts: int
    streamed: bool
    generation_id: str | None = None
    cached: bool = False
    error: str | None = None
    saved_usd: float = 0.0        # a cache hit: what the answer cost when it was first bought


@dataclass(frozen=True, slots=True)
class SummaryRow:
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    avg_cost_usd: float
    max_cost_usd: float
    baseline_cost_usd: float
    savings_usd: float
    savings_pct: float | None   # 0-100 of the baseline; None when there is no baseline cost


@dataclass(slots=True)
class _Pending:
    row: LedgerRow | None        # None: a flush barrier, resolved with the batch it lands in
    future: asyncio.Future[None]


_STOP = object()


def _to_nano(usd: float) -> int:
    return round(usd * NANO_PER_USD)


def _from_nano(nano: int | None) -> float:
    return (nano or 0) / NANO_PER_USD


def _check_row(row: LedgerRow) -> None:
    # Rejected here, at the caller, because one bad row inside a batch would fail
    # the whole transaction and every other caller in it (a NaN even becomes NULL
    # in SQLite and trips NOT NULL).
    if row.cost_source not in COST_SOURCES:
        raise ValueError(f"ledger row {row.request_id}: cost_source {row.cost_source!r} "
                         f"is not one of {sorted(COST_SOURCES)}")
    for name in ("ts", "cost_usd", "baseline_cost_usd", "latency_s"):
        value = getattr(row, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"ledger row {row.request_id}: {name} must be a finite number >= 0, got {value!r}")


def _to_params(row: LedgerRow) -> tuple:
    return (
        row.ts, row.request_id, row.key_name, row.requested_model, row.virtual_model, row.model,
        row.upstream, row.provider, row.prompt_tokens, row.completion_tokens, _to_nano(row.cost_usd),
        row.cost_source, _to_nano(row.baseline_cost_usd), row.latency_s, row.ttft_s, row.status,
        row.attempts, int(row.streamed), row.generation_id, int(row.cached), row.error, _to_nano(row.saved_usd),
    )


def _from_record(values: Sequence) -> LedgerRow:
    by_name = dict(zip(_COLUMNS, values))
    by_name["cost_usd"] = _from_nano(by_name.pop("cost_nusd"))
    by_name["baseline_cost_usd"] = _from_nano(by_name.pop("baseline_cost_nusd"))
    by_name["streamed"] = bool(by_name["streamed"])
    by_name["cached"] = bool(by_name["cached"])
    by_name["saved_usd"] = _from_nano(by_name.pop("saved_nusd"))
    return LedgerRow(**{f.name: by_name[f.name] for f in fields(LedgerRow)})


def _summary_row(group: str, requests: int, prompt: int | None, completion: int | None,
                 cost: int | None, largest: int | None, baseline: int | None) -> SummaryRow:
    cost_usd, baseline_usd = _from_nano(cost), _from_nano(baseline)
    savings_nusd = (baseline or 0) - (cost or 0)
    return SummaryRow(
        group=group, requests=requests, prompt_tokens=prompt or 0, completion_tokens=completion or 0,
        cost_usd=cost_usd, avg_cost_usd=cost_usd / requests if requests else 0.0,
        max_cost_usd=_from_nano(largest), baseline_cost_usd=baseline_usd,
        savings_usd=_from_nano(savings_nusd),
        savings_pct=100.0 * savings_nusd / baseline if baseline else None,
    )


class Ledger:
    """Spend records in one SQLite file; build with `await Ledger.open(path)`, end with `close()`."""

    def __init__(self, db: aiosqlite.Connection, path: Path, *, retention_days: int,
                 max_batch: int, clock: Callable[[], float]) -> None:
        self._db = db
        self._path = path
        self._retention_s = retention_days * 86_400.0
        self._max_batch = max_batch
        self._clock = clock
        self._queue: asyncio.Queue[_Pending | object] = asyncio.Queue()
        self._lock = asyncio.Lock()     # one transaction or query at a time on the shared connection
        self._closed = False
        self._shutdown: asyncio.Task[None] | None = None
        self.commits = 0                # batches committed; tests and metrics read it
        self.rows_written = 0
        self._writer = asyncio.create_task(self._write_forever(), name=f"ledger-writer:{path.name}")

    @classmethod
    async def open(cls, path: str | Path, *, retention_days: int = 400, synchronous: str = "NORMAL",
                   max_batch: int = 512, clock: Callable[[], float] = time.time,
                   busy_timeout_s: float = 5.0, prune: bool = True) -> Ledger:
        path = Path(path)
        synchronous = synchronous.upper()
        if synchronous not in _SYNCHRONOUS_MODES:
            raise ValueError(f"ledger synchronous={synchronous!r}: use one of {sorted(_SYNCHRONOUS_MODES)}")
        if retention_days < 1 or max_batch < 1:
            raise ValueError(f"ledger needs retention_days >= 1 and max_batch >= 1 "
                             f"(got {retention_days}, {max_batch})")
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the writer issues BEGIN/COMMIT itself instead of
        # relying on the sqlite3 module's implicit transactions.
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await _prepare(db, path, synchronous, busy_timeout_s)
        except BaseException:
            await db.close()
            raise
        ledger = cls(db, path, retention_days=retention_days, max_batch=max_batch, clock=clock)
        if prune:  # the proxy prunes; tools that only read (report, explain, simulate) pass prune=False
            await ledger.prune()
        return ledger

    @property
    def path(self) -> Path:
        return self._path

    # --- writing -------------------------------------------------------------

    async def record(self, row: LedgerRow) -> None:
        """Return once `row` is committed; raise LedgerClosed after close()."""
        await self.record_nowait(row)

    def record_nowait(self, row: LedgerRow) -> asyncio.Future[None]:
        """Queue `row` and return the future its commit resolves. Cancelling that
        future does not withdraw the row: a client that went away still costs money."""
        _check_row(row)
        return self._enqueue(row)

    async def flush(self) -> None:
        """Wait until everything queued before this call is settled (committed, or failed)."""
        if self._closed:
            if self._shutdown is not None:
                await asyncio.shield(self._shutdown)
            return
        await self._enqueue(None)

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the connection. Idempotent."""
        if self._shutdown is None:
            self._closed = True
            self._queue.put_nowait(_STOP)
            self._shutdown = asyncio.create_task(self._finish())
        await asyncio.shield(self._shutdown)

    def _enqueue(self, row: LedgerRow | None) -> asyncio.Future[None]:
        if self._closed or self._writer.done():
            raise LedgerClosed(f"ledger {self._path} is closed; request "
                               f"{row.request_id if row else '(flush)'} was not recorded")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(row, future))
        return future

    async def _finish(self) -> None:
        await asyncio.wait([self._writer])   # wait, not await: a cancelled writer must not fail close()
        await self._db.close()

    async def _write_forever(self) -> None:
        batch: list[_Pending] = []
        try:
            stopping = False
            while not stopping:
                batch = [await self._queue.get()]
                # Linger one turn of the event loop: requests finishing in the same turn join this
                # batch. A commit costs about as much CPU as a hundred rows, so under load this
                # multiplies the rows per commit, for the price of one loop iteration of latency.
                await asyncio.sleep(0)
                while len(batch) < self._max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                if batch[-1] is _STOP:      # nothing is queued after _STOP, so it is always last
                    batch.pop()
                    stopping = True
                if batch:
                    await self._write_batch(batch)
                batch = []
        except asyncio.CancelledError:
            # Torn down without close(): callers must not wait forever.
            self._closed = True
            error = LedgerClosed(f"ledger {self._path} writer was cancelled")
            for item in batch + _drain(self._queue):
                _settle(item.future, error)
            # aiosqlite's thread is not a daemon: left running, it would keep the
            # process from exiting after the event loop is gone.
            stopped = self._db.stop()
            if stopped is not None:
                await stopped
            raise

    async def _write_batch(self, batch: list[_Pending]) -> None:
        """Commit the batch's rows as ONE multi-row INSERT: in autocommit mode a single statement
        is its own atomic transaction, so a whole batch costs one trip to aiosqlite's thread
        (BEGIN + executemany + COMMIT would cost four, and their wake-ups dominate at low load)."""
        rows = [item.row for item in batch if item.row is not None]
        error: BaseException | None = None
        written = 0
        try:
            async with self._lock:
                for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                    chunk = rows[start:start + _ROWS_PER_STATEMENT]
                    params = [value for row in chunk for value in _to_params(row)]
                    await self._db.execute_insert(_insert_many(len(chunk)), params)  # one hop, cursor closed
                    written += len(chunk)
                    self.commits += 1
                    self.rows_written += len(chunk)
        except Exception as exc:   # a bad disk must not kill the writer: fail what is unwritten, keep going
            log.error("ledger %s: could not record %d request(s): %s", self._path, len(rows) - written, exc)
            error = exc
        index = 0
        for item in batch:
            if item.row is not None:
                _settle(item.future, error if index >= written else None)
                index += 1
            else:
                _settle(item.future, None)

    # --- reading -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerClosed(f"ledger {self._path} is closed; open it again to query it")

    async def _fetchall(self, sql: str, params: Sequence = ()) -> list:
        self._check_open()
        async with self._lock:
            return list(await self._db.execute_fetchall(sql, params))

    async def spend_between(self, start: float, end: float | None = None, *,
                            key_name: str | None = None) -> float:
        """Committed cost in [start, end); all keys unless `key_name` is given."""
        if key_name is None:
            sql, params = "SELECT sum(cost_nusd) FROM requests WHERE ts >= ? AND ts < ?", (start, _end(end))
        else:
            sql = "SELECT sum(cost_nusd) FROM requests WHERE key_name = ? AND ts >= ? AND ts < ?"
            params = (key_name, start, _end(end))
        (total,), = await self._fetchall(sql, params)
        return _from_nano(total)

    async def spend_by_key_between(self, start: float, end: float | None = None) -> dict[str, float]:
        """Cost in [start, end) per key name; requests without a key are under ""."""
        found = await self._fetchall(
            "SELECT coalesce(key_name, ''), sum(cost_nusd) FROM requests "
            "WHERE ts >= ? AND ts < ? GROUP BY 1", (start, _end(end)))
        return {key: _from_nano(total) for key, total in found}

    async def summary(self, start: float, end: float,
                      by: Literal["model", "virtual", "key"]) -> list[SummaryRow]:
        """Per-group figures for [start, end), largest cost first; a missing group value is ""."""
        column = _GROUP_COLUMNS.get(by)
        if column is None:
            raise ValueError(f"ledger summary by={by!r}: use one of {sorted(_GROUP_COLUMNS)}")
        found = await self._fetchall(
            f"SELECT coalesce({column}, '') AS grp, count(*), sum(prompt_tokens), sum(completion_tokens), "
            "sum(cost_nusd), max(cost_nusd), sum(baseline_cost_nusd) FROM requests "
            "WHERE ts >= ? AND ts < ? GROUP BY grp ORDER BY sum(cost_nusd) DESC, grp", (start, end))
        return [_summary_row(*values) for values in found]

    async def totals(self, start: float, end: float) -> SummaryRow:
        (values,) = await self._fetchall(
            "SELECT count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost_nusd), "
            "max(cost_nusd), sum(baseline_cost_nusd) FROM requests WHERE ts >= ? AND ts < ?", (start, end))
        return _summary_row("total", *values)

    async def rows(self, start: float | None = None, end: float | None = None) -> list[LedgerRow]:
        """Committed rows in [start, end), oldest first."""
        found = await self._fetchall(_SELECT_ROWS, (-math.inf if start is None else start, _end(end)))
        return [_from_record(values) for values in found]

    # --- retention -----------------------------------------------------------

    async def prune(self, now: float | None = None) -> int:
        """Delete rows older than retention_days before `now` (default: the clock); return how many."""
        self._check_open()
        cutoff = (self._clock() if now is None else now) - self._retention_s
        deleted = 0
        while True:
            # Chunked, releasing the lock between chunks, so a first prune of a
            # large backlog does not hold up the requests being recorded meanwhile.
            async with self._lock:
                await _exec(self._db, "BEGIN IMMEDIATE")
                try:
                    async with self._db.execute(
                            "DELETE FROM requests WHERE id IN "
                            "(SELECT id FROM requests WHERE ts < ? LIMIT ?)", (cutoff, _PRUNE_CHUNK)) as cursor:
                        count = cursor.rowcount
                    await self._db.commit()
                except BaseException:
                    await _rollback_quietly(self._db)
                    raise
            deleted += count
            if count < _PRUNE_CHUNK:
                break
        if deleted:
            log.info("ledger %s: pruned %d request(s) older than %.0f days",
                     self._path, deleted, self._retention_s / 86_400)
        return deleted


async def _prepare(db: aiosqlite.Connection, path: Path, synchronous: str, busy_timeout_s: float) -> None:
    await _exec(db, f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    (mode,), = await db.execute_fetchall("PRAGMA journal_mode = WAL")
    if mode.lower() != "wal":
        log.warning("ledger %s: SQLite refused WAL (journal_mode=%s); commits will be slower", path, mode)
    await _exec(db, f"PRAGMA synchronous = {synchronous}")
    (version,), = await db.execute_fetchall("PRAGMA user_version")
    if version > SCHEMA_VERSION:
        raise LedgerSchemaError(
            f"ledger {path} has schema version {version}, but this proxy knows only up to "
            f"{SCHEMA_VERSION}; run a newer proxy or point ledger.path at another file")
    if version < SCHEMA_VERSION:
        # One transaction, so a crash mid-way never leaves tables without their version.
        steps = _SCHEMA if version == 0 else "\n".join(_MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
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
    except Exception as exc:   # the original error is the one worth reporting
        log.warning("ledger rollback failed: %s", exc)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():          # the caller gave up waiting; the row was still handled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _drain(queue: asyncio.Queue) -> list[_Pending]:
    items = []
    while not queue.empty():
        item = queue.get_nowait()
        if item is not _STOP:
            items.append(item)
    return items


def _end(end: float | None) -> float:
    return math.inf if end is None else end
