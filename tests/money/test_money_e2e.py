"""Budgets end to end: the official SDK -> the proxy -> the emulator, a real SQLite ledger.

Spend is driven up by real requests (the emulator bills each with `usage.cost`), or seeded
into the ledger file before the proxy starts, the way an earlier run would have left it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import aiohttp
import openai
import pytest

from proxy.core.admission import worst_case
from proxy.core.features import extract_features
from proxy.core.routing import Router
from proxy.emulator import Fault
from proxy.http.appkeys import RUNTIME
from tests.support.money import (
    CHAIN_MODEL,
    HELLO,
    MODELS,
    budget_block,
    seed_ledger,
    seed_row,
    usage_cost,
)
from tests.support.timing import Clock, wait_for

DAILY = 0.005
# A direct request to an expensive model with a longish prompt and a one-token answer: about 4%
# of DAILY, so the spend climbs through each 20%-wide step in a few requests. Its reservation
# (the prompt's upper bound, a token per byte) is about four times that, and still fits at 80%.
FILLER = [{"role": "user", "content": "lorem ipsum dolor sit amet " * 9}]


async def ask(client: openai.AsyncOpenAI, model: str, messages=HELLO, **kwargs):
    raw = await client.chat.completions.with_raw_response.create(model=model, messages=messages, **kwargs)
    return raw.headers, raw.parse()


@pytest.fixture
def clock() -> Clock:
    """The proxy's clock in these tests: noon on the 15th of this month (UTC), and still. Budget
    windows then never roll over mid-test, a seeded row of this month is never also today's, and
    what the test computes from "now" is what the proxy computed. (No test here makes an upstream
    fail, so the executor's own real clock, which this does not reach, decides nothing.)"""
    today = datetime.now(UTC)
    return Clock.at(today.year, today.month, 15)


def seconds_to_utc_midnight(now: float) -> float:
    day = datetime.fromtimestamp(now, UTC)
    midnight = day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp() + 86_400
    return midnight - now


def assert_budget_refusal(
    exc: openai.RateLimitError, now: float, *, limit: str, scope: str = "the daily budget"
) -> None:
    assert exc.status_code == 429
    assert exc.type == "insufficient_quota"
    assert exc.code == "budget_exceeded"
    message = exc.message
    assert scope in message, message
    assert "Spent $" in message and f"of {limit}" in message, message
    assert "resets at" in message, message
    retry_after = int(exc.response.headers["retry-after"])
    assert 1 <= retry_after <= seconds_to_utc_midnight(now) + 2


class Spend:
    """What the SDK was billed, kept beside the proxy's own book to cross-check it."""

    def __init__(self, proxy, daily: float, clock: Clock) -> None:
        self.proxy, self.daily, self.clock, self.total = proxy, daily, clock, 0.0

    def add(self, completion) -> None:
        self.total += usage_cost(completion.usage)

    @property
    def fraction(self) -> float:
        book_fraction = self.proxy.book.fraction(None, self.clock())
        assert book_fraction == pytest.approx(self.total / self.daily, rel=1e-9)
        return book_fraction

    async def fill_to(self, client, target: float) -> None:
        for _ in range(40):
            if self.fraction >= target:
                return
            _headers, completion = await ask(client, "anthropic/claude-sonnet-4.5", FILLER, max_tokens=1)
            assert completion.model == "anthropic/claude-sonnet-4.5"
            self.add(completion)
        raise AssertionError(f"spend did not reach {target:.0%}")


@pytest.mark.parametrize("on_exhausted", ["reject", "cheapest"])
async def test_rising_spend_steps_down_through_each_step_then_exhausts(make_proxy, clock, on_exhausted):
    proxy = await make_proxy(MODELS, extra=budget_block(DAILY, on_exhausted), clock=clock)
    client = proxy.client()
    spend = Spend(proxy, DAILY, clock)

    # Below 40%: everything as asked.
    assert spend.fraction < 0.4
    headers, completion = await ask(client, "quality", max_tokens=5)
    spend.add(completion)
    assert completion.model == CHAIN_MODEL["quality"]
    assert "x-proxy-downgrade" not in headers

    # 40%: quality -> balanced; balanced untouched.
    await spend.fill_to(client, 0.4)
    assert spend.fraction < 0.6
    headers, completion = await ask(client, "quality", max_tokens=5)
    spend.add(completion)
    assert completion.model == CHAIN_MODEL["balanced"]
    assert headers["x-proxy-model"] == CHAIN_MODEL["balanced"]
    assert headers["x-proxy-downgrade"] == "quality->balanced (step 0 at 40%)"
    headers, completion = await ask(client, "balanced", max_tokens=5, stream=False)
    spend.add(completion)
    assert completion.model == CHAIN_MODEL["balanced"] and "x-proxy-downgrade" not in headers

    # 60%: quality and balanced -> cheap, streamed too.
    await spend.fill_to(client, 0.6)
    assert spend.fraction < 0.8
    headers, completion = await ask(client, "quality", max_tokens=5)
    spend.add(completion)
    assert completion.model == CHAIN_MODEL["cheap"]
    assert headers["x-proxy-downgrade"] == "quality->cheap (step 1 at 60%)"
    raw = await client.chat.completions.with_raw_response.create(
        model="balanced", messages=HELLO, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-proxy-downgrade"] == "balanced->cheap (step 1 at 60%)"
    chunks = [chunk async for chunk in raw.parse()]
    assert {c.model for c in chunks} == {CHAIN_MODEL["cheap"]}
    spend.add(next(c for c in chunks if c.usage is not None))

    # 80%: "*" -> cheap, direct slugs included.
    await spend.fill_to(client, 0.8)
    assert spend.fraction < 1.0
    headers, completion = await ask(client, "quality", max_tokens=5)
    spend.add(completion)
    assert completion.model == CHAIN_MODEL["cheap"]
    assert headers["x-proxy-downgrade"] == "quality->cheap (step 2 at 80%)"
    headers, completion = await ask(client, "anthropic/claude-sonnet-4.5", max_tokens=5)
    spend.add(completion)
    assert completion.model == CHAIN_MODEL["cheap"]
    assert headers["x-proxy-downgrade"] == "anthropic/claude-sonnet-4.5->cheap (step 2 at 80%)"

    # Exhausted for this request: its worst case on cheap (2000 tokens of gpt-4o-mini) no longer fits.
    remaining = DAILY - spend.total
    assert remaining < 2000 * 6e-7
    if on_exhausted == "cheapest":
        # ...but it does on the cheapest chain.
        headers, completion = await ask(client, "quality", max_tokens=2000)
        spend.add(completion)
        assert completion.model == CHAIN_MODEL["tiny"]
        assert headers["x-proxy-downgrade"] == "quality->tiny (budget exhausted: cheapest)"
    else:
        with pytest.raises(openai.RateLimitError) as refused:
            await ask(client, "quality", max_tokens=2000)
        assert_budget_refusal(refused.value, clock(), limit="$0.005")
    # Nothing fits: 200k tokens even on the cheapest model cost more than what is left.
    with pytest.raises(openai.RateLimitError) as refused:
        await ask(client, "quality", max_tokens=200_000)
    assert_budget_refusal(refused.value, clock(), limit="$0.005")
    # The refusals cost nothing (the book still matches what the SDK was billed),
    # and a request that fits still goes through.
    assert spend.fraction < 1.0
    headers, completion = await ask(client, "quality", max_tokens=5)
    assert completion.model == CHAIN_MODEL["cheap"]
    spend.add(completion)
    assert spend.fraction < 1.0


SEEDED = [
    # (on_exhausted, fraction spent, requested, max_tokens, answered by | None = 429, x-proxy-downgrade)
    ("reject", 0.0, "quality", 5, "quality", None),
    ("reject", 0.39, "quality", 5, "quality", None),
    ("reject", 0.41, "quality", 5, "balanced", "quality->balanced (step 0 at 40%)"),
    ("reject", 0.41, "cheap", 5, "cheap", None),
    ("reject", 0.61, "balanced", 5, "cheap", "balanced->cheap (step 1 at 60%)"),
    ("reject", 0.81, "tiny", 5, "cheap", "tiny->cheap (step 2 at 80%)"),
    ("reject", 0.95, "quality", 2000, None, None),
    ("cheapest", 0.95, "quality", 2000, "tiny", "quality->tiny (budget exhausted: cheapest)"),
    ("reject", 1.0, "quality", 1, None, None),
    ("cheapest", 1.0, "quality", 1, None, None),
    ("cheapest", 1.0, "tiny", 1, None, None),
]


@pytest.mark.parametrize("on_exhausted, fraction, requested, max_tokens, answered_by, downgrade", SEEDED)
async def test_spend_already_in_the_ledger_decides_the_step(
    make_proxy, tmp_path, clock, on_exhausted, fraction, requested, max_tokens, answered_by, downgrade
):
    path = tmp_path / "seeded.sqlite3"
    await seed_ledger(path, *([seed_row("earlier", DAILY * fraction, ts=clock() - 60)] if fraction else []))
    proxy = await make_proxy(MODELS, extra=budget_block(DAILY, on_exhausted), ledger_path=path, clock=clock)
    client = proxy.client()
    if answered_by is None:
        with pytest.raises(openai.RateLimitError) as refused:
            await ask(client, requested, max_tokens=max_tokens)
        assert_budget_refusal(refused.value, clock(), limit="$0.005")
        return
    headers, completion = await ask(client, requested, max_tokens=max_tokens)
    assert completion.model == CHAIN_MODEL[answered_by]
    assert headers.get("x-proxy-downgrade") == downgrade


async def test_monthly_budget_is_enforced_too(make_proxy, tmp_path, clock):
    path = tmp_path / "seeded.sqlite3"
    now = datetime.fromtimestamp(clock(), UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
    assert clock() - month_start >= 86_400  # the seeded row is this month's but not today's, on any date
    await seed_ledger(path, seed_row("earlier-this-month", 0.0099, ts=month_start + 1))
    proxy = await make_proxy(MODELS, extra=budget_block(1.0, monthly=0.01), ledger_path=path, clock=clock)
    with pytest.raises(openai.RateLimitError) as refused:
        await ask(proxy.client(), "quality", max_tokens=2000)  # 99% spent: on cheap, up to $0.0012
    assert "the monthly budget" in refused.value.message
    assert "of $0.01" in refused.value.message


@pytest.mark.realtime  # the emulator's real latency keeps every request in flight at once
async def test_100_concurrent_requests_never_overshoot_the_budget(make_proxy, emulator):
    """Each admitted request reserved its worst case W before going upstream, and the book refuses
    whenever spent + reserved + W > limit. So the final spend can pass the limit only by what the
    admitted requests cost beyond their own reservations; the bound asserted is exactly that sum
    (zero here, since max_tokens caps every answer well below W)."""
    messages = [{"role": "user", "content": "Count the words in this short sentence, please."}]
    max_tokens = 300
    probe = await make_proxy(MODELS)
    features = extract_features({"model": "quality", "messages": messages, "max_tokens": max_tokens}, {})
    plan = Router(probe.config).plan("quality", features)
    worst = worst_case(probe.app[RUNTIME].current.policy.prices, plan, features.prompt_tokens, features.max_tokens)
    limit = round(worst * 10.5, 9)  # room for 10 reservations at a time, not 11

    proxy = await make_proxy(MODELS, extra=f"budget: {{daily_usd: {limit}, on_exhausted: reject}}\n")
    emulator.state.faults.set("*", Fault(latency_s=0.3))  # everyone in flight together
    book = proxy.book
    client = proxy.client(timeout=10)
    violations: list[str] = []

    async def watch() -> None:
        while True:
            spent = book.snapshot()[0][2]
            if spent + book.reserved() > limit + 1e-12:
                violations.append(f"spent {spent} + reserved {book.reserved()} > {limit}")
            await asyncio.sleep(0.005)

    async def one(i: int):
        try:
            return await client.chat.completions.create(model="quality", messages=messages, max_tokens=max_tokens)
        except openai.RateLimitError as exc:
            return exc

    watcher = asyncio.create_task(watch())
    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(100)))
    finally:
        watcher.cancel()
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(answered) + len(refused) == 100
    assert 10 <= len(answered) < 100 and refused
    for exc in refused:
        assert exc.code == "budget_exceeded" and exc.type == "insufficient_quota"
    costs = [usage_cost(c.usage) for c in answered]
    overshoot_allowed = sum(max(0.0, cost - worst) for cost in costs)
    assert overshoot_allowed == 0.0
    spent = sum(costs)
    assert spent <= limit + overshoot_allowed
    assert book.snapshot()[0][2] == pytest.approx(spent, rel=1e-9)
    assert book.reserved() == 0.0
    assert not violations, violations[:3]
    await proxy.ledger.flush()
    rows = await proxy.ledger.rows()
    assert sum(r.status == 200 for r in rows) == len(answered)
    assert sum(r.status == 429 for r in rows) == len(refused)
    assert sum(r.cost_usd for r in rows) == pytest.approx(spent, abs=1e-9 * len(rows))


async def test_a_restart_keeps_the_spend(make_proxy, tmp_path, clock):
    path = tmp_path / "restart.sqlite3"
    keys = "keys:\n  - {name: bot, key_env: BOT_KEY, daily_usd: 0.001}\n  - {name: ops, key_env: OPS_KEY}\n"
    env = {
        "TEST_OPENROUTER_KEY": "sk-or-test-upstream-secret-0123456789",
        "TEST_OPENAI_KEY": "sk-or-test-upstream-secret-0123456789",
        "BOT_KEY": "bot-secret",
        "OPS_KEY": "ops-secret",
    }
    extra = budget_block(DAILY) + keys
    first = await make_proxy(MODELS, extra=extra, ledger_path=path, env=env, clock=clock)
    bot, ops = first.client(api_key="bot-secret"), first.client(api_key="ops-secret")
    spent = 0.0
    # bot: answers cut at 16 tokens, so what it spends is mostly the answer, which its reservation
    # covers nearly one for one: three of them take it past 80% of its $0.001, the third still fitting.
    for client, messages, max_tokens in [(bot, HELLO, 16)] * 3 + [(ops, FILLER, 1)] * 6:
        _, completion = await ask(client, "anthropic/claude-sonnet-4.5", messages, max_tokens=max_tokens)
        spent += usage_cost(completion.usage)
    assert 0.4 <= spent / DAILY < 0.6
    headers, completion = await ask(ops, "quality", max_tokens=5)
    spent += usage_cost(completion.usage)
    assert headers["x-proxy-downgrade"] == "quality->balanced (step 0 at 40%)"
    book = first.book
    before = {(scope, window): spent for scope, window, spent, _ in book.snapshot()}
    fractions = {key: book.fraction(key, clock()) for key in (None, "bot", "ops")}
    assert fractions["bot"] >= 0.8 > fractions[None] >= 0.4
    await first.server.close()  # runs the app's cleanup: the ledger is closed

    second = await make_proxy(MODELS, extra=extra, ledger_path=path, env=env, clock=clock)
    book = second.book
    after = {(scope, window): spent for scope, window, spent, _ in book.snapshot()}
    assert after.keys() == before.keys()
    for scope_window, amount in before.items():
        assert after[scope_window] == pytest.approx(amount, abs=1e-8), scope_window
    assert after[("", "daily")] == pytest.approx(spent, abs=1e-8)
    for key, fraction in fractions.items():
        assert book.fraction(key, clock()) == pytest.approx(fraction, abs=1e-5)
    # The same steps apply: the global one for ops, the key's own (80%: "*" -> cheap) for bot.
    headers, completion = await ask(second.client(api_key="ops-secret"), "quality", max_tokens=5)
    assert completion.model == CHAIN_MODEL["balanced"]
    assert headers["x-proxy-downgrade"] == "quality->balanced (step 0 at 40%)"
    headers, completion = await ask(second.client(api_key="bot-secret"), "quality", max_tokens=5)
    assert completion.model == CHAIN_MODEL["cheap"]
    assert headers["x-proxy-downgrade"] == "quality->cheap (step 2 at 80%)"
    # And the key's own budget: what is left of bot's $0.001 does not cover 2000 tokens on cheap.
    with pytest.raises(openai.RateLimitError) as refused:
        await ask(second.client(api_key="bot-secret"), "quality", max_tokens=2000)
    assert_budget_refusal(refused.value, clock(), limit="$0.001", scope="the daily budget of key 'bot'")


async def test_a_stream_cut_midway_is_still_billed(make_proxy, emulator):
    proxy = await make_proxy(MODELS)
    emulator.state.faults.set(CHAIN_MODEL["balanced"], Fault(drop_midstream=True, after_chunks=3))
    stream = await proxy.client().chat.completions.create(
        model="balanced",
        stream=True,
        messages=[{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}],
    )
    received = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) >= 3 and all(c.usage is None for c in received)
    rows = await proxy.ledger.rows()  # committed before the stream's end was sent
    assert len(rows) == 1
    row = rows[0]
    assert row.cost_usd > 0 and row.cost_source == "estimate"
    assert row.completion_tokens > 0 and row.prompt_tokens > 0
    assert row.model == CHAIN_MODEL["balanced"] and row.streamed and row.error == "stream_interrupted"
    assert proxy.book.snapshot()[0][2] == pytest.approx(row.cost_usd, abs=1e-9)


