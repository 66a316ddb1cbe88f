"""Reports from PostgreSQL: a proxy on `ledger.backend: postgres` serves a mix, then `orproxy report
--json` (a real process, reading the database the config names) equals the SQL sums over the table,
and what the upstream billed; /admin/spend says the same."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from proxy.config import parse_config
from proxy.money.ledger_pg_schema import TABLE
from proxy.money.ledger_rows import GROUP_COLUMNS, NANO_PER_USD
from proxy.money.reports import period_bounds
from tests.money.test_report import ADMIN_KEY, ENV, EXTRA, assert_report_matches, send_mix
from tests.support.gateway import ROOT, proxy_config_text

SUMS = (
    "count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost_nusd), max(cost_nusd), "
    "sum(baseline_cost_nusd), sum(cached), sum(saved_nusd)"
)


async def run_report(config: Path, *args: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "report", "--config", str(config), "--json", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


def as_report_row(group: str, values: asyncpg.Record) -> dict:
    """What the report should say for one group, from the SQL sums alone (integer nano-dollars)."""
    # Plain SQL: sum() of BIGINT is NUMERIC (Decimal here), exact; whole numbers, so int() is too.
    requests, prompt, completion, cost, largest, baseline, hits, saved = (int(v or 0) for v in values)
    return {
        "group": group or "(none)",
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd": cost / NANO_PER_USD,
        "max_cost_usd": largest / NANO_PER_USD,
        "baseline_cost_usd": baseline / NANO_PER_USD,
        "savings_usd": (baseline - cost) / NANO_PER_USD,
        "cache_hits": hits,
        "cache_saved_usd": saved / NANO_PER_USD,
    }


@pytest.fixture
async def served_on_postgres(pg_dsn, make_proxy, emulator, tmp_path):  # the schema outlives the proxy
    ledger = f"ledger: {{backend: postgres, dsn: '{pg_dsn}'}}\n"
    proxy = await make_proxy(extra=EXTRA + ledger, env=ENV)
    billed = await send_mix(proxy.client())
    await proxy.ledger.flush()
    config = tmp_path / "config.yaml"
    config.write_text(proxy_config_text(emulator.url) + EXTRA + ledger)
    return proxy, billed, config, pg_dsn


@pytest.mark.slow  # four real `orproxy report` processes (about 2 s each to start on this machine)
async def test_cli_report_from_postgres_equals_sql_sums(served_on_postgres) -> None:
    _, billed, config, dsn = served_on_postgres
    timezone = parse_config(config.read_text()).budget.timezone
    conn = await asyncpg.connect(dsn)
    try:
        # Every grouping, and both periods.
        for period, by in (("day", "model"), ("month", "virtual"), ("day", "key"), ("month", "api")):
            column = GROUP_COLUMNS[by]
            report = await run_report(config, "--period", period, "--by", by)
            start, end = period_bounds(period, timezone, time.time())  # type: ignore[arg-type]
            where = "WHERE ts >= $1 AND ts < $2"
            groups = await conn.fetch(
                f"SELECT coalesce({column}, '') AS grp, {SUMS} FROM {TABLE} {where} GROUP BY grp", start, end
            )
            expected = {g["grp"] or "(none)": as_report_row(g["grp"], g[1:]) for g in groups}
            got = {row["group"]: {k: row[k] for k in as_report_row("", groups[0][1:])} for row in report["rows"]}
            assert got == expected, (period, by)  # the same integers over the same divisor: exact
            (total,) = await conn.fetch(f"SELECT {SUMS} FROM {TABLE} {where}", start, end)
            wanted = as_report_row("total", total)
            assert {k: report["total"][k] for k in wanted} == wanted
            if by in ("model", "virtual"):
                assert_report_matches(report, billed, by)  # and both equal what the upstream billed
        assert await conn.fetchval(f"SELECT count(*) FROM {TABLE}") == billed.requests
    finally:
        await conn.close()


async def test_admin_spend_reads_postgres_too(served_on_postgres, aiohttp_client) -> None:
    proxy, billed, _, _ = served_on_postgres
    http = await aiohttp_client(proxy.server)
    response = await http.get("/admin/spend?period=day&by=model", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status == 200
    assert_report_matches(await response.json(), billed, "model")
