"""Hang-ups, shutdowns, midnight and leaked keys, end to end: the official SDK, the proxy and the
emulator on real sockets, a real SQLite ledger, the emulator's own bill as the reference."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime

import aiohttp
import openai
import pytest

from proxy.core.admission import worst_case
from proxy.core.features import extract_features
from proxy.emulator import Fault
from proxy.http.appkeys import RUNTIME, STATE
from tests.support.audit import billed_nano, booked_nano, read_rows, settled
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text
from tests.support.money import CHAIN_MODEL, HELLO, MODELS
from tests.support.procs import free_port, start_proxy, wait_until_up
from tests.support.timing import Clock, wait_for

SONNET = CHAIN_MODEL["quality"]
BOT_ENV = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "BOT_KEY": "bot-secret"}


@pytest.mark.realtime  # the SDK's own timeout against the emulator's real latency: that is the hang-up
async def test_clients_that_hang_up_pay_for_their_answers_and_meet_their_budget(make_proxy, emulator):
    """The issue's measurement: a key with `daily_usd: 0.01` sends requests whose SDK gives up
    before the answer. Each is still answered upstream and billed: the proxy books it (499,
    client_disconnected, the upstream's own cost) against the key, which is refused once spent."""
    keys = "keys:\n  - {name: bot, key_env: BOT_KEY, daily_usd: 0.01}\n"
    proxy = await make_proxy(MODELS, extra=keys, env=BOT_ENV)
    emulator.state.faults.set(SONNET, Fault(latency_s=0.2))
    client = proxy.client(api_key="bot-secret", timeout=0.05)
    words = "Tell me about lighthouses and the keepers who kept them burning through storms " * 2
    messages = [{"role": "user", "content": words}]
    timed_out = refused = 0
    for _ in range(20):
        try:
            await client.chat.completions.create(model="quality", messages=messages, max_tokens=40)
        except openai.APITimeoutError:
            timed_out += 1
            await settled(proxy)  # one at a time: a refusal below means spent, not merely reserved
        except openai.RateLimitError as exc:
            assert exc.code == "budget_exceeded" and "of key 'bot'" in exc.message
            refused += 1
    rows = await settled(proxy)
    billed = billed_nano(emulator)
    assert timed_out >= 5 and refused >= 5 and timed_out + refused == 20
    assert len(billed) == timed_out  # every request that reached the model was billed...
    assert booked_nano(rows) == billed  # ...and booked, to the nano-dollar
    hung_up = [r for r in rows if r.generation_id is not None]
    assert {(r.status, r.error, r.cost_source, r.model) for r in hung_up} == {
        (499, "client_disconnected", "upstream", SONNET)
    }
    assert sum(r.status == 429 for r in rows) == refused
    spent = sum(billed.values()) / 1e9
    assert proxy.book.snapshot()[2][2] == pytest.approx(spent, abs=1e-12)  # the key's own daily book
    assert spent <= 0.01  # the budget held: a reservation stood for each answer still on its way
    assert proxy.book.reserved("bot") == 0.0


@pytest.mark.slow  # a real `orproxy serve` process, stopped with SIGTERM
@pytest.mark.realtime  # the emulator's real latency outlasts the proxy's shutdown timeout
async def test_a_shutdown_that_cannot_wait_books_the_reservation(emulator, tmp_path):
    """`shutdown_timeout_s` passes while the upstream is still working: the proxy gives the call
    up and books its worst case (`cost_source: reserved`), never less than the upstream bills."""
    ledger = tmp_path / "ledger.sqlite3"
    config = tmp_path / "config.yaml"
    text = proxy_config_text(emulator.url, MODELS)
    config.write_text(
        text + f"ledger: {{path: {ledger}}}\ncache: {{enabled: false}}\nshutdown_timeout_s: 0.3\nwatch_config: false\n"
    )
    emulator.state.faults.set(SONNET, Fault(latency_s=3))
    port = free_port()
    log = tmp_path / "proxy.log"
    proc = await start_proxy(config, log, port)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "quality", "messages": HELLO, "max_tokens": 100}
    try:
        await wait_until_up(url, proc, log)
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(session.post(f"{url}/v1/chat/completions", json=body))
            await wait_for(lambda: emulator.state.bills, message="the emulator never got the request")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0, log.read_text()[-2000:]
            with pytest.raises(aiohttp.ClientError):
                await request
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    (row,) = await read_rows(ledger)
    from proxy.config import parse_config
    from proxy.core.budget import SpendCounters
    from proxy.core.policy import Policy
    from proxy.money.catalogue import load_catalogue_source

    parsed = parse_config(config.read_text())
    policy = Policy.build(parsed, load_catalogue_source(parsed).catalogue, {}, SpendCounters())
    features = extract_features(body, {})
    reserved = worst_case(policy.prices, policy.router.plan("quality", features), features.prompt_tokens, 100)
    assert (row.cost_source, row.error, row.status) == ("reserved", "client_disconnected", 499)
    assert row.cost_usd == pytest.approx(reserved, abs=1e-9)
    (bill,) = emulator.state.bills.values()
    assert row.cost_usd >= bill.cost > 0  # never cheaper than what was billed
    assert "cancelled" in log.read_text()


