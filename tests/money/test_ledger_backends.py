"""The ledger protocol on both backends: a real SQLite file and a real PostgreSQL schema answer
every reader alike (record, flush, rows, spend, summary, reconciliation, pruning)."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.money.ledger_api import LedgerStore, open_ledger
from proxy.money.ledger_rows import (
    GROUP_COLUMNS,
    LedgerClosed,
    LedgerRow,
    Reconciled,
    from_nano,
    to_nano,
)
from tests.money.test_ledger import DAY, T0, row
from tests.support.postgres import scratch_schema

BACKENDS = ("sqlite", "postgres")
CONFIG = """
upstreams: {openrouter: {base_url: "http://127.0.0.1:9/api/v1"}}
models: {cheap: {chain: [openai/gpt-4o-mini]}}
"""


def config_for(backend: str, tmp_path: Path, dsn: str | None, retention_days: int = 400):
    ledger = (
        f"ledger: {{backend: postgres, dsn: '{dsn}', retention_days: {retention_days}}}\n"
        if backend == "postgres"
        else f"ledger: {{path: '{tmp_path / 'ledger.sqlite3'}', retention_days: {retention_days}}}\n"
    )
    return parse_config(CONFIG + ledger, "test.yaml")


@pytest.fixture(params=BACKENDS)
async def opener(request, tmp_path: Path) -> AsyncIterator[Callable]:
    """Opens the ledger of this backend (as the proxy does, through open_ledger) at a clock of T0."""
    async with scratch_schema() as (_, dsn):
        opened: list[LedgerStore] = []

        async def open_(retention_days: int = 400, clock: Callable[[], float] = lambda: T0) -> LedgerStore:
            config = config_for(request.param, tmp_path, dsn, retention_days)
            store = await open_ledger(config, {}, clock=clock)
            opened.append(store)
            return store

        yield open_
        for store in opened:
            await store.close()


@pytest.fixture
async def store(opener) -> LedgerStore:
    return await opener()


def mixed_rows(count: int, seed: int) -> list[LedgerRow]:
    """Rows over two days, three keys (and none), several models, APIs and cost sources."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        cached = rng.random() < 0.1
        rows.append(
            row(
                f"req-{seed}-{i:05d}",
                ts=T0 + rng.uniform(-DAY, DAY),
                key=rng.choice(["alice", "bob", "carol", None]),
                model=rng.choice(["m/a", "m/b", "m/c", None]),
                virtual=rng.choice(["cheap", "smart", None]),
                cost=0.0 if cached else rng.randrange(0, 5_000_000) / 1e9,
                baseline=rng.randrange(0, 5_000_000) / 1e9,
                prompt=rng.randrange(0, 5000),
                completion=rng.randrange(0, 2000),
                cached=cached,
                saved_usd=rng.randrange(0, 1000) / 1e9 if cached else 0.0,
                cost_source="cached" if cached else rng.choice(["upstream", "catalogue", "estimate"]),
                generation_id=f"gen-{i}" if rng.random() < 0.5 else None,
                streamed=rng.random() < 0.5,
                ttft_s=None if rng.random() < 0.3 else 0.25,
                api=rng.choice(["chat", "responses", "messages"]),
                status=rng.choice([200, 200, 200, 502, 499]),
                **_batch_line(rng, i),
            )
        )
    return rows


def _batch_line(rng: random.Random, i: int) -> dict[str, str | None]:
    """A third of the rows are batch lines (two batches), the rest interactive."""
    batch = rng.choice([None, None, "batch_a", "batch_b"])
    return {"batch_id": batch, "custom_id": None if batch is None else f"line-{i}"}


def expected_sums(rows: list[LedgerRow], start: float, end: float, column: str) -> dict[str, tuple[int, int, int]]:
    """Requests, cost and baseline in nano-dollars per group, summed here in Python."""
    field = {"key_name": "key_name", "model": "model", "virtual_model": "virtual_model", "api": "api"}.get(
        column, column
    )
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in rows:
        if start <= r.ts < end:
            group = sums[getattr(r, field) or ""]
            group[0] += 1
            group[1] += to_nano(r.cost_usd)
            group[2] += to_nano(r.baseline_cost_usd)
    return {name: (a, b, c) for name, (a, b, c) in sums.items()}


async def test_rows_round_trip_and_survive_reopen(opener) -> None:
    rows = mixed_rows(60, seed=1)
    first = await opener()
    await asyncio.gather(*(first.record(r) for r in rows))
    await first.close()
    second = await opener()
    stored = await second.rows()
    assert stored == sorted(rows, key=lambda r: r.ts)  # every field, None and booleans included
    assert await second.rows(T0, T0 + 1) == [r for r in stored if T0 <= r.ts < T0 + 1]


async def test_a_burst_is_grouped_into_few_commits(store) -> None:
    await asyncio.gather(*(store.record(r) for r in mixed_rows(300, seed=2)))
    await store.flush()
    assert store.rows_written == 300  # type: ignore[attr-defined]
    assert store.commits <= 5  # type: ignore[attr-defined]


