"""The Responses API's money, audited: the emulator's own bill against the ledger and `orproxy report
--by api`, to the nano-dollar; the budget refusing in OpenAI's shape; the `api` label in the
metrics; streams cut short estimated, then reconciled with what OpenRouter billed (an OpenAI
upstream has no lookup: its cut streams stay estimates, from the prompt as sent and the text seen)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.emulator import Fault
from proxy.money.ledger_rows import to_nano
from tests.support.audit import billed_nano, booked_nano, report_json, settled
from tests.support.gateway import proxy_config_text
from tests.support.money import CHAIN_MODEL, MODELS, budget_block, seed_ledger, seed_row
from tests.support.responses import check_event, events_of
from tests.support.timing import wait_for

FAST = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # the lookup schedule, sped up
OA = "  oa: {chain: [{model: gpt-4o-mini, upstream: openai}]}\n"
BODY = MODELS + OA + "  haiku: {chain: [anthropic/claude-3-haiku]}\n"
BALANCED, TINY = CHAIN_MODEL["balanced"], CHAIN_MODEL["tiny"]
KEEPER = "You keep the lighthouse's log; answer as the log would, in the log's own words. " * 6
IMAGE = {"type": "input_image", "image_url": "data:image/png;base64," + "iVBORw0KGgo" * 500, "detail": "auto"}
TOOL = {
    "type": "function",
    "name": "log_weather",
    "parameters": {"type": "object", "properties": {"wind": {"type": "string"}}, "required": ["wind"]},
}
STORY = "Tell the whole story of the wreck, please, from the first wave to the last."


async def drain(stream: Any) -> list[Any]:
    return [event async for event in stream]


async def stream_body(proxy, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as session, session.post(f"{proxy.url}/v1/responses", json=body) as response:
        assert response.status == 200
        return await response.read()


async def test_the_ledger_and_the_report_match_the_bill_to_the_nano_dollar(make_proxy, emulator, tmp_path):
    config, ledger = tmp_path / "config.yaml", tmp_path / "ledger.sqlite3"
    text = proxy_config_text(emulator.url, BODY)
    config.write_text(text)
    proxy = await make_proxy(config_text=text, ledger_path=ledger, reconcile_schedule=FAST)
    client = proxy.client()
    create = client.responses.create
    state = emulator.state

    # Prompts a character count misjudges, an image, tools and a tool's result, both upstreams,
    # whole answers and streams; a long system prompt read again from the provider's cache.
    await create(model="balanced", input="灯台守と嵐の物語を聞かせてください。" * 5)
    await drain(await create(model="cheap", input="🌊⛈️🏝️🔦 what a night " * 8, stream=True))
    await create(model="tiny", input=[{"role": "user", "content": "\x01\x02\x1b log entry \x7f" * 10}])
    question = [{"type": "input_text", "text": "What ship is this?"}, IMAGE]
    await create(model="quality", input=[{"role": "user", "content": question}])
    call = (await create(model="cheap", input="Record the wind.", tools=[TOOL])).output[0]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "West, force 8"}
    await create(model="cheap", input=[{"role": "user", "content": "Record the wind."}, call.model_dump(), result])
    await create(model="oa", input="Is the lamp lit? ✨", tools=[TOOL])
    await drain(await create(model="oa", input="Describe the storm.", stream=True))
    for ask in ("Any ships tonight?", "Is the fog lifting?"):
        await create(model="haiku", instructions=KEEPER, input=ask)
        await drain(await create(model="oa", instructions=KEEPER, input=ask, stream=True))

    # Streams cut short by the upstream, and mid-stream errors, in both shapes.
    for model, fault in [
        (BALANCED, Fault(drop_midstream=True, after_chunks=2, times=1)),
        (TINY, Fault(midstream_error=True, after_chunks=1, times=1)),
        ("gpt-4o-mini", Fault(drop_midstream=True, after_chunks=3, times=1)),
        ("gpt-4o-mini", Fault(midstream_error=True, after_chunks=2, times=1)),
    ]:
        state.faults.set(model, fault)
        virtual = {"gpt-4o-mini": "oa", TINY: "tiny"}.get(model, "balanced")
        events = await drain(await create(model=virtual, input=STORY, stream=True))
        assert events[-1].type == "error" and not any(e.type == "response.completed" for e in events)

    rows = await settled(proxy)
    billed = billed_nano(emulator)
    assert booked_nano(rows) == billed  # generation by generation
    assert {row.api for row in rows} == {"responses"}
    sources = Counter(row.cost_source for row in rows)
    assert sources == {"upstream": 8, "catalogue": 4, "reconciled": 2, "estimate": 2}
    for row in rows:  # no row bills $0 where the upstream charged something
        assert row.cost_usd > 0 and row.generation_id in state.bills
    assert sum(row.cached_tokens > 0 for row in rows) == 2 and sum(row.cache_write_tokens > 0 for row in rows) == 1

    report = await report_json(config, ledger, "--period", "month", "--by", "api")
    (group,) = report["rows"]
    assert group["group"] == "responses" and group["requests"] == len(rows) == len(billed)
    assert to_nano(group["cost_usd"]) == to_nano(report["total"]["cost_usd"]) == sum(billed.values())


async def test_a_budget_refusal_comes_in_openais_shape(make_proxy, tmp_path, openai_api_schemas, emulator):
    ledger = tmp_path / "ledger.sqlite3"
    await seed_ledger(ledger, seed_row("earlier", 0.0049))  # $0.0049 of a $0.005 day spent
    proxy = await make_proxy(MODELS, extra="budget: {daily_usd: 0.005}\n", ledger_path=ledger)
    client = proxy.client()
    # The worst case of 200 output tokens of tiny fits in what is left; 200,000 do not.
    assert (await client.responses.create(model="tiny", input="Hi", max_output_tokens=200)).status == "completed"
    with pytest.raises(openai.RateLimitError) as refused:
        await client.responses.create(model="tiny", input="Hi", max_output_tokens=200_000)
    exc = refused.value
    assert (exc.type, exc.code) == ("insufficient_quota", "budget_exceeded")
    assert "the daily budget" in exc.message and "of $0.005" in exc.message
    assert int(exc.response.headers["retry-after"]) >= 1
    openai_api_schemas.validate("ErrorResponse", exc.response.json())
    assert len(emulator.state.requests) == 1  # the refused request never went upstream


async def test_metrics_carry_the_responses_api_label(make_proxy, emulator):
    proxy = await make_proxy(MODELS)
    client = proxy.client()
    usage = (await client.responses.create(model="cheap", input="Hi")).usage
    await drain(await client.responses.create(model="cheap", input="Hi again", stream=True))
    await client.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "Hi"}])
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/metrics") as response:
        text = await response.text()
    model = CHAIN_MODEL["cheap"]
    assert f'orproxy_requests_total{{api="responses",model="{model}",status="200",virtual_model="cheap"}} 2.0' in text
    assert f'orproxy_requests_total{{api="chat",model="{model}",status="200",virtual_model="cheap"}} 1.0' in text
    assert 'orproxy_request_duration_seconds_count{api="responses",virtual_model="cheap"} 2.0' in text
    assert f'orproxy_cost_usd_total{{api="responses",key="none",model="{model}",virtual_model="cheap"}}' in text
    prompt = [line for line in text.splitlines() if line.startswith("orproxy_tokens_total{") and "responses" in line]
    assert f'orproxy_tokens_total{{api="responses",kind="prompt",model="{model}"}}' in "\n".join(prompt)
    assert usage.input_tokens > 0


async def test_a_cut_stream_is_estimated_then_reconciled_with_what_openrouter_billed(
    make_proxy, emulator, openai_api_schemas
):
    emulator.state.generation_lag = 1  # OpenRouter does not know the generation at once
    proxy = await make_proxy(MODELS, reconcile_schedule=FAST)
    emulator.state.faults.set(BALANCED, Fault(drop_midstream=True, after_chunks=2))
    body = await stream_body(proxy, {"model": "balanced", "input": STORY, "stream": True})
    events = [data for _, data in events_of(body)]
    for event in events:
        check_event(openai_api_schemas, event)
    # Two deltas passed, then the proxy's own error event, numbered after them.
    assert [e["type"] for e in events].count("response.output_text.delta") == 2
    error = events[-1]
    assert (error["type"], error["code"]) == ("error", "stream_interrupted")
    assert error["sequence_number"] == events[-2]["sequence_number"] + 1
    assert body.endswith(b"\n\ndata: " + orjson.dumps(error) + b"\n\n")  # a bare data line, as OpenRouter's

    await proxy.ledger.flush()
    (first,) = await proxy.ledger.rows()
    assert (first.cost_source, first.error, first.api) == ("estimate", "stream_interrupted", "responses")
    assert first.generation_id == events[0]["response"]["id"]  # noted from response.created
    assert first.completion_tokens > 0  # the text that did arrive is billed
    rows = await settled(proxy)
    (row,) = rows
    (bill,) = emulator.state.bills.values()
    assert (row.cost_source, row.estimate_usd) == ("reconciled", first.cost_usd)
    assert booked_nano(rows) == billed_nano(emulator)
    assert (row.prompt_tokens, row.completion_tokens) == (bill.prompt_tokens, bill.completion_tokens)
    assert proxy.book.snapshot()[0][2] == pytest.approx(bill.cost, abs=1e-12)  # the budget, corrected too


async def test_an_upstream_error_event_reaches_the_client_and_is_reconciled(make_proxy, emulator, openai_api_schemas):
    proxy = await make_proxy(MODELS, reconcile_schedule=FAST)
    emulator.state.faults.set(TINY, Fault(midstream_error=True, after_chunks=1, message="The model overheated"))
    body = await stream_body(proxy, {"model": "tiny", "input": STORY, "stream": True})
    events = [data for _, data in events_of(body)]
    for event in events:
        check_event(openai_api_schemas, event)
    assert events[-1]["type"] == "error" and events[-1]["message"] == "The model overheated"
    assert [e["type"] for e in events].count("error") == 1  # the upstream's, passed on; nothing added
    rows = await settled(proxy)
    (row,) = rows
    assert (row.error, row.cost_source) == ("upstream_stream_error", "reconciled")
    assert booked_nano(rows) == billed_nano(emulator)


async def test_an_openai_shaped_stream_cut_short_is_billed_from_its_text(make_proxy, emulator):
    """No lookup exists on an OpenAI upstream: the row stays an estimate, four bytes a token of the
    prompt as sent (instructions, input, tools) and of the text that arrived, as the emulator counts."""
    proxy = await make_proxy(MODELS + OA, reconcile_schedule=FAST)
    emulator.state.faults.set("gpt-4o-mini", Fault(drop_midstream=True, after_chunks=3))
    stream = await proxy.client().responses.create(
        model="oa", instructions="Answer as a sailor.", input=[{"role": "user", "content": STORY}], stream=True
    )
    events = await drain(stream)
    assert [e.type for e in events].count("response.output_text.delta") == 3 and events[-1].type == "error"
    rows = await settled(proxy)
    (row,) = rows
    assert (row.cost_source, row.upstream, row.reconcile_tries) == ("estimate", "openai", 0)
    assert booked_nano(rows) == billed_nano(emulator)


@pytest.mark.realtime  # the emulator's real pauses between events keep the stream going when the client leaves
async def test_a_client_gone_midstream_is_reconciled_to_the_partial_bill(make_proxy, emulator):
    proxy = await make_proxy(MODELS, reconcile_schedule=FAST)
    emulator.state.faults.set(BALANCED, Fault(chunk_delay_s=0.1))
    async with aiohttp.ClientSession() as session:
        body = {"model": "balanced", "stream": True, "input": STORY}
        response = await session.post(f"{proxy.url}/v1/responses", json=body)
        seen = b""
        while b"response.output_text.delta" not in seen:
            seen += await response.content.readuntil(b"\n\n")
        response.close()
    await wait_for(lambda: emulator.state.bills, message="the cancelled stream was never billed")
    rows = await settled(proxy)
    (row,) = rows
    (bill,) = emulator.state.bills.values()
    assert bill.cancelled and bill.completion_tokens > 0
    assert (row.status, row.error, row.cost_source, row.api) == (499, "client_disconnected", "reconciled", "responses")
    assert booked_nano(rows) == billed_nano(emulator)
    assert orjson.loads(seen.split(b"data: ", 1)[1].split(b"\n", 1)[0])["response"]["id"] == row.generation_id


@pytest.mark.realtime  # the emulator's real latency holds the stream back until the client has left
async def test_a_client_gone_before_the_stream_opened_is_booked(make_proxy, emulator):
    """An OpenAI-shaped upstream sends nothing before its first event: the client gives up while the
    proxy waits. The proxy still takes that first read (the generation is known from the
    X-Generation-Id header), closes the stream and books the prompt the upstream billed."""
    proxy = await make_proxy(MODELS + OA, reconcile_schedule=FAST)
    emulator.state.faults.set("gpt-4o-mini", Fault(latency_s=0.3, chunk_delay_s=0.3))
    with pytest.raises(openai.APITimeoutError):
        await proxy.client(timeout=0.1).responses.create(model="oa", instructions="Be brief.", input=STORY, stream=True)
    await wait_for(lambda: emulator.state.bills, message="the abandoned stream was never billed")
    rows = await settled(proxy)
    (row,) = rows
    (bill,) = emulator.state.bills.values()
    assert bill.cancelled and bill.prompt_tokens > 0 and bill.completion_tokens == 0
    assert (row.status, row.error, row.cost_source, row.api) == (499, "client_disconnected", "estimate", "responses")
    assert (row.model, row.generation_id) == ("gpt-4o-mini", bill.id)
    assert booked_nano(rows) == billed_nano(emulator)


async def test_the_budgets_downgrade_steps_apply(make_proxy, tmp_path):
    ledger = tmp_path / "ledger.sqlite3"
    await seed_ledger(ledger, seed_row("earlier", 0.045))  # 45% of a $0.10 day: the 40% step applies
    proxy = await make_proxy(MODELS, extra=budget_block(0.10), ledger_path=ledger)
    raw = await proxy.client().responses.with_raw_response.create(model="quality", input="Hi", max_output_tokens=50)
    assert raw.parse().model == BALANCED
    assert raw.headers["x-proxy-downgrade"] == "quality->balanced (step 0 at 40%)"