@pytest.mark.realtime  # the emulator's real latency keeps the request in flight across midnight
async def test_a_request_across_midnight_is_booked_in_the_day_it_started(make_proxy, emulator, tmp_path):
    today = datetime.now(UTC)
    clock = Clock(Clock.at(today.year, today.month, 15, 23).now + 3599.0)  # 23:59:59 on the 15th
    proxy = await make_proxy(MODELS, extra="budget: {daily_usd: 1.0}\n", clock=clock)
    emulator.state.faults.set(SONNET, Fault(latency_s=0.4))
    asking = asyncio.ensure_future(proxy.client().chat.completions.create(model="quality", messages=HELLO))
    await wait_for(lambda: emulator.state.bills, message="the emulator never got the request")
    started = clock()
    clock.advance(2.0)  # midnight passes while the upstream works
    completion = await asking
    rows = await settled(proxy)
    (row,) = rows
    (bill,) = emulator.state.bills.values()
    assert row.ts == pytest.approx(started, abs=0.5) and row.generation_id == completion.id
    counters = proxy.app[STATE].counters
    assert counters.calendar.day_start > row.ts  # the book has rolled to the new day...
    total = counters.scope("")
    assert total.day == 0.0  # ...which this request is not part of, like its ledger row
    assert total.month == pytest.approx(bill.cost, abs=1e-12)  # the same month all the same
    assert await proxy.ledger.spend_between(counters.calendar.day_start) == 0.0


@pytest.mark.parametrize("model, upstream", [("balanced", "openrouter"), ("oa", "openai")])
async def test_an_upstream_key_echoed_in_a_midstream_error_never_reaches_the_client(
    make_proxy, emulator, aiohttp_client, model, upstream
):
    body = MODELS + "  oa: {chain: [{model: gpt-4o-mini, upstream: openai}]}\n"
    proxy = await make_proxy(body)
    target = CHAIN_MODEL["balanced"] if upstream == "openrouter" else "gpt-4o-mini"
    echoed = f"Invalid credentials: Bearer {UPSTREAM_KEY} was refused by the provider"
    emulator.state.faults.set(target, Fault(midstream_error=True, after_chunks=2, message=echoed))
    http = await aiohttp_client(proxy.server)
    response = await http.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "stream": True})
    text = await response.text()
    assert UPSTREAM_KEY not in text
    assert "Invalid credentials: Bearer [redacted] was refused" in text
    assert text.endswith("data: [DONE]\n\n")
    assert proxy.app[RUNTIME].current.executor.secrets == (UPSTREAM_KEY, UPSTREAM_KEY)
