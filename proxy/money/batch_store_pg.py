"""The batch store on PostgreSQL (`ledger.backend: postgres`): files, batches and lines in the
ledger's database, beside `orproxy_requests`, shared by every replica.

The same states and guarantees as the SQLite store (`proxy.money.batch_store`), plus what several
replicas need: a line is claimed by one runner in one statement (`FOR UPDATE SKIP LOCKED`: two
replicas claiming together take different lines), under the runner's id and a lease on the
database's own clock (no replica's clock matters); a runner renews its leases while it lives, and
only lines whose lease has lapsed are adopted by another. The tables are made at open under an
advisory lock of their own (replicas starting together take turns), after the ledger's migration
(the three ledger reads need its table).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import asyncpg
import orjson

from proxy.core.batch import ACTIVE, TERMINAL, BatchRecord, FileRecord, InputLine, LineResult
from proxy.money.batch_store import LEASE_S, Adopted, adopted, dump_batch, file_row, load_batch, result_json
from proxy.money.ledger_api import LedgerUnavailable, redacted
from proxy.money.ledger_pg_schema import TABLE, migrate
from proxy.money.ledger_rows import from_nano

FILES, BATCHES, LINES = "orproxy_batch_files", "orproxy_batches", "orproxy_batch_lines"
SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {FILES} (
    id         TEXT PRIMARY KEY,
    purpose    TEXT   NOT NULL,
    filename   TEXT   NOT NULL,
    bytes      BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    key_name   TEXT,
    content    BYTEA  NOT NULL
)""",
    f"""CREATE TABLE IF NOT EXISTS {BATCHES} (
    id            TEXT PRIMARY KEY,
    status        TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    input_file_id TEXT   NOT NULL,
    record        BYTEA  NOT NULL,      -- the BatchRecord as JSON
    owner         TEXT,                 -- the replica that submits and polls its OpenRouter batches
    lease_until   DOUBLE PRECISION
)""",
    f"CREATE INDEX IF NOT EXISTS {BATCHES}_status ON {BATCHES} (status)",
    f"""CREATE TABLE IF NOT EXISTS {LINES} (
    batch_id       TEXT    NOT NULL,
    line           INTEGER NOT NULL,
    custom_id      TEXT    NOT NULL,
    body           BYTEA   NOT NULL,
    state          TEXT    NOT NULL,
    request_id     TEXT,
    upstream_batch TEXT,
    result         BYTEA,
    succeeded      SMALLINT,
    owner          TEXT,
    lease_until    DOUBLE PRECISION,  -- epoch seconds on the database's clock
    PRIMARY KEY (batch_id, line)
)""",
    f"CREATE INDEX IF NOT EXISTS {LINES}_state ON {LINES} (batch_id, state, line)",
    f"CREATE INDEX IF NOT EXISTS {LINES}_owner ON {LINES} (owner) WHERE state IN ('running', 'answered')",
    # The ledger reads a batch's cost and today's batch spend: only batch rows, indexed apart.
    f"CREATE INDEX IF NOT EXISTS {TABLE}_batch_cost ON {TABLE} (batch_id, cost_nusd) WHERE batch_id IS NOT NULL",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_batch_ts ON {TABLE} (ts, cost_nusd) WHERE batch_id IS NOT NULL",
)
# What SCHEMA makes. `CREATE INDEX IF NOT EXISTS` locks its table (SHARE) before it looks, which
# blocks, and may deadlock with, the writes of replicas already serving: looked up first, so a
# replica starting beside them takes no lock unless something is really missing.
SCHEMA_OBJECTS = (
    FILES,
    BATCHES,
    f"{BATCHES}_status",
    LINES,
    f"{LINES}_state",
    f"{LINES}_owner",
    f"{TABLE}_batch_cost",
    f"{TABLE}_batch_ts",
)
_MISSING = "SELECT count(*) FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL"
_NOW = "extract(epoch FROM clock_timestamp())"


