"""Reconciliation end to end: estimated costs (streams cut short, clients gone) are looked up at
the emulator's `GET /generation`, as at OpenRouter's, and the ledger row and the budget are
corrected to what it billed; across a restart too. OpenAI-shaped streams cut short are billed
from their text, which is all an OpenAI upstream lets anyone know."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from proxy.emulator import Fault
from tests.support.audit import billed_nano, booked_nano, settled
from tests.support.money import CHAIN_MODEL, MODELS
from tests.support.timing import wait_for

FAST = (0.02, 0.05, 0.1, 0.2, 0.5)  # the lookup schedule of these tests: the production one, sped up
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm at sea."}]
BALANCED = CHAIN_MODEL["balanced"]
OPENAI_CHAIN = MODELS + "  oa: {chain: [{model: gpt-4o-mini, upstream: openai}]}\n"


async def cut_stream(proxy, model: str = "balanced") -> list[Any]:
    stream = await proxy.client().chat.completions.create(model=model, messages=STORY, stream=True)
    received: list[Any] = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.append(chunk)
    return received


async def test_a_cut_stream_is_reconciled_with_what_openrouter_billed(make_proxy, emulator):
    emulator.state.generation_lag = 2  # OpenRouter says 404 for a moment: the lookup backs off
    proxy = await make_proxy(MODELS, reconcile_schedule=FAST, extra="budget: {daily_usd: 1.0}\n")
    emulator.state.faults.set(BALANCED, Fault(drop_midstream=True, after_chunks=3))
    received = await cut_stream(proxy)
    await proxy.ledger.flush()
    (first,) = await proxy.ledger.rows()
    assert (first.cost_source, first.error, first.generation_id) == ("estimate", "stream_interrupted", received[0].id)
    rows = await settled(proxy)
    (row,) = rows
    (bill,) = emulator.state.bills.values()
    assert emulator.state.generation_lookups[bill.id] == 3  # two 404s, then the figures
    assert (row.cost_source, row.estimate_usd, row.reconcile_tries) == ("reconciled", first.cost_usd, 3)
    assert booked_nano(rows) == billed_nano(emulator)
    assert (row.prompt_tokens, row.completion_tokens) == (bill.prompt_tokens, bill.completion_tokens)
    assert proxy.book.snapshot()[0][2] == pytest.approx(bill.cost, abs=1e-12)  # the budget, corrected too


@pytest.mark.realtime  # the emulator's real pauses between chunks keep the stream going when the client leaves
async def test_a_client_gone_midstream_is_reconciled_to_the_partial_bill(make_proxy, emulator):
    proxy = await make_proxy(MODELS, reconcile_schedule=FAST)
    emulator.state.faults.set(BALANCED, Fault(chunk_delay_s=0.1))
    async with aiohttp.ClientSession() as session:
        body = {"model": "balanced", "stream": True, "messages": STORY}
        response = await session.post(f"{proxy.url}/v1/chat/completions", json=body)
        for _ in range(3):
            await response.content.readuntil(b"\n\n")
        response.close()
    await wait_for(lambda: emulator.state.bills, message="the cancelled stream was never billed")
    rows = await settled(proxy)
    (row,) = rows
    (bill,) = emulator.state.bills.values()
    assert bill.cancelled and bill.completion_tokens > 0
    assert (row.status, row.error, row.cost_source) == (499, "client_disconnected", "reconciled")
    assert booked_nano(rows) == billed_nano(emulator)


@pytest.mark.realtime  # the emulator's real latency holds the stream back until the client has left
async def test_a_client_gone_before_the_stream_opened_is_booked(make_proxy, emulator):
    """An OpenAI-shaped upstream sends nothing before its first chunk: the client gives up while
    the proxy waits for it. The proxy still takes that first read (so the generation is known),
    closes the stream and books it; the upstream bills the prompt of the cancelled generation."""
    proxy = await make_proxy(OPENAI_CHAIN, reconcile_schedule=FAST)
    emulator.state.faults.set("gpt-4o-mini", Fault(latency_s=0.3, chunk_delay_s=0.3))
    client = proxy.client(timeout=0.1)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="oa", messages=STORY, stream=True)
    await wait_for(lambda: emulator.state.bills, message="the abandoned stream was never billed")
    rows = await settled(proxy)
    (row,) = rows
    (bill,) = emulator.state.bills.values()
    assert bill.cancelled and bill.prompt_tokens > 0 and bill.completion_tokens == 0
    assert (row.status, row.error, row.cost_source) == (499, "client_disconnected", "estimate")
    assert (row.model, row.generation_id) == ("gpt-4o-mini", bill.id)  # from the X-Generation-Id header
    assert booked_nano(rows) == billed_nano(emulator)


async def test_estimates_left_by_a_stopped_proxy_are_reconciled_at_start_up(
    ledger_config,
    make_proxy,
    emulator,
    tmp_path,  # the schema (first set up) outlives the proxies
):
    """On PostgreSQL the second proxy stands for another replica too: it knows only the database."""
    ledger, extra = tmp_path / "restart.sqlite3", ledger_config
    first = await make_proxy(MODELS, ledger_path=ledger, extra=extra)  # looks up after a minute: stops before that
    emulator.state.faults.set(BALANCED, Fault(drop_midstream=True, after_chunks=2))
    await cut_stream(first)
    emulator.state.faults.set(BALANCED, Fault(midstream_error=True, after_chunks=1))
    await cut_stream(first)
    await first.ledger.flush()
    assert [r.cost_source for r in await first.ledger.rows()] == ["estimate", "estimate"]
    await first.server.close()

    second = await make_proxy(MODELS, ledger_path=ledger, reconcile_schedule=FAST, extra=extra)
    rows = await settled(second)
    assert [r.cost_source for r in rows] == ["reconciled", "reconciled"]
    assert booked_nano(rows) == billed_nano(emulator)
    assert second.book.snapshot()[0][2] == pytest.approx(sum(b.cost for b in emulator.state.bills.values()))


async def test_an_openai_shaped_stream_cut_short_is_billed_from_its_text(make_proxy, emulator):
    """No lookup exists on an OpenAI upstream: the row stays an estimate, four bytes a token of
    the prompt as sent and of the text that arrived, which is how the emulator counts too."""
    proxy = await make_proxy(OPENAI_CHAIN, reconcile_schedule=FAST)
    emulator.state.faults.set("gpt-4o-mini", Fault(drop_midstream=True, after_chunks=3))
    received = await cut_stream(proxy, "oa")
    assert all(chunk.usage is None for chunk in received) and len(received) == 4
    rows = await settled(proxy)
    (row,) = rows
    assert (row.cost_source, row.upstream, row.reconcile_tries) == ("estimate", "openai", 0)
    assert booked_nano(rows) == billed_nano(emulator)
