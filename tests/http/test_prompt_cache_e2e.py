"""Prompt caching done right: `session_id` and `x-session-id` reach OpenRouter (which keeps a
conversation on one provider, its cache warm); `prompt_cache: auto` adds OpenRouter's top-level
`cache_control` for Anthropic-family members when the client marked nothing itself; cached-read and
cache-write tokens land in the ledger, equal to the emulator's bill."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.emulator import Fault
from tests.support.audit import billed_nano, booked_nano, settled

SONNET, HAIKU, FLASH = "anthropic/claude-sonnet-4.5", "anthropic/claude-3-haiku", "google/gemini-2.5-flash"
MODELS = f"""
models:
  quality:
    chain: [{SONNET}, {FLASH}, {{model: {HAIKU}, upstream: openai}}]
    prompt_cache: auto
  plain: {{chain: [{SONNET}]}}
  haiku: {{chain: [{HAIKU}], prompt_cache: auto}}
  haiku_plain: {{chain: [{HAIKU}]}}
  oa: {{chain: [{{model: gpt-4o-mini, upstream: openai}}]}}
  embed: {{kind: embeddings, chain: [openai/text-embedding-3-small]}}
"""
HELLO = [{"role": "user", "content": "hello"}]
AUTO = {"type": "ephemeral"}


async def test_session_ids_reach_openrouter_and_only_the_header_reaches_an_openai_upstream(make_proxy, emulator):
    proxy = await make_proxy(MODELS)
    client = proxy.client(default_headers={"X-Session-Id": "conversation-42"})
    session = {"session_id": "conversation-42"}
    await client.chat.completions.create(model="plain", messages=HELLO, extra_body=session)
    await client.chat.completions.create(model="oa", messages=HELLO, extra_body=session)
    await client.embeddings.create(model="embed", input="lamp")
    await client.completions.create(model="plain", prompt="Once", extra_body=session)
    plain, oa, embed, legacy = emulator.state.requests
    assert [r.headers.get("x-session-id") for r in (plain, oa, embed, legacy)] == ["conversation-42"] * 4
    assert plain.body["session_id"] == legacy.body["session_id"] == "conversation-42"
    assert "session_id" not in oa.body  # OpenAI refuses parameters it does not know


async def test_prompt_cache_auto_marks_anthropic_members_on_openrouter_only(make_proxy, emulator):
    proxy = await make_proxy(MODELS)
    emulator.state.faults.set(SONNET, Fault(status=503))
    emulator.state.faults.set(FLASH, Fault(status=503))
    reply = await proxy.client().chat.completions.with_raw_response.create(model="quality", messages=HELLO)
    assert reply.parse().model == HAIKU
    bodies = [(r.model, r.path.split("/")[1], r.body.get("cache_control")) for r in emulator.state.requests]
    assert bodies == [
        (SONNET, "api", AUTO),
        (SONNET, "api", AUTO),  # a retry sends the member's same body
        (FLASH, "api", None),  # not Anthropic: Gemini caches by itself
        (FLASH, "api", None),
        (HAIKU, "v1", None),  # an OpenAI-style upstream would refuse the field
    ]
    assert all(r.body["messages"] == HELLO for r in emulator.state.requests)


@pytest.mark.parametrize(
    ("model", "extra", "expected"),
    [
        ("plain", {}, None),  # prompt_cache is off unless a virtual model turns it on
        ("quality", {"cache_control": {"type": "ephemeral", "ttl": "1h"}}, {"type": "ephemeral", "ttl": "1h"}),
        ("quality", {"messages": "parts"}, None),  # the client's own breakpoint: left as it is
    ],
)
async def test_the_clients_own_caching_is_never_overridden(make_proxy, emulator, model, extra, expected):
    proxy = await make_proxy(MODELS)
    messages: list[dict[str, Any]] = HELLO
    if extra.get("messages") == "parts":
        part = {"type": "text", "text": "A long document.", "cache_control": {"type": "ephemeral"}}
        messages, extra = [{"role": "user", "content": [part]}], {}
    await proxy.client().chat.completions.create(model=model, messages=messages, extra_body=extra)
    (seen,) = emulator.state.requests
    assert seen.body.get("cache_control") == expected and seen.body["messages"] == messages


async def test_a_conversation_reads_its_cached_prefix_and_the_ledger_has_every_cached_token(make_proxy, emulator):
    """Three turns of one conversation, with and without `prompt_cache: auto`: with it, each turn
    reads what the one before wrote, so the conversation costs less; the ledger's cached and
    cache-write tokens and its costs are the emulator's, generation by generation."""
    proxy = await make_proxy(MODELS)
    client = proxy.client()
    costs: dict[str, float] = {}
    for model in ("haiku", "haiku_plain"):
        emulator.state.prompt_cache.clear()
        messages = [{"role": "system", "content": "You keep the lighthouse log, in full sentences. " * 6}]
        for question in ("What happened at dusk?", "And at midnight?", "And at dawn?"):
            messages.append({"role": "user", "content": f"{question} Tell it in detail, please. " * 5})
            reply = await client.chat.completions.create(model=model, messages=messages)
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        costs[model] = sum(bill.cost for bill in list(emulator.state.bills.values())[-3:])
    rows = await settled(proxy)
    bills = list(emulator.state.bills.values())
    assert [(r.cached_tokens, r.cache_write_tokens) for r in rows] == [
        (b.cached_tokens, b.cache_write_tokens) for b in bills
    ]
    auto, plain = rows[:3], rows[3:]
    assert auto[0].cached_tokens == 0 and auto[0].cache_write_tokens == auto[0].prompt_tokens
    assert all(a.cached_tokens > p.cached_tokens > 0 for a, p in zip(auto[1:], plain[1:]))
    assert booked_nano(rows) == billed_nano(emulator)
    assert costs["haiku"] < costs["haiku_plain"]
    assert [r.body.get("cache_control") for r in emulator.state.requests] == [AUTO] * 3 + [None] * 3