async def _disconnect_midstream(proxy, emulator):
    emulator.state.faults.set(CHAIN_MODEL["balanced"], Fault(chunk_delay_s=0.2))
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{proxy.url}/v1/chat/completions",
            json={
                "model": "balanced",
                "stream": True,
                "messages": [
                    {"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}
                ],
            },
        )
        for _ in range(3):  # the role chunk and two content chunks
            await response.content.readuntil(b"\n\n")
        response.close()
    ledger = proxy.ledger

    async def recorded() -> list:
        await ledger.flush()
        return await ledger.rows()

    rows = await wait_for(recorded, message="no ledger row for the request the client hung up on")
    assert len(rows) == 1, "no ledger row for the request the client hung up on"
    return rows[0]


@pytest.mark.realtime  # the emulator's real pauses between chunks keep the stream going when the client leaves
async def test_a_client_that_hangs_up_midstream_is_billed(make_proxy, emulator):
    proxy = await make_proxy(MODELS)
    row = await _disconnect_midstream(proxy, emulator)
    assert row.cost_usd > 0 and row.cost_source == "estimate"
    assert row.status == 499 and row.error == "client_disconnected" and row.streamed
    await wait_for(lambda: proxy.book.snapshot()[0][2] > 0)


@pytest.mark.realtime  # the emulator's real pauses between chunks keep the stream going when the client leaves
async def test_a_client_that_hangs_up_midstream_pays_for_the_text_it_was_sent(make_proxy, emulator):
    proxy = await make_proxy(MODELS)
    row = await _disconnect_midstream(proxy, emulator)
    assert row.completion_tokens > 0


async def test_a_restart_keeps_the_spend_under_an_injected_clock(make_proxy, tmp_path):
    path = tmp_path / "clock.sqlite3"
    later = Clock(time.time() + 2 * 86_400)  # e.g. a test pinning "the day after tomorrow"
    first = await make_proxy(MODELS, extra=budget_block(DAILY), ledger_path=path, clock=later)
    _, completion = await ask(first.client(), "quality", max_tokens=5)
    spent = usage_cost(completion.usage)
    assert first.book.snapshot()[0][2] == pytest.approx(spent)
    await first.server.close()
    second = await make_proxy(MODELS, extra=budget_block(DAILY), ledger_path=path, clock=later)
    assert second.book.snapshot()[0][2] == pytest.approx(spent, abs=1e-9)
