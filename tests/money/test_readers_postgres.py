"""The readers that are not reports, on a PostgreSQL ledger: `simulate --from-ledger`, the spend a
proxy seeds its budget from at start-up (a restart, or another replica, starts where the ledger
is, never at zero). Estimates another replica left are reconciled: test_reconcile_e2e.py."""

from __future__ import annotations

import asyncio
import json

from proxy.money.ledger_pg import PgLedger
from proxy.money.ledger_rows import to_nano
from tests.money.test_simulate import OTHER, ROWS, check_replay_figures, run_cli

HELLO = [{"role": "user", "content": "hello there, say something"}]


async def test_simulate_replays_a_postgres_ledger(tmp_path, capsys, pg_dsn) -> None:
    ledger = await PgLedger.open(pg_dsn)
    try:
        await asyncio.gather(*(ledger.record(item) for item in ROWS))
    finally:
        await ledger.close()
    other = tmp_path / "other.yaml"
    other.write_text(OTHER.replace('ledger: {path: "%(ledger)s"}', f"ledger: {{backend: postgres, dsn: '{pg_dsn}'}}"))
    argv = ["simulate", "--from-ledger", "--days", "30", "--config", str(other), "--cache", str(tmp_path / "x.json")]
    code = await asyncio.to_thread(run_cli, [*argv, "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["requests"] == 6  # r6 is 40 days old
    assert payload["ledger"] == "ledger.backend: postgres"
    check_replay_figures({g["requested_model"]: g for g in payload["groups"]}, payload)


async def test_a_second_replica_starts_from_the_spend_in_postgres(pg_dsn, make_proxy) -> None:
    extra = f"budget: {{daily_usd: 100.0}}\nledger: {{backend: postgres, dsn: '{pg_dsn}'}}\n"
    first = await make_proxy(extra=extra)
    for _ in range(3):
        await first.client().chat.completions.create(model="cheap", messages=HELLO)
    spent = first.book.counters.scope("").day
    assert spent > 0
    second = await make_proxy(extra=extra)  # another process's view: it reads only the database
    assert to_nano(second.book.counters.scope("").day) == to_nano(spent)
    assert to_nano(second.book.counters.scope("").month) == to_nano(await second.ledger.spend_between(0))