async def test_spend_and_summaries_equal_sums_made_here(store) -> None:
    rows = mixed_rows(400, seed=3)
    for r in rows:  # record_nowait + flush: the path the proxy takes for a streamed answer
        store.record_nowait(r)
    await store.flush()
    start, end = T0 - DAY / 2, T0 + DAY / 2
    inside = [r for r in rows if start <= r.ts < end]
    assert to_nano(await store.spend_between(start, end)) == sum(to_nano(r.cost_usd) for r in inside)
    per_key = await store.spend_by_key_between(start, end)
    for name, (_, cost, _) in expected_sums(rows, start, end, "key_name").items():
        assert to_nano(per_key[name]) == cost
        if name:
            assert to_nano(await store.spend_between(start, end, key_name=name)) == cost
    for by, column in GROUP_COLUMNS.items():
        got = await store.summary(start, end, by)  # type: ignore[arg-type]
        wanted = expected_sums(rows, start, end, column)
        assert {s.group: (s.requests, to_nano(s.cost_usd), to_nano(s.baseline_cost_usd)) for s in got} == wanted
        costs = [to_nano(s.cost_usd) for s in got]
        assert costs == sorted(costs, reverse=True)
    total = await store.totals(start, end)
    assert total.requests == len(inside)
    assert total.prompt_tokens == sum(r.prompt_tokens for r in inside)
    assert total.cache_hits == sum(r.cached for r in inside)
    assert to_nano(total.cache_saved_usd) == sum(to_nano(r.saved_usd) for r in inside)
    assert to_nano(total.max_cost_usd) == max(to_nano(r.cost_usd) for r in inside)


async def test_both_backends_report_the_same(tmp_path: Path, pg_dsn: str) -> None:
    rows = mixed_rows(300, seed=4)
    results = []
    for backend in BACKENDS:
        store = await open_ledger(config_for(backend, tmp_path, pg_dsn), {}, clock=lambda: T0)
        try:
            await asyncio.gather(*(store.record(r) for r in rows))
            results.append(
                (
                    [await store.summary(T0 - DAY, T0 + DAY, by) for by in GROUP_COLUMNS],  # type: ignore[arg-type]
                    await store.totals(T0 - DAY, T0),
                    await store.spend_by_key_between(T0 - DAY / 3),
                    await store.unreconciled(T0 - DAY, ["openrouter"], 3),
                )
            )
        finally:
            await store.close()
    assert results[0] == results[1]


async def test_reconciliation_replaces_an_estimate_once(store) -> None:
    estimate = row("est", cost=0.002, cost_source="estimate", generation_id="gen-est")
    reserved = row("res", cost=0.05, cost_source="reserved", generation_id="gen-res", upstream="other")
    exact = row("exact", cost=0.001, generation_id="gen-exact")
    await asyncio.gather(*(store.record(r) for r in (estimate, reserved, exact)))
    assert [r.request_id for r in await store.unreconciled(T0 - 1, ["openrouter"], 3)] == ["est"]
    assert [r.request_id for r in await store.unreconciled(T0 - 1, ["openrouter", "other"], 3)] == ["est", "res"]
    assert await store.unreconciled(T0 - 1, [], 3) == []

    assert await store.note_reconcile_try("res", "gen-res")
    assert await store.unreconciled(T0 - 1, ["other"], 1) == []  # one try made: past max_tries=1
    assert not await store.note_reconcile_try("res", "gen-other")

    correction = Reconciled(cost_usd=0.0031, prompt_tokens=120, completion_tokens=60, cached_tokens=7,
                            baseline_cost_usd=0.004)  # fmt: skip
    assert await store.reconcile("est", "gen-est", correction)
    assert not await store.reconcile("est", "gen-est", correction)  # no longer an estimate
    assert not await store.reconcile("exact", "gen-exact", correction)  # never was one
    (after,) = [r for r in await store.rows() if r.request_id == "est"]
    assert (after.cost_source, after.cost_usd, after.estimate_usd) == ("reconciled", 0.0031, 0.002)
    assert (after.prompt_tokens, after.completion_tokens, after.cached_tokens, after.reconcile_tries) == (120, 60, 7, 1)
    assert to_nano(await store.spend_between(T0 - 1)) == to_nano(0.0031) + to_nano(0.05) + to_nano(0.001)


async def test_prune_deletes_only_rows_past_retention(opener) -> None:
    now = T0 + 10 * DAY
    store = await opener(retention_days=400, clock=lambda: now)
    old = [row(f"old{i}", ts=now - 5 * DAY - i) for i in range(30)]
    young = [row(f"young{i}", ts=now - 2 * DAY + i) for i in range(20)]
    await asyncio.gather(*(store.record(r) for r in old + young))
    assert await store.prune() == 0  # 400 days: nothing is that old
    assert await store.prune(retention_days=3) == 30
    assert {r.request_id for r in await store.rows()} == {r.request_id for r in young}
    assert await store.prune(now + 400 * DAY) == 20


async def test_a_closed_ledger_refuses_rows_and_queries(store) -> None:
    await store.record(row("before"))
    await store.close()
    await store.close()  # idempotent
    await store.flush()  # nothing pending: returns
    with pytest.raises(LedgerClosed):
        await store.record(row("after"))
    with pytest.raises(LedgerClosed):
        await store.rows()


async def test_costs_are_exact_nano_dollars(store) -> None:
    # 2,000 requests of $0.0000001: float sums drift, BIGINT nano-dollar sums do not.
    await asyncio.gather(*(store.record(row(f"t{i}", cost=1e-7)) for i in range(2_000)))
    assert await store.spend_between(T0) == from_nano(2_000 * 100)
    assert (await store.totals(T0, T0 + DAY)).cost_usd == 0.0002


async def test_same_request_id_at_another_time_is_another_request(store) -> None:
    """A client may reuse its X-Request-ID: two requests, two costs, on either backend."""
    await store.record(row("client-id", ts=T0, cost=0.001))
    await store.record(row("client-id", ts=T0 + 5, cost=0.002))
    assert to_nano(await store.spend_between(T0)) == to_nano(0.001) + to_nano(0.002)