async def _create(conn: asyncpg.Connection) -> None:
    """Make what is missing, one replica at a time: under the ledger's own advisory lock, so it
    never runs beside another replica's ledger migration either."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('orproxy.ledger'), hashtext(current_schema()))")
        for statement in SCHEMA:
            await conn.execute(statement)


_ACTIVE = list(ACTIVE)
_TERMINAL = list(TERMINAL)


def _changed(status: str) -> int:
    """The row count of a command tag ('UPDATE 3', 'DELETE 0')."""
    return int(status.rsplit(" ", 1)[-1])


class PgBatchStore:
    """The store on a small pool of its own to the ledger's database; `await PgBatchStore.open(dsn)`."""

    def __init__(self, pool: asyncpg.Pool, lease_s: float = LEASE_S) -> None:
        self._pool = pool
        self._lease = f"{_NOW} + {float(lease_s)!r}"

    @classmethod
    async def open(
        cls, dsn: str, *, pool_size: int = 4, connect_timeout_s: float = 10.0, lease_s: float = LEASE_S
    ) -> PgBatchStore:
        """Connect and make the tables; `lease_s`: how long a claim outlives its owner's last renewal."""
        where = redacted(dsn)
        try:
            settings = None if "application_name" in dsn else {"application_name": "orproxy-batches"}
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=pool_size, timeout=connect_timeout_s, server_settings=settings
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ValueError) as exc:
            raise LedgerUnavailable(
                f"cannot reach the ledger database {where} for batches (ledger.dsn / ledger.dsn_env): {exc}"
            ) from exc
        try:
            async with pool.acquire() as conn:
                await migrate(conn, where)  # the ledger's table first: the store reads it
                if await conn.fetchval(_MISSING, list(SCHEMA_OBJECTS)):
                    await _create(conn)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, lease_s)

    async def close(self) -> None:
        await self._pool.close()

    # --- files -------------------------------------------------------------------------
    async def add_file(self, record: FileRecord, content: bytes) -> None:
        """A file; one already stored under the id is kept (two replicas finalizing the same batch
        write the same output file)."""
        await self._pool.execute(
            f"INSERT INTO {FILES} (id, purpose, filename, bytes, created_at, key_name, content) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
            *file_row(record, content),
        )

    async def file(self, file_id: str) -> FileRecord | None:
        row = await self._pool.fetchrow(
            f"SELECT id, purpose, filename, bytes, created_at, key_name FROM {FILES} WHERE id = $1", file_id
        )
        return FileRecord(*row) if row else None

    async def file_content(self, file_id: str) -> bytes | None:
        content = await self._pool.fetchval(f"SELECT content FROM {FILES} WHERE id = $1", file_id)
        return bytes(content) if content is not None else None

    async def delete_file(self, file_id: str) -> bool:
        return _changed(await self._pool.execute(f"DELETE FROM {FILES} WHERE id = $1", file_id)) > 0

    # --- batches -----------------------------------------------------------------------
    async def create_batch(self, batch: BatchRecord, lines: Sequence[InputLine]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO {BATCHES} (id, status, created_at, input_file_id, record) VALUES ($1, $2, $3, $4, $5)",
                batch.id,
                batch.status,
                batch.created_at,
                batch.input_file_id,
                dump_batch(batch),
            )
            if lines:
                await conn.copy_records_to_table(
                    LINES,
                    records=[(batch.id, x.line, x.custom_id, orjson.dumps(x.body), "pending") for x in lines],
                    columns=["batch_id", "line", "custom_id", "body", "state"],
                )

    async def batch(self, batch_id: str) -> BatchRecord | None:
        record = await self._pool.fetchval(f"SELECT record FROM {BATCHES} WHERE id = $1", batch_id)
        return load_batch(record) if record is not None else None

    async def batches(self, limit: int, after: str | None = None) -> list[BatchRecord]:
        """Newest first; `after`: the last id of the previous page."""
        found = await self._pool.fetch(
            f"SELECT record FROM {BATCHES} WHERE $1::text IS NULL OR id < $1 ORDER BY id DESC LIMIT $2", after, limit
        )
        return [load_batch(row[0]) for row in found]

    async def active_batches(self) -> list[BatchRecord]:
        found = await self._pool.fetch(f"SELECT record FROM {BATCHES} WHERE status = ANY($1) ORDER BY id", _ACTIVE)
        return [load_batch(row[0]) for row in found]

    async def save_batch(self, batch: BatchRecord, expect: str | None = None) -> bool:
        """Write the batch; with `expect`, only if its stored status is still that one (a cancel
        through any replica is never overwritten by a stale copy)."""
        status = await self._pool.execute(
            f"UPDATE {BATCHES} SET status = $1, record = $2 WHERE id = $3 AND ($4::text IS NULL OR status = $4)",
            batch.status,
            dump_batch(batch),
            batch.id,
            expect,
        )
        return _changed(status) > 0

    # --- lines -------------------------------------------------------------------------
    async def lines(self, batch_id: str, state: str, limit: int) -> list[tuple[InputLine, str | None]]:
        found = await self._pool.fetch(
            f"SELECT line, custom_id, body, request_id FROM {LINES} WHERE batch_id = $1 AND state = $2 "
            "ORDER BY line LIMIT $3",
            batch_id,
            state,
            limit,
        )
        return [(InputLine(r[0], r[1], orjson.loads(r[2])), r[3]) for r in found]

    async def unfinished(self, batch_id: str, states: Sequence[str]) -> bool:
        """Whether any line is in one of `states`, read in one statement (see the SQLite store)."""
        found = await self._pool.fetchval(
            f"SELECT 1 FROM {LINES} WHERE batch_id = $1 AND state = ANY($2::text[]) LIMIT 1", batch_id, list(states)
        )
        return found is not None

    async def claim_lines(self, batch_id: str, limit: int, owner: str) -> list[InputLine]:
        """Up to `limit` pending lines, in file order, now `owner`'s and running under the request
        id `{batch_id}-{line}`. Lines another replica is claiming at the same moment are skipped."""
        # The CTE is evaluated once (a locking CTE is never inlined): `line IN (subquery LIMIT n)`
        # may be run again by the plan and claim more than `limit`.
        found = await self._pool.fetch(
            f"WITH picked AS (SELECT line FROM {LINES} WHERE batch_id = $1 AND state = 'pending' ORDER BY line "
            "LIMIT $2 FOR UPDATE SKIP LOCKED) "
            f"UPDATE {LINES} AS l SET state = 'running', request_id = l.batch_id || '-' || l.line, owner = $3, "
            f"lease_until = {self._lease} FROM picked WHERE l.batch_id = $1 AND l.line = picked.line "
            "AND l.state = 'pending' RETURNING l.line, l.custom_id, l.body",
            batch_id,
            limit,
            owner,
        )
        return sorted((InputLine(r[0], r[1], orjson.loads(r[2])) for r in found), key=lambda x: x.line)

    async def renew(self, owner: str) -> int:
        """Extend the lease of every line `owner` runs (and of the batches it holds); how many lines."""
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                f"UPDATE {LINES} SET lease_until = {self._lease} WHERE owner = $1 AND state IN ('running', 'answered')",
                owner,
            )
            await conn.execute(f"UPDATE {BATCHES} SET lease_until = {self._lease} WHERE owner = $1", owner)
        return _changed(status)

    async def retire(self, owner: str) -> None:
        """A runner that stopped cleanly ends its leases: what it left is adopted at once."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(f"UPDATE {LINES} SET lease_until = 0 WHERE owner = $1", owner)
            await conn.execute(f"UPDATE {BATCHES} SET lease_until = 0 WHERE owner = $1", owner)

    async def hold(self, batch_id: str, owner: str) -> bool:
        """Whether `owner` is the one replica that submits and polls this batch's OpenRouter batches:
        it held it already, or nobody did, or its holder let the lease lapse."""
        status = await self._pool.execute(
            f"UPDATE {BATCHES} SET owner = $2, lease_until = {self._lease} WHERE id = $1 "
            f"AND (owner IS NULL OR owner = $2 OR lease_until < {_NOW})",
            batch_id,
            owner,
        )
        return _changed(status) > 0

    async def adopt(self, batch_id: str, state: str, owner: str) -> list[Adopted]:
        """Lines in `state` whose owner let its lease lapse (it died, or lost the database), now
        `owner`'s; a line another replica adopts at the same moment is adopted once."""
        found = await self._pool.fetch(
            f"UPDATE {LINES} SET owner = $3, lease_until = {self._lease} WHERE batch_id = $1 AND state = $2 "
            f"AND (owner IS NULL OR (owner <> $3 AND lease_until < {_NOW})) "
            "RETURNING line, custom_id, body, request_id, result",
            batch_id,
            state,
            owner,
        )
        return adopted(tuple(row) for row in found)

    async def release_line(self, batch_id: str, line: int) -> None:
        await self._pool.execute(
            f"UPDATE {LINES} SET state = 'pending', request_id = NULL, owner = NULL WHERE batch_id = $1 AND line = $2",
            batch_id,
            line,
        )

    async def mark_submitted(
        self, batch_id: str, lines: Sequence[int], upstream_batch: str, state: str = "submitted"
    ) -> None:
        await self._pool.execute(
            f"UPDATE {LINES} SET state = $1, upstream_batch = $2 WHERE batch_id = $3 AND line = ANY($4)",
            state,
            upstream_batch,
            batch_id,
            list(lines),
        )

    async def submitted(self, batch_id: str, state: str = "submitted") -> dict[str, list[InputLine]]:
        found = await self._pool.fetch(
            f"SELECT upstream_batch, line, custom_id, body FROM {LINES} WHERE batch_id = $1 AND state = $2 "
            "ORDER BY line",
            batch_id,
            state,
        )
        groups: dict[str, list[InputLine]] = {}
        for upstream, line, custom_id, body in found:
            groups.setdefault(upstream, []).append(InputLine(line, custom_id, orjson.loads(body)))
        return groups

    async def known_upstream_batches(self) -> set[str]:
        found = await self._pool.fetch(
            f"SELECT DISTINCT upstream_batch FROM {LINES} WHERE state IN ('submitted', 'done') "
            "AND upstream_batch IS NOT NULL"
        )
        return {row[0] for row in found if row[0]}

    async def answer_line(self, batch_id: str, line: int, result: LineResult) -> None:
        """Keep a running line's answer before it is booked (one adopted meanwhile stays as it is)."""
        await self._pool.execute(
            f"UPDATE {LINES} SET state = 'answered', result = $1 WHERE batch_id = $2 AND line = $3 "
            "AND state = 'running'",
            orjson.dumps(result_json(result)),
            batch_id,
            line,
        )

    async def finish_lines(self, batch_id: str, done: Sequence[tuple[int, LineResult]]) -> None:
        """Keep the lines' results, in one transaction; a line already done is left as it is."""
        if not done:
            return
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                f"UPDATE {LINES} SET state = 'done', result = $1, succeeded = $2, "
                "request_id = coalesce($3, request_id) WHERE batch_id = $4 AND line = $5 AND state <> 'done'",
                [
                    (orjson.dumps(result_json(result)), int(result.succeeded), result.request_id, batch_id, line)
                    for line, result in done
                ],
            )

    async def results(self, batch_id: str) -> list[tuple[int, LineResult]]:
        found = await self._pool.fetch(
            f"SELECT line, result FROM {LINES} WHERE batch_id = $1 AND state = 'done' ORDER BY line", batch_id
        )
        return [(line, LineResult(**orjson.loads(result))) for line, result in found]

    async def line_counts(self, batch_id: str) -> tuple[int, int, int]:
        """(lines done, of which succeeded, lines not done)."""
        row = await self._pool.fetchrow(
            f"SELECT count(*) FILTER (WHERE state = 'done'), coalesce(sum(succeeded), 0), "
            f"count(*) FILTER (WHERE state <> 'done') FROM {LINES} WHERE batch_id = $1",
            batch_id,
        )
        return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)

    async def prune(self, before: float) -> int:
        """Forget batches that ended before `before` (their lines too), and files uploaded before it
        that no running batch reads; how many batches went."""
        async with self._pool.acquire() as conn, conn.transaction():
            old = f"SELECT id FROM {BATCHES} WHERE status = ANY($1) AND created_at < $2::float8"
            await conn.execute(f"DELETE FROM {LINES} WHERE batch_id IN ({old})", _TERMINAL, before)
            removed = _changed(await conn.execute(f"DELETE FROM {BATCHES} WHERE id IN ({old})", _TERMINAL, before))
            await conn.execute(
                f"DELETE FROM {FILES} WHERE created_at < $1::float8 AND id NOT IN "
                f"(SELECT input_file_id FROM {BATCHES} WHERE NOT (status = ANY($2)))",
                before,
                _TERMINAL,
            )
        return removed

    # --- what the ledger says ----------------------------------------------------------
    async def billed(self, request_ids: Iterable[str]) -> set[str]:
        ids = list(request_ids)
        if not ids:
            return set()
        found = await self._pool.fetch(f"SELECT request_id FROM {TABLE} WHERE request_id = ANY($1)", ids)
        return {row[0] for row in found}

    async def batch_cost(self, batch_id: str) -> float:
        total = await self._pool.fetchval(f"SELECT sum(cost_nusd)::bigint FROM {TABLE} WHERE batch_id = $1", batch_id)
        return from_nano(total)

    async def batch_spend_since(self, start: float) -> float:
        total = await self._pool.fetchval(
            f"SELECT sum(cost_nusd)::bigint FROM {TABLE} WHERE batch_id IS NOT NULL AND ts >= $1", start
        )
        return from_nano(total)
