"""What only the PostgreSQL ledger has: the table built from the one column list, migrations
under an advisory lock (raced by real processes), the key that makes a repeated write count once,
batches sent again after a lost connection, and start-up errors that name the config key."""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from proxy.config import ConfigError, parse_config
from proxy.money.ledger_api import LedgerUnavailable, open_ledger, redacted
from proxy.money.ledger_pg import PgLedger
from proxy.money.ledger_pg_schema import PG_TYPES, TABLE, VERSION_TABLE
from proxy.money.ledger_rows import COLUMNS, SCHEMA_VERSION, LedgerSchemaError, to_nano
from tests.money.test_ledger import T0, row
from tests.support.postgres import scratch_schema

MIGRATE = Path(__file__).resolve().parent.parent / "support" / "pg_migrate.py"
BASE = """
upstreams: {openrouter: {base_url: "http://127.0.0.1:9/api/v1"}}
models: {cheap: {chain: [openai/gpt-4o-mini]}}
"""


async def columns_of(conn: asyncpg.Connection) -> dict[str, str]:
    found = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = $1",
        TABLE,
    )
    return {r["column_name"]: r["data_type"].upper() for r in found}


async def test_the_table_is_the_column_list(pg_dsn: str) -> None:
    ledger = await PgLedger.open(pg_dsn, clock=lambda: T0)
    await ledger.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        columns = await columns_of(conn)
        assert columns == {"id": "BIGINT", **{name: PG_TYPES[name][0] for name in COLUMNS}}
        assert await conn.fetchval(f"SELECT version FROM {VERSION_TABLE}") == SCHEMA_VERSION
        key = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'p'",
            TABLE,
        )
        assert key == "PRIMARY KEY (request_id, ts)"
    finally:
        await conn.close()


async def test_an_older_table_gets_the_columns_added_since(pg_dsn: str) -> None:
    ledger = await PgLedger.open(pg_dsn, clock=lambda: T0)
    await ledger.record(row("kept", api="chat"))
    await ledger.close()
    conn = await asyncpg.connect(pg_dsn)
    try:  # as an older proxy left it: without the newest columns, at an older version
        await conn.execute(f"ALTER TABLE {TABLE} DROP COLUMN api, DROP COLUMN reconcile_tries")
        await conn.execute(f"UPDATE {VERSION_TABLE} SET version = $1", SCHEMA_VERSION - 1)
        ledger = await PgLedger.open(pg_dsn, clock=lambda: T0)
        try:
            await ledger.record(row("new", api="messages", reconcile_tries=2))
            assert [(r.request_id, r.api, r.reconcile_tries) for r in await ledger.rows()] == [
                ("kept", "chat", 0),  # the defaults of the added columns
                ("new", "messages", 2),
            ]
        finally:
            await ledger.close()
        assert set(await columns_of(conn)) == {"id", *COLUMNS}
        assert await conn.fetchval(f"SELECT version FROM {VERSION_TABLE}") == SCHEMA_VERSION
    finally:
        await conn.close()


async def test_a_newer_schema_is_refused(pg_dsn: str) -> None:
    await (await PgLedger.open(pg_dsn)).close()  # the tables exist
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f"UPDATE {VERSION_TABLE} SET version = $1", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(LedgerSchemaError, match=f"schema version {SCHEMA_VERSION + 1}"):
        await PgLedger.open(pg_dsn)


async def test_the_same_row_written_twice_counts_once(pg_dsn: str) -> None:
    ledger = await PgLedger.open(pg_dsn, clock=lambda: T0)
    try:
        once = row("r1", cost=0.004)
        await asyncio.gather(ledger.record(once), ledger.record(once))  # one batch
        await ledger.record(once)  # another batch
        assert await ledger.rows() == [once]
        assert to_nano(await ledger.spend_between(T0)) == to_nano(0.004)
    finally:
        await ledger.close()


async def test_a_batch_is_sent_again_after_the_connection_is_lost(pg_dsn: str) -> None:
    name = f"orproxy_lost_{secrets.token_hex(4)}"  # so only this ledger's connections are cut
    ledger = await PgLedger.open(f"{pg_dsn}&application_name={name}", clock=lambda: T0)
    admin = await asyncpg.connect(pg_dsn)
    try:
        await ledger.record(row("before"))
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", name
        )
        assert killed >= 1  # the ledger's connections are gone under it
        await asyncio.gather(*(ledger.record(row(f"after{i}")) for i in range(20)))
        assert {r.request_id for r in await ledger.rows()} == {"before", *(f"after{i}" for i in range(20))}
    finally:
        await admin.close()
        await ledger.close()


