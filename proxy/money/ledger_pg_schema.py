"""The PostgreSQL ledger's table, built from the one column list (`ledger_rows.COLUMNS`), and its
start-up migration under an advisory lock.

A column added to `COLUMNS` needs one line here (its PostgreSQL type in `PG_TYPES`); the table,
the grouped INSERT and the migration of an existing table (`ADD COLUMN IF NOT EXISTS`) follow from it.

Rows are keyed by (request_id, ts), `ON CONFLICT DO NOTHING`: the same row written twice (the
writer retrying a batch whose commit it did not hear back about) counts once. The key includes
`ts` because a client may send its own X-Request-ID and reuse it: two requests that each cost
money must stay two rows, and they started at different times.

Indexes, not partitions: the proxy's own request ids are time-ordered, so the key's index and
the two (ts, ...) / (key_name, ts, ...) covering indexes grow at their right edge and inserts stay
flat as the table grows (bench/ledger_pg_growth.py measures it; see bench/README.md).
"""

from __future__ import annotations

import asyncpg

from proxy.money.ledger_rows import COLUMNS, ESTIMATED_SOURCES, SCHEMA_VERSION, LedgerSchemaError

TABLE = "orproxy_requests"
VERSION_TABLE = "orproxy_ledger_version"

# column -> (PostgreSQL type, constraints). Money is BIGINT nano-dollars; flags are 0/1 SMALLINTs as in SQLite.
PG_TYPES: dict[str, tuple[str, str]] = {
    "ts": ("DOUBLE PRECISION", "NOT NULL"),  # epoch seconds
    "request_id": ("TEXT", "NOT NULL"),
    "key_name": ("TEXT", ""),
    "requested_model": ("TEXT", "NOT NULL"),
    "virtual_model": ("TEXT", ""),
    "model": ("TEXT", ""),
    "upstream": ("TEXT", ""),
    "provider": ("TEXT", ""),
    "prompt_tokens": ("BIGINT", "NOT NULL"),
    "completion_tokens": ("BIGINT", "NOT NULL"),
    "cost_nusd": ("BIGINT", "NOT NULL"),
    "cost_source": ("TEXT", "NOT NULL"),
    "baseline_cost_nusd": ("BIGINT", "NOT NULL"),
    "latency_s": ("DOUBLE PRECISION", "NOT NULL"),
    "ttft_s": ("DOUBLE PRECISION", ""),
    "status": ("INTEGER", "NOT NULL"),
    "attempts": ("INTEGER", "NOT NULL"),
    "streamed": ("SMALLINT", "NOT NULL"),
    "generation_id": ("TEXT", ""),
    "cached": ("SMALLINT", "NOT NULL"),
    "error": ("TEXT", ""),
    "saved_nusd": ("BIGINT", "NOT NULL DEFAULT 0"),
    "cached_tokens": ("BIGINT", "NOT NULL DEFAULT 0"),
    "cache_write_tokens": ("BIGINT", "NOT NULL DEFAULT 0"),
    "estimate_nusd": ("BIGINT", ""),
    "flags": ("TEXT", ""),
    "reconcile_tries": ("INTEGER", "NOT NULL DEFAULT 0"),
    "api": ("TEXT", "NOT NULL DEFAULT 'chat'"),
    "batch_id": ("TEXT", ""),  # a batch line's batch (POST /v1/batches), else NULL
    "custom_id": ("TEXT", ""),  # and its custom_id
}


def _types() -> list[tuple[str, str, str]]:
    missing = [column for column in COLUMNS if column not in PG_TYPES]
    if missing:
        raise LedgerSchemaError(f"ledger columns {missing} have no PostgreSQL type: add them to PG_TYPES in {__name__}")
    return [(column, *PG_TYPES[column]) for column in COLUMNS]


_ESTIMATED = ", ".join(f"'{source}'" for source in ESTIMATED_SOURCES)


def create_statements() -> list[str]:
    columns = ",\n    ".join(f"{name} {kind} {constraint}".rstrip() for name, kind, constraint in _types())
    return [
        f"CREATE TABLE IF NOT EXISTS {TABLE} (\n    id BIGINT GENERATED ALWAYS AS IDENTITY,\n    {columns},\n"
        "    PRIMARY KEY (request_id, ts)\n)",
        # A table made by an older proxy gets the columns added since (nullable, or with a default).
        *(
            f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS {name} {kind} {constraint}".rstrip()
            for name, kind, constraint in _types()
        ),
        # A covering index: period spend (per key too) and reports read no table page for them.
        f"CREATE INDEX IF NOT EXISTS {TABLE}_ts_key_cost ON {TABLE} (ts, key_name, cost_nusd)",
        # Its (key_name, ts) twin served no query and cost an index write per row (version 6).
        f"DROP INDEX IF EXISTS {TABLE}_key_ts_cost",
        # The handful of rows reconciliation still has to look up.
        f"CREATE INDEX IF NOT EXISTS {TABLE}_unreconciled ON {TABLE} (ts) "
        f"WHERE cost_source IN ({_ESTIMATED}) AND generation_id IS NOT NULL",
    ]


def insert_statement() -> str:
    """One row's INSERT: the writer sends a batch of them with `executemany`, which asyncpg pipelines
    (one round trip) inside one implicit transaction (all or nothing, one commit)."""
    marks = ", ".join(f"${index}" for index in range(1, len(_types()) + 1))
    return f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({marks}) ON CONFLICT (request_id, ts) DO NOTHING"


async def migrate(conn: asyncpg.Connection, where: str) -> int:
    """Bring the schema to SCHEMA_VERSION in one transaction, under a transaction-scoped advisory
    lock on (ledger, schema): replicas starting together take turns, and the first one does the
    work. Returns the version found. A database written by a newer proxy is refused."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('orproxy.ledger'), hashtext(current_schema()))")
        # Looked up first: a role allowed to write rows but not to create tables starts on a set-up schema.
        if await conn.fetchval("SELECT to_regclass($1)", VERSION_TABLE) is None:
            await conn.execute(
                f"CREATE TABLE {VERSION_TABLE} (one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), "
                "version INTEGER NOT NULL)"
            )
        found = await conn.fetchval(f"SELECT version FROM {VERSION_TABLE}")
        version = int(found) if isinstance(found, int) else 0
        if version > SCHEMA_VERSION:
            raise LedgerSchemaError(
                f"ledger {where} has schema version {version}, but this proxy knows only up to "
                f"{SCHEMA_VERSION}; run a newer proxy or point ledger.dsn at another database"
            )
        if version < SCHEMA_VERSION:
            for statement in create_statements():
                await conn.execute(statement)
            await conn.execute(
                f"INSERT INTO {VERSION_TABLE} (one, version) VALUES (TRUE, $1) "
                "ON CONFLICT (one) DO UPDATE SET version = EXCLUDED.version",
                SCHEMA_VERSION,
            )
        return version
