"""The spend ledger on PostgreSQL (`ledger.backend: postgres`): one table for every worker and
replica, with the SQLite ledger's guarantees.

* A row is committed before `record()` returns (PostgreSQL's default `synchronous_commit = on`):
  a SIGKILL of the proxy afterwards loses nothing.
* Writes are grouped: one writer task takes everything queued (up to `max_batch`) and sends it as
  one `executemany` of one prepared INSERT: asyncpg pipelines it (one round trip) in one implicit
  transaction (all or nothing), so a burst costs one commit. Measured against the alternatives on
  this machine (bench/ledger_pg_drivers.py, 50 rows): about the client CPU of a 50-row multi-row
  INSERT (which would need a prepared statement per batch size) and half that of one
  `INSERT ... SELECT FROM unnest($1::float8[], ...)`; COPY cannot say ON CONFLICT.
* A batch that failed on the connection (a restarted server, a failover) is sent again, on a new
  connection: rows are keyed by (request_id, ts) with `ON CONFLICT DO NOTHING`, so a batch whose
  commit happened but whose answer was lost cannot count twice.
* Money is BIGINT nano-dollars, summed as BIGINT (never NUMERIC floats), as in SQLite.

The driver is asyncpg, chosen on bench/ledger_pg_drivers.py (figures in bench/README.md): for the
same commit round trip (0.4-0.6 ms either way), a grouped insert of 50 rows cost 0.3-0.7 ms of
client CPU with asyncpg against 7.7-9.6 ms with psycopg 3.3 (2.9 ms in its pipeline mode); the proxy
shares two cores with its database and load, so its CPU per request is what counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy.money.ledger_api import GroupBy, LedgerUnavailable, redacted
from proxy.money.ledger_pg_schema import TABLE, insert_statement, migrate
from proxy.money.ledger_rows import (
    COLUMNS,
    ESTIMATED_SOURCES,
    GROUP_COLUMNS,
    LedgerClosed,
    LedgerRow,
    LedgerSchemaError,
    Reconciled,
    SummaryRow,
    check_row,
    from_nano,
    from_record,
    summary_row,
    to_nano,
    to_params,
)

log = logging.getLogger("orproxy.ledger")
_PRUNE_CHUNK = 10_000
_RETRY_DELAYS_S = (0.05, 0.25, 1.0, 2.0)  # a lost connection: the batch is sent again after each
# InternalClientError: what asyncpg raises on a connection the server cut in the middle of a pipelined batch.
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,  # the server is starting up, or shutting down (a failover)
)
_SUMS = (
    "count(*), sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint, sum(cost_nusd)::bigint, max(cost_nusd), "
    "sum(baseline_cost_nusd)::bigint, sum(cached)::bigint, sum(saved_nusd)::bigint"
)
_ROW_COLUMNS = ", ".join(COLUMNS)


@dataclass(slots=True)
class _Pending:
    row: LedgerRow | None  # None: a flush barrier, resolved with the batch it lands in
    future: asyncio.Future[None]
    error: BaseException | None = None  # this row's own failure, when its batch was written row by row


def _storable(row: LedgerRow) -> tuple:
    """The row's values as PostgreSQL TEXT can hold them: it refuses NUL characters and unpaired
    surrogates, which a client can put in a model name (SQLite keeps them). Replaced, not refused:
    the request cost money all the same."""
    values = to_params(row)
    if any(isinstance(v, str) and (not v.isascii() or "\x00" in v) for v in values):
        return tuple(_clean(v) if isinstance(v, str) else v for v in values)
    return values  # nearly always: ASCII without NUL, nothing to copy


def _clean(text: str) -> str:
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


class PgLedger:
    """Spend records in one PostgreSQL table; build with `await PgLedger.open(dsn)`, end with `close()`."""

    def __init__(
        self, pool: asyncpg.Pool, where: str, *, retention_days: int, max_batch: int, clock: Callable[[], float]
    ) -> None:
        self._pool = pool
        self._where = where
        self._retention_s = retention_days * 86_400.0
        self._max_batch = max_batch
        self._clock = clock
        self._insert = insert_statement()
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()  # None: stop
        self._closed = False
        self._shutdown: asyncio.Task[None] | None = None
        self.commits = 0
        self.rows_written = 0
        self._writer = asyncio.create_task(self._write_forever(), name="ledger-writer:postgres")

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        retention_days: int = 400,
        max_batch: int = 512,
        clock: Callable[[], float] = time.time,
        prune: bool = True,
        pool_size: int = 4,
        connect_timeout_s: float = 10.0,
    ) -> PgLedger:
        """Connect, apply the schema (one replica at a time, under an advisory lock), prune."""
        if retention_days < 1 or max_batch < 1:
            raise ValueError(f"ledger needs retention_days >= 1 and max_batch >= 1 (got {retention_days}, {max_batch})")
        where = redacted(dsn)
        try:
            # Named, so an operator sees the proxy's connections in pg_stat_activity (unless the DSN names them).
            settings = None if "application_name" in dsn else {"application_name": "orproxy"}
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=pool_size, timeout=connect_timeout_s, server_settings=settings
            )
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS, TimeoutError, ValueError) as exc:
            raise LedgerUnavailable(
                f"cannot reach the ledger database {where} (ledger.dsn / ledger.dsn_env): {exc}"
            ) from exc
        try:
            async with pool.acquire() as conn:
                await migrate(conn, where)
        except LedgerSchemaError:
            await pool.close()
            raise
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            await pool.close()
            raise LedgerUnavailable(f"cannot set up the ledger table in {where}: {exc}") from exc
        except BaseException:
            await pool.close()
            raise
        ledger = cls(pool, where, retention_days=retention_days, max_batch=max_batch, clock=clock)
        if prune:
            try:
                await ledger.prune()
            except BaseException:
                await ledger.close()
                raise
        return ledger

    @property
    def where(self) -> str:
        return self._where

    # --- writing -------------------------------------------------------------

    async def record(self, row: LedgerRow) -> None:
        """Return once `row` is committed; raise LedgerClosed after close()."""
        await self.record_nowait(row)

    def record_nowait(self, row: LedgerRow) -> asyncio.Future[None]:
        """Queue `row` and return the future its commit resolves. Cancelling that future does not
        withdraw the row: a client that went away still costs money."""
        check_row(row)
        return self._enqueue(row)

    async def flush(self) -> None:
        """Wait until everything queued before this call is settled (committed, or failed)."""
        if self._closed:
            if self._shutdown is not None:
                await asyncio.shield(self._shutdown)
            return
        await self._enqueue(None)

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the pool. Idempotent."""
        if self._shutdown is None:
            self._closed = True
            self._queue.put_nowait(None)
            self._shutdown = asyncio.create_task(self._finish())
        await asyncio.shield(self._shutdown)

    def _enqueue(self, row: LedgerRow | None) -> asyncio.Future[None]:
        if self._closed or self._writer.done():
            raise LedgerClosed(
                f"ledger {self._where} is closed; request {row.request_id if row else '(flush)'} was not recorded"
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(row, future))
        return future

    async def _finish(self) -> None:
        await asyncio.wait([self._writer])  # wait, not await: a cancelled writer must not fail close()
        await self._pool.close()

    async def _write_forever(self) -> None:
        batch: list[_Pending] = []
        try:
            stopping = False
            while not stopping:
                first = await self._queue.get()
                stopping = first is None
                batch = [] if first is None else [first]
                await asyncio.sleep(0)  # one loop turn: requests finishing together share the commit
                while not stopping and len(batch) < self._max_batch and not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is None:
                        stopping = True
                    else:
                        batch.append(item)
                if batch:
                    await self._write_batch(batch)
                batch = []
        except asyncio.CancelledError:
            self._closed = True
            error = LedgerClosed(f"ledger {self._where} writer was cancelled")
            for item in batch + _drain(self._queue):
                _settle(item.future, error)
            raise

    async def _write_batch(self, batch: list[_Pending]) -> None:
        rows = [item.row for item in batch if item.row is not None]
        error: BaseException | None = None
        if rows:
            params = [_storable(row) for row in rows]
            error = await self._insert_all(params)
            if error is not None and not isinstance(error, _CONNECTION_ERRORS) and len(rows) > 1:
                # Refused by the server: one row must not cost the others theirs, so each goes alone.
                errors = [await self._insert_all([one]) for one in params]
                for item, failure in zip((item for item in batch if item.row is not None), errors):
                    item.error = failure
                error = None
            if error is not None:
                log.error("ledger %s: could not record %d request(s): %s", self._where, len(rows), error)
        for item in batch:
            failure = item.error if item.error is not None else error
            _settle(item.future, failure if item.row is not None else None)

    async def _insert_all(self, params: list[tuple]) -> BaseException | None:
        """Insert in one transaction; sent again on a new connection when the connection fails (the
        key makes a repeat harmless). Returns the error that stopped it, or None once committed."""
        for delay in (*_RETRY_DELAYS_S, None):
            try:
                await self._pool.executemany(self._insert, params)
            except _CONNECTION_ERRORS as exc:
                if delay is None:
                    return exc
                log.warning("ledger %s: %s; sending %d row(s) again in %.2fs", self._where, exc, len(params), delay)
                await asyncio.sleep(delay)
            except Exception as exc:  # refused by the server
                if len(params) == 1:
                    log.error("ledger %s: could not record request %s: %s", self._where, params[0][1], exc)
                return exc
            else:
                self.commits += 1
                self.rows_written += len(params)
                return None
        raise AssertionError("unreachable")

    # --- reading -------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        if self._closed:
            raise LedgerClosed(f"ledger {self._where} is closed; open it again to query it")
        return list(await self._pool.fetch(sql, *args))

    async def spend_between(self, start: float, end: float | None = None, *, key_name: str | None = None) -> float:
        """Committed cost in [start, end); all keys unless `key_name` is given."""
        if key_name is None:
            found = await self._fetch(
                f"SELECT sum(cost_nusd)::bigint FROM {TABLE} WHERE ts >= $1 AND ts < $2", start, _end(end)
            )
        else:
            found = await self._fetch(
                f"SELECT sum(cost_nusd)::bigint FROM {TABLE} WHERE key_name = $1 AND ts >= $2 AND ts < $3",
                key_name,
                start,
                _end(end),
            )
        return from_nano(found[0][0])

    async def spend_by_key_between(self, start: float, end: float | None = None) -> dict[str, float]:
        """Cost in [start, end) per key name; requests without a key are under ""."""
        found = await self._fetch(
            f"SELECT coalesce(key_name, ''), sum(cost_nusd)::bigint FROM {TABLE} WHERE ts >= $1 AND ts < $2 GROUP BY 1",
            start,
            _end(end),
        )
        return {key: from_nano(total) for key, total in found}

    async def summary(self, start: float, end: float, by: GroupBy) -> list[SummaryRow]:
        """Per-group figures for [start, end), largest cost first; a missing group value is ""."""
        column = GROUP_COLUMNS.get(by)
        if column is None:
            raise ValueError(f"ledger summary by={by!r}: use one of {sorted(GROUP_COLUMNS)}")
        # COLLATE "C": ties ordered by bytes, as SQLite orders them, whatever the database's locale.
        found = await self._fetch(
            f"SELECT coalesce({column}, '') COLLATE \"C\" AS grp, {_SUMS} FROM {TABLE} "
            "WHERE ts >= $1 AND ts < $2 GROUP BY grp ORDER BY sum(cost_nusd) DESC, grp",
            start,
            end,
        )
        return [summary_row(*values) for values in found]

    async def totals(self, start: float, end: float) -> SummaryRow:
        (values,) = await self._fetch(f"SELECT {_SUMS} FROM {TABLE} WHERE ts >= $1 AND ts < $2", start, end)
        return summary_row("total", *values)

    async def rows(self, start: float | None = None, end: float | None = None) -> list[LedgerRow]:
        """Committed rows in [start, end), oldest first."""
        found = await self._fetch(
            f"SELECT {_ROW_COLUMNS} FROM {TABLE} WHERE ts >= $1 AND ts < $2 ORDER BY ts, id",
            -math.inf if start is None else start,
            _end(end),
        )
        return [from_record(tuple(values)) for values in found]

    # --- reconciliation ------------------------------------------------------

    async def unreconciled(self, since: float, upstreams: Sequence[str], max_tries: int) -> list[LedgerRow]:
        """Rows since `since` whose cost is still an estimate on one of `upstreams`, with a generation
        id to look up and fewer than `max_tries` lookups made."""
        if not upstreams:
            return []
        found = await self._fetch(
            f"SELECT {_ROW_COLUMNS} FROM {TABLE} WHERE cost_source = ANY($1::text[]) "
            "AND generation_id IS NOT NULL AND ts >= $2 AND upstream = ANY($3::text[]) AND reconcile_tries < $4 "
            "ORDER BY ts, id",
            list(ESTIMATED_SOURCES),
            since,
            list(upstreams),
            max_tries,
        )
        return [from_record(tuple(values)) for values in found]

    async def reconcile(self, request_id: str, generation_id: str, correction: Reconciled) -> bool:
        """Replace an estimated cost with the upstream's own figure; the estimate is kept in
        `estimate_nusd`. False when the row is not (or no longer) an estimate: nothing changes."""
        return await self._update(
            f"UPDATE {TABLE} SET estimate_nusd = cost_nusd, cost_nusd = $1, cost_source = 'reconciled', "
            "prompt_tokens = $2, completion_tokens = $3, cached_tokens = $4, baseline_cost_nusd = $5, "
            "reconcile_tries = reconcile_tries + 1 "
            "WHERE request_id = $6 AND generation_id = $7 AND cost_source = ANY($8::text[])",
            to_nano(correction.cost_usd),
            correction.prompt_tokens,
            correction.completion_tokens,
            correction.cached_tokens,
            to_nano(correction.baseline_cost_usd),
            request_id,
            generation_id,
            list(ESTIMATED_SOURCES),
        )

    async def note_reconcile_try(self, request_id: str, generation_id: str) -> bool:
        """Count a lookup that found nothing yet, so a restart does not retry forever."""
        return await self._update(
            f"UPDATE {TABLE} SET reconcile_tries = reconcile_tries + 1 WHERE request_id = $1 AND generation_id = $2",
            request_id,
            generation_id,
        )

    async def _update(self, sql: str, *args: Any) -> bool:
        if self._closed:
            raise LedgerClosed(f"ledger {self._where} is closed; open it again to query it")
        status = await self._pool.execute(sql, *args)
        return _count(status) > 0

    # --- retention -----------------------------------------------------------

    async def prune(self, now: float | None = None, *, retention_days: int | None = None) -> int:
        """Delete rows older than retention_days (default: the one the ledger was opened with) before
        `now` (default: the clock), a chunk per transaction; return how many. Replicas may prune at once."""
        if self._closed:
            raise LedgerClosed(f"ledger {self._where} is closed; open it again to prune it")
        retention_s = self._retention_s if retention_days is None else retention_days * 86_400.0
        cutoff = (self._clock() if now is None else now) - retention_s
        deleted = 0
        while True:
            status = await self._pool.execute(
                f"DELETE FROM {TABLE} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {TABLE} WHERE ts < $1 LIMIT $2))",
                cutoff,
                _PRUNE_CHUNK,
            )
            count = _count(status)
            deleted += count
            if count < _PRUNE_CHUNK:
                break
        if deleted:
            log.info("ledger %s: pruned %d request(s) older than %.0f days", self._where, deleted, retention_s / 86_400)
        return deleted


def _count(status: str) -> int:
    """The row count of a command tag such as `UPDATE 3` or `DELETE 0`."""
    return int(status.rsplit(" ", 1)[-1])


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _drain(queue: asyncio.Queue[_Pending | None]) -> list[_Pending]:
    items = []
    while not queue.empty():
        item = queue.get_nowait()
        if item is not None:
            items.append(item)
    return items


def _end(end: float | None) -> float:
    return math.inf if end is None else end
