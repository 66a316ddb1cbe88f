"""Does inserting into the PostgreSQL ledger stay flat as the table grows? Measures grouped inserts
through `PgLedger` (the proxy's own writer: concurrent `record()` calls, committed in batches) on an
empty table and on one filled to --rows rows with server-side generated rows of the same shape
(time-ordered request ids, a month of timestamps, a few dozen keys), alternating between the two
so both see the same machine.

usage: python bench/ledger_pg_growth.py [--dsn postgresql://postgres@127.0.0.1:5432/test] [--rows 3000000]

It works in two schemas of its own (orproxy_bench_*_<hex>), dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg

from proxy.money.ledger_pg import PgLedger
from proxy.money.ledger_pg_schema import TABLE
from proxy.money.ledger_rows import LedgerRow

CONCURRENCY = 50  # requests settling at once: about one batch of 50 rows per commit


def make_row(now: float, n: int) -> LedgerRow:
    return LedgerRow(
        ts=now,
        request_id=f"{time.time_ns() // 1_000_000:012x}{secrets.randbits(80):020x}",
        key_name=f"key{n % 40}",
        requested_model="cheap",
        virtual_model="cheap",
        model="mistralai/mistral-7b-instruct",
        upstream="openrouter",
        provider="Mistral",
        prompt_tokens=120 + n % 50,
        completion_tokens=40 + n % 30,
        cost_usd=0.0000123,
        cost_source="upstream",
        baseline_cost_usd=0.000051,
        latency_s=0.3,
        ttft_s=None,
        status=200,
        attempts=1,
        streamed=n % 2 == 0,
        generation_id=f"gen-{n}",
    )


async def measure(ledger: PgLedger, total: int) -> dict[str, float]:
    """Rows/s with CONCURRENCY writers awaiting record(), and the latency of each record()."""
    latencies: list[float] = []
    counter = iter(range(total))
    commits_before = ledger.commits

    async def writer() -> None:
        for n in counter:
            started = time.perf_counter()
            await ledger.record(make_row(time.time(), n))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rows_per_s": total / elapsed,
        "record_median_ms": statistics.median(latencies) * 1e3,
        "record_p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "rows_per_commit": total / (ledger.commits - commits_before),
    }


FILL = f"""
INSERT INTO {TABLE} (ts, request_id, key_name, requested_model, virtual_model, model, upstream, provider,
    prompt_tokens, completion_tokens, cost_nusd, cost_source, baseline_cost_nusd, latency_s, ttft_s, status,
    attempts, streamed, generation_id, cached)
SELECT $1 + g * $2, lpad(to_hex(($1 * 1000)::bigint + g), 12, '0') || md5(g::text), 'key' || (g % 40),
    'cheap', 'cheap', 'mistralai/mistral-7b-instruct', 'openrouter', 'Mistral', 120 + g % 50, 40 + g % 30,
    12300, 'upstream', 51000, 0.3, NULL, 200, 1, g % 2, 'gen-fill-' || g, 0
FROM generate_series($3::bigint, $4::bigint) AS g
"""


async def fill(dsn: str, rows: int) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        start = time.time() - 30 * 86_400
        step = 30 * 86_400 / rows  # a month of traffic, oldest first
        chunk = 250_000
        began = time.perf_counter()
        for first in range(0, rows, chunk):
            await conn.execute(FILL, start, step, first, min(first + chunk, rows) - 1)
        await conn.execute(f"VACUUM ANALYZE {TABLE}")
        await conn.execute("CHECKPOINT")  # the fill's writes are on disk before anything is timed
        count = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
        size = await conn.fetchval(f"SELECT pg_size_pretty(pg_total_relation_size('{TABLE}'))")
        return f"{count:,} rows ({size} with indexes), filled in {time.perf_counter() - began:.0f} s"
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--sample", type=int, default=20_000, help="rows recorded per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tag = secrets.token_hex(4)
    schemas = {"empty": f"orproxy_bench_empty_{tag}", "full": f"orproxy_bench_full_{tag}"}
    admin = await asyncpg.connect(args.dsn)
    join = "&" if "?" in args.dsn else "?"
    ledgers: dict[str, PgLedger] = {}
    try:
        for name, schema in schemas.items():
            await admin.execute(f"CREATE SCHEMA {schema}")
            ledgers[name] = await PgLedger.open(f"{args.dsn}{join}search_path={schema}", prune=False)
        filled = await fill(f"{args.dsn}{join}search_path={schemas['full']}", args.rows)
        print(f"full: {filled}", flush=True)
        # Interleaved, so both tables see the same machine (other load, checkpoints) over the run.
        results: dict[str, list[dict[str, float]]] = {"empty": [], "full": []}
        for round_ in range(args.rounds):
            for name in ("empty", "full") if round_ % 2 == 0 else ("full", "empty"):
                results[name].append(await measure(ledgers[name], args.sample))
                print(f"round {round_ + 1} {name:5}: {results[name][-1]}", flush=True)
        medians = {
            name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()
        }
        for name, figures in medians.items():
            print(f"median {name:5}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
        print(f"throughput full / empty: {medians['full']['rows_per_s'] / medians['empty']['rows_per_s']:.2f}")
    finally:
        for ledger in ledgers.values():
            await ledger.close()
        for schema in schemas.values():
            await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