@pytest.mark.slow  # three real interpreters start (about 4 s here), so it stays out of the quick subset
@pytest.mark.realtime  # they race on the wall clock
async def test_three_replicas_starting_at_once_migrate_once() -> None:
    async with scratch_schema() as (_, dsn):
        start_at = time.time() + 2.0
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(MIGRATE),
                dsn,
                str(start_at),
                f"replica-{i}",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for i in range(3)
        ]
        results = [await proc.communicate() for proc in procs]
        for proc, (_, err) in zip(procs, results):
            assert proc.returncode == 0, err.decode()[-2000:]
        # Under the lock one of them found an empty schema and built it; the others found it built.
        assert sorted(int(out) for out, _ in results) == [0, SCHEMA_VERSION, SCHEMA_VERSION]
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval(f"SELECT count(*) FROM {TABLE}") == 3
            assert await conn.fetchval(f"SELECT count(*) FROM {VERSION_TABLE}") == 1
        finally:
            await conn.close()


async def test_start_up_errors_name_the_key_to_fix(tmp_path: Path) -> None:
    unreachable = parse_config(BASE + "ledger: {backend: postgres, dsn: 'postgresql://postgres@127.0.0.1:1/x'}\n")
    with pytest.raises(LedgerUnavailable, match=r"cannot reach the ledger database .* \(ledger.dsn / ledger.dsn_env\)"):
        await open_ledger(unreachable, {})
    from_env = parse_config(BASE + "ledger: {backend: postgres, dsn_env: LEDGER_DSN}\n")
    with pytest.raises(LedgerUnavailable, match=r"ledger\.dsn_env names LEDGER_DSN, which is not set"):
        await open_ledger(from_env, {})


def test_passwords_stay_out_of_messages() -> None:
    assert redacted("postgresql://app:s3cret@db.internal:5433/ledger") == "postgresql://app:***@db.internal:5433/ledger"
    assert redacted("postgresql://postgres@127.0.0.1/test") == "postgresql://postgres@127.0.0.1/test"


@pytest.mark.parametrize(
    ("ledger", "expected"),
    [
        ("ledger: {backend: postgres}\n", "cfg.yaml:4: ledger: `backend: postgres` needs exactly one of"),
        (
            "ledger: {backend: postgres, dsn: 'postgresql://a@b/c', dsn_env: X}\n",
            "cfg.yaml:4: ledger: `backend: postgres` needs exactly one of",
        ),
        ("ledger: {dsn: 'postgresql://a@b/c'}\n", "cfg.yaml:4: ledger: `dsn` and `dsn_env` are for"),
        ("ledger: {backend: postgres, dsn: 'mysql://a@b/c'}\n", "cfg.yaml:4: ledger: `dsn` must be"),
        ("ledger: {backend: oracle}\n", "cfg.yaml:4: ledger.backend: Input should be 'sqlite' or 'postgres'"),
    ],
)
def test_ledger_config_errors_name_file_line_and_key(ledger: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + ledger, "cfg.yaml")
    assert any(line.startswith(expected) for line in str(caught.value).splitlines()), str(caught.value)


async def test_a_row_postgres_cannot_hold_as_sent_is_kept_and_costs_no_other_row(pg_dsn: str) -> None:
    """A client's model name with a NUL or an unpaired surrogate (valid JSON escapes) is stored with
    a replacement character; and a row the server refuses outright fails alone, not its batch."""
    ledger = await PgLedger.open(pg_dsn, clock=lambda: T0)
    try:
        odd = row("odd", virtual=None, requested_model="m\x00odel\ud800", cost=0.002)
        await asyncio.gather(ledger.record(odd), *(ledger.record(row(f"ok{i}")) for i in range(5)))
        stored = {r.request_id: r for r in await ledger.rows()}
        assert set(stored) == {"odd", *(f"ok{i}" for i in range(5))}
        assert stored["odd"].requested_model == "m\ufffdodel?" and stored["odd"].cost_usd == 0.002

        refused = row("refused", api="x" * 3000)  # past what the test's CHECK below allows
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT short_api CHECK (length(api) < 100)")
        finally:
            await conn.close()
        results = await asyncio.gather(
            ledger.record(refused), *(ledger.record(row(f"later{i}")) for i in range(5)), return_exceptions=True
        )
        assert isinstance(results[0], asyncpg.CheckViolationError)
        assert results[1:] == [None] * 5
        assert {f"later{i}" for i in range(5)} <= {r.request_id for r in await ledger.rows()}
    finally:
        await ledger.close()
