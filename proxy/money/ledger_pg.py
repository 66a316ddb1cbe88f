"""The spend ledger on PostgreSQL (`ledger.backend: postgres`): one table for every worker and
replica, with the SQLite ledger's guarantees.

* A row is committed before `record()` returns (PostgreSQL's default `synchronous_commit = on`):
  a SIGKILL of the proxy afterwards loses nothing.
* Writes are grouped, and a batch lost with its connection is sent again without counting twice
  (`ledger_pg_writer`). Measured against the alternatives on this machine
  (bench/ledger_pg_drivers.py, 50 rows), one `executemany` of one prepared INSERT costs about the
  client CPU of a 50-row multi-row INSERT (which would need a prepared statement per batch size)
  and half that of one `INSERT ... SELECT FROM unnest($1::float8[], ...)`; COPY cannot say ON CONFLICT.
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
from typing import Any

import asyncpg

from proxy.money.ledger_api import GroupBy, LedgerUnavailable, redacted
from proxy.money.ledger_front import QueuedLedger
from proxy.money.ledger_pg_schema import TABLE, migrate
from proxy.money.ledger_pg_writer import CONNECTION_ERRORS, PgLedgerWriter
from proxy.money.ledger_rows import (
    COLUMNS,
    ESTIMATED_SOURCES,
    GROUP_COLUMNS,
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

log = logging.getLogger("orproxy.ledger")
_PRUNE_CHUNK = 10_000
_SUMS = (
    "count(*), sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint, sum(cost_nusd)::bigint, max(cost_nusd), "
    "sum(baseline_cost_nusd)::bigint, sum(cached)::bigint, sum(saved_nusd)::bigint"
)
_ROW_COLUMNS = ", ".join(COLUMNS)


class PgLedger(QueuedLedger):
    """Spend records in one PostgreSQL table; build with `await PgLedger.open(dsn)`, end with `close()`."""

    _writer: PgLedgerWriter

    def __init__(
        self, pool: asyncpg.Pool, where: str, *, retention_days: int, max_batch: int, clock: Callable[[], float]
    ) -> None:
        self._pool = pool
        self._where = where
        self._retention_s = retention_days * 86_400.0
        self._clock = clock
        self._shutdown: asyncio.Task[None] | None = None
        self._writer = PgLedgerWriter(pool, where, max_batch=max_batch)

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
        except (asyncpg.PostgresError, *CONNECTION_ERRORS, TimeoutError, ValueError) as exc:
            raise LedgerUnavailable(
                f"cannot reach the ledger database {where} (ledger.dsn / ledger.dsn_env): {exc}"
            ) from exc
        try:
            async with pool.acquire() as conn:
                await migrate(conn, where)
        except LedgerSchemaError:
            await pool.close()
            raise
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
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

    # --- writing (QueuedLedger: record, record_nowait, flush, close) ------------

    def _taking(self) -> bool:
        return self._writer.running()

    def _stopped(self) -> bool:
        return self._writer.closed

    def _stop_taking(self) -> None:
        self._writer.stop()

    async def _finish(self) -> None:
        await self._writer.stopped()
        await self._pool.close()

    # --- reading -------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        if self._writer.closed:
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
        if self._writer.closed:
            raise LedgerClosed(f"ledger {self._where} is closed; open it again to query it")
        status = await self._pool.execute(sql, *args)
        return _count(status) > 0

    # --- retention -----------------------------------------------------------

    async def prune(self, now: float | None = None, *, retention_days: int | None = None) -> int:
        """Delete rows older than retention_days (default: the one the ledger was opened with) before
        `now` (default: the clock), a chunk per transaction; return how many. Replicas may prune at once."""
        if self._writer.closed:
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


def _end(end: float | None) -> float:
    return math.inf if end is None else end
