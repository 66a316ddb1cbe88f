"""A batch against the calendar, on an injected clock. `batches.budget_share`: batch work spends at
most its share of the day's budget, then pauses (no line fails) until the next day, when it
carries on. `completion_window`: a batch still running when it expires keeps what finished, and
its other lines come back in the error file as `batch_expired`."""

from __future__ import annotations

import asyncio

import orjson

from proxy.emulator import Fault
from proxy.money.ledger_rows import to_nano
from tests.batch.test_batch_e2e import MISTRAL, batch_rows, chat_lines, jsonl, raw, until_done
from tests.support.audit import billed_nano, booked_nano
from tests.support.timing import Clock, wait_for

DAILY_USD, SHARE = 1.0, 5e-6  # batch work may spend $0.000005 a day: a handful of lines
CONCURRENCY = 2


async def paused(proxy, batch_id: str) -> dict:
    """The batch's object once it is paused (`x_proxy.paused_until` set)."""

    async def seen() -> dict | None:
        view = await raw(proxy, f"/v1/batches/{batch_id}")
        return view if view["x_proxy"]["paused_until"] else None

    return await wait_for(seen, 10, interval=0.02, message=f"batch {batch_id} never paused")


async def test_a_batch_past_its_budget_share_pauses_without_failing_lines_then_resumes_the_next_day(
    make_proxy, emulator
) -> None:
    clock = Clock.at(2026, 3, 10, hour=12)
    proxy = await make_proxy(
        extra=f"budget: {{daily_usd: {DAILY_USD}}}\nbatches: {{budget_share: {SHARE}, concurrency: {CONCURRENCY}}}\n",
        clock=clock,
    )
    client = proxy.client()
    lines = chat_lines(40, model=MISTRAL)
    for line in lines:
        line["body"]["max_tokens"] = 40
    uploaded = await client.files.create(file=("share.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    view = await paused(proxy, batch.id)
    await asyncio.sleep(0.5)  # several runner steps: nothing more may start while it is paused
    after = await raw(proxy, f"/v1/batches/{batch.id}")
    assert after["status"] == "in_progress" and after["request_counts"]["failed"] == 0
    done_today = after["request_counts"]["completed"]
    assert 0 < done_today < len(lines)
    rows = await batch_rows(proxy, batch.id)
    assert len(rows) == done_today and len(emulator.state.bills) == done_today
    spent = sum(to_nano(row.cost_usd) for row in rows)
    largest = max(to_nano(row.cost_usd) for row in rows)
    cap = to_nano(DAILY_USD * SHARE)
    # At most the lines already in flight when the share ran out go past it.
    assert cap <= spent <= cap + CONCURRENCY * largest
    assert view["x_proxy"]["paused_until"] == clock.now - clock.now % 86400 + 86400

    clock.advance(view["x_proxy"]["paused_until"] - clock.now + 1)  # the next day: a fresh share, within the 24h

    async def more() -> bool:
        current = await client.batches.retrieve(batch.id)
        return current.request_counts.completed > done_today

    await wait_for(more, 10, interval=0.02, message="the batch did not resume the next day")
    await paused(proxy, batch.id)  # the second day's share
    assert (await raw(proxy, f"/v1/batches/{batch.id}"))["request_counts"]["failed"] == 0

    async def audited() -> bool:  # once the lines in flight at the second pause are booked
        return booked_nano(await batch_rows(proxy, batch.id)) == billed_nano(emulator)

    await wait_for(audited, 5, interval=0.02)


async def test_an_expired_batch_keeps_what_finished(make_proxy, emulator) -> None:
    clock = Clock()
    proxy = await make_proxy(extra="batches: {concurrency: 2}\n", clock=clock)
    emulator.state.faults.set(MISTRAL, Fault(latency_s=0.05, times=None))
    client = proxy.client()
    uploaded = await client.files.create(file=("slow.jsonl", jsonl(chat_lines(100, model=MISTRAL))), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def some_done() -> bool:
        return (await client.batches.retrieve(batch.id)).request_counts.completed >= 3

    await wait_for(some_done, 10, interval=0.02)
    clock.advance(86_400)
    done = await until_done(client, batch.id)
    assert done.status == "expired" and done.expired_at is not None
    kept = [orjson.loads(x) for x in (await client.files.content(done.output_file_id)).content.splitlines()]
    unrun = [orjson.loads(x) for x in (await client.files.content(done.error_file_id)).content.splitlines()]
    assert len(kept) == done.request_counts.completed >= 3 and len(kept) + len(unrun) == 100
    assert {line["error"]["code"] for line in unrun} == {"batch_expired"}
    assert booked_nano(await batch_rows(proxy, batch.id)) == billed_nano(emulator)


async def test_lines_the_budget_refuses_wait_with_their_batch_instead_of_failing(make_proxy, emulator) -> None:
    """The day's budget itself (not the batch share) cannot take a line: the line is not sent, the
    batch pauses until the budget resets, and nothing fails."""
    clock = Clock.at(2026, 3, 10, hour=12)
    proxy = await make_proxy(extra="budget: {daily_usd: 0.000000001}\n", clock=clock)
    client = proxy.client()
    uploaded = await client.files.create(file=("broke.jsonl", jsonl(chat_lines(3, model=MISTRAL))), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    view = await paused(proxy, batch.id)
    assert view["status"] == "in_progress" and view["x_proxy"]["lines_left"] == 3
    assert view["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert emulator.state.requests == [] and await batch_rows(proxy, batch.id) == []
    assert clock.now < view["x_proxy"]["paused_until"] <= clock.now - clock.now % 86400 + 86400
