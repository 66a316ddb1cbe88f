"""Bursts end to end: 100 concurrent clients against a small budget. The reservation must hold
for prompts a character count misjudges (CJK, emoji, JSON-escaped control characters, images),
and the downgrade steps must count the money requests in flight have reserved."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from proxy.core.admission import worst_case
from proxy.core.features import extract_features
from proxy.emulator import Fault
from proxy.http.appkeys import RUNTIME
from tests.support.audit import billed_nano, booked_nano, settled
from tests.support.money import CHAIN_MODEL, MODELS, budget_block, usage_cost

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "iVBORw0KGgo" * 2000}}
PROMPTS: dict[str, list[dict[str, Any]]] = {
    "ascii": [{"role": "user", "content": "Count the words in this short sentence, please. " * 3}],
    "cjk": [{"role": "user", "content": "灯台守と嵐の物語を聞かせてください。海は荒れていた。" * 6}],
    "emoji": [{"role": "user", "content": "🌊⛈️🏝️🔦🚢" * 25}],
    "control": [{"role": "user", "content": "\x01\x02\x1b\x7f\x00" * 40}],
    "image": [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, IMAGE, IMAGE]}],
}


@pytest.mark.realtime  # the emulator's real latency keeps all 100 requests in flight together
@pytest.mark.parametrize("kind", PROMPTS)
async def test_100_concurrent_requests_hold_the_budget_whatever_the_prompt(make_proxy, emulator, kind):
    """The bound: spend may pass the limit only by what admitted requests cost beyond their own
    reservations; for every kind of prompt here that is nothing."""
    messages = PROMPTS[kind]
    body = {"model": "quality", "messages": messages, "max_tokens": 50}
    probe = await make_proxy(MODELS)
    policy = probe.app[RUNTIME].current.policy
    features = extract_features(body, {})
    reserved = worst_case(policy.prices, policy.router.plan("quality", features), features.prompt_tokens, 50)
    limit = round(reserved * 10.5, 9)  # room for ten reservations at a time
    proxy = await make_proxy(MODELS, extra=f"budget: {{daily_usd: {limit}, on_exhausted: reject}}\n")
    emulator.state.faults.set("*", Fault(latency_s=0.3))
    client = proxy.client(timeout=10)

    async def one() -> Any:
        try:
            return await client.chat.completions.create(**body)
        except openai.RateLimitError as exc:
            return exc

    outcomes = await asyncio.gather(*(one() for _ in range(100)))
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    assert 10 <= len(answered) < 100 and all(
        isinstance(o, openai.RateLimitError) for o in outcomes if o not in answered
    )
    costs = [usage_cost(completion.usage) for completion in answered]
    assert sum(max(0.0, cost - reserved) for cost in costs) == 0.0  # no request cost more than it reserved
    assert sum(costs) <= limit
    rows = await settled(proxy)
    assert booked_nano(rows) == billed_nano(emulator)
    assert proxy.book.reserved() == 0.0


@pytest.mark.realtime  # the emulator's real latency keeps all 100 requests in flight together
async def test_downgrade_steps_hold_under_a_burst(make_proxy, emulator):
    """Sent one at a time, the 40% step moves `quality` to `balanced` once 40% is spent. Sent all
    at once, nothing is spent yet when they are admitted: the step must see what is reserved, so
    at most 40% of the budget, plus the one reservation that crossed it, goes to the dearest chain."""
    messages = [{"role": "user", "content": "Summarise the plot of a long novel about the sea."}]
    body = {"model": "quality", "messages": messages, "max_tokens": 100}
    probe = await make_proxy(MODELS)
    policy = probe.app[RUNTIME].current.policy
    features = extract_features(body, {})
    dearest = worst_case(policy.prices, policy.router.plan("quality", features), features.prompt_tokens, 100)
    daily = round(dearest * 20, 9)
    proxy = await make_proxy(MODELS, extra=budget_block(daily))
    emulator.state.faults.set("*", Fault(latency_s=0.3))
    client = proxy.client(timeout=10)

    async def one() -> Any:
        try:
            return await client.chat.completions.with_raw_response.create(**body)
        except openai.RateLimitError as exc:
            return exc

    outcomes = await asyncio.gather(*(one() for _ in range(100)))
    answered = [o.parse() for o in outcomes if not isinstance(o, Exception)]
    by_model: dict[str, float] = {}
    for completion in answered:
        by_model[completion.model] = by_model.get(completion.model, 0.0) + usage_cost(completion.usage)
    on_quality = by_model.get(CHAIN_MODEL["quality"], 0.0)
    assert 0 < on_quality <= 0.4 * daily + dearest
    assert sum(by_model.values()) <= daily
    assert {CHAIN_MODEL["balanced"], CHAIN_MODEL["cheap"]} <= by_model.keys()  # the later steps applied too
    downgraded = [o.headers.get("x-proxy-downgrade") for o in outcomes if not isinstance(o, Exception)]
    assert sum(bool(d) for d in downgraded) >= len(answered) - 0.4 * daily / dearest - 1
    rows = await settled(proxy)
    assert booked_nano(rows) == billed_nano(emulator)
