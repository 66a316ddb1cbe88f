"""asyncpg against psycopg 3 (async), for the PostgreSQL ledger: a grouped insert of 50 ledger-shaped
rows (28 columns, autocommit: one statement, one commit) and a one-row commit round trip, wall time
and client CPU per operation. This is what chose the driver (see proxy/money/ledger_pg.py).

usage: pip install asyncpg 'psycopg[binary]'; python bench/ledger_pg_drivers.py [ITERATIONS] [DSN]

It creates and drops a table `orproxy_driver_bench` in the database of DSN.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import asyncpg
import psycopg

COLUMNS = 28
ROWS = 50
TABLE = "orproxy_driver_bench"
KINDS = ("BIGINT", "TEXT", "DOUBLE PRECISION")
DDL = (
    f"CREATE TABLE {TABLE} (request_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, "
    + ", ".join(f"c{i} {KINDS[i % 3]}" for i in range(COLUMNS - 2))
    + ")"
)


def row() -> tuple:
    values = [(i * 1000, f"v{i}", 0.25)[i % 3] for i in range(COLUMNS - 2)]
    return (secrets.token_hex(16), time.time(), *values)


def insert(count: int, dollar: bool) -> str:
    groups = []
    for r in range(count):
        marks = [f"${r * COLUMNS + c + 1}" if dollar else "%s" for c in range(COLUMNS)]
        groups.append(f"({', '.join(marks)})")
    return f"INSERT INTO {TABLE} VALUES {', '.join(groups)} ON CONFLICT DO NOTHING"


def unnest() -> str:
    casts = ["text", "float8"] + [("bigint", "text", "float8")[i % 3] for i in range(COLUMNS - 2)]
    arrays = ", ".join(f"${i + 1}::{kind}[]" for i, kind in enumerate(casts))
    return f"INSERT INTO {TABLE} SELECT * FROM unnest({arrays}) ON CONFLICT DO NOTHING"


async def timed(times: list[float], cpu: list[float], call: Callable[[], Awaitable[object]]) -> None:
    wall, used = time.perf_counter(), time.process_time()
    await call()
    times.append(time.perf_counter() - wall)
    cpu.append(time.process_time() - used)


async def each(label: str, make: Callable[[], Awaitable[object]], n: int) -> str:
    """`make()` n times: a line of its median and p90 wall time and mean client CPU."""
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(n):
        await timed(times, cpu, make)
    times.sort()
    p90 = times[int(len(times) * 0.9)]
    return (
        f"  {label:34} median {statistics.median(times) * 1e3:6.2f} ms  p90 {p90 * 1e3:6.2f} ms  "
        f"client CPU {statistics.mean(cpu) * 1e6:6.0f} us"
    )


async def with_asyncpg(dsn: str, n: int) -> list[str]:
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(DDL)
    many, one, cols = insert(ROWS, True), insert(1, True), unnest()
    cases = (
        (f"multi-row INSERT of {ROWS}", lambda: conn.execute(many, *[v for _ in range(ROWS) for v in row()])),
        (f"unnest() INSERT of {ROWS}", lambda: conn.execute(cols, *map(list, zip(*(row() for _ in range(ROWS)))))),
        (f"executemany of {ROWS} (the ledger's)", lambda: conn.executemany(one, [row() for _ in range(ROWS)])),
        ("one-row commit", lambda: conn.execute(one, *row())),
        (f"COPY of {ROWS}", lambda: conn.copy_records_to_table(TABLE, records=[row() for _ in range(ROWS)])),
    )
    out = [await each(label, make, n) for label, make in cases]
    await conn.execute(f"DROP TABLE {TABLE}")
    await conn.close()
    return out


async def with_psycopg(dsn: str, n: int) -> list[str]:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(DDL)
    many, one = insert(ROWS, False), insert(1, False)

    async def pipelined() -> None:
        async with conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(one, [row() for _ in range(ROWS)])

    async def copy() -> None:
        async with conn.cursor() as cursor, cursor.copy(f"COPY {TABLE} FROM STDIN") as sink:
            for values in [row() for _ in range(ROWS)]:
                await sink.write_row(values)

    cases = (
        (
            f"multi-row INSERT of {ROWS}",
            lambda: conn.execute(many, [v for _ in range(ROWS) for v in row()], prepare=True),
        ),
        (f"executemany (pipeline) of {ROWS}", pipelined),
        ("one-row commit", lambda: conn.execute(one, row(), prepare=True)),
        (f"COPY of {ROWS}", copy),
    )
    out = [await each(label, make, n) for label, make in cases]
    await conn.execute(f"DROP TABLE {TABLE}")
    await conn.close()
    return out


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    dsn = sys.argv[2] if len(sys.argv) > 2 else "postgresql://postgres@127.0.0.1:5432/test"
    for round_ in (1, 2):  # twice, alternating, so neither always runs on a warmer server
        print(f"round {round_}\nasyncpg {asyncpg.__version__}")
        print("\n".join(await with_asyncpg(dsn, n)))
        print(f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__})")
        print("\n".join(await with_psycopg(dsn, n)))


if __name__ == "__main__":
    asyncio.run(main())
