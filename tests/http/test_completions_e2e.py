"""POST /v1/completions (legacy text completions) end to end, streamed and not: the official openai
SDK -> the proxy -> the emulator in both wire shapes. Every answer and chunk against OpenAI's
schema; naive `chunk.choices[0]` loops; fallback; a budget refusal; the ledger against the
emulator's bill; cut streams estimated, and reconciled where the upstream is OpenRouter."""

from __future__ import annotations

from typing import Any

import aiohttp
import jsonschema
import openai
import pytest

from proxy.emulator import Fault
from proxy.http.appkeys import METRICS
from tests.support.apis import completion_chunk_validator
from tests.support.audit import billed_nano, booked_nano, settled

MISTRAL, LLAMA = "mistralai/mistral-7b-instruct", "meta-llama/llama-3.1-8b-instruct"
MODELS = f"""
models:
  cheap: {{chain: [{MISTRAL}, {LLAMA}]}}
  oa: {{chain: [{{model: gpt-4o-mini, upstream: openai}}]}}
  embed: {{kind: embeddings, chain: [openai/text-embedding-3-small]}}
"""
PROMPT = "Once upon a time, on a rock in a stormy sea, a lighthouse keeper"
FAST = (0.02, 0.05, 0.1, 0.2, 0.5)  # the reconciliation schedule, sped up


@pytest.fixture(scope="module")
def chunk_schema() -> jsonschema.Draft202012Validator:
    return completion_chunk_validator()


@pytest.fixture
async def proxy(make_proxy):
    return await make_proxy(MODELS, reconcile_schedule=FAST)


def dump(item: Any) -> dict[str, Any]:
    return item.model_dump(exclude_unset=True)


async def test_a_whole_completion_through_the_sdk(proxy, emulator, openai_api_schemas):
    raw = await proxy.client().completions.with_raw_response.create(model="cheap", prompt=PROMPT, max_tokens=50)
    completion = raw.parse()
    openai_api_schemas.validate("CreateCompletionResponse", dump(completion))
    assert completion.model == MISTRAL and completion.choices[0].text.startswith(f"[{MISTRAL}] You said:")
    assert raw.headers["x-proxy-route"] == f"cheap: {MISTRAL}=ok"
    (seen,) = emulator.state.requests
    assert (seen.path, seen.body) == ("/api/v1/completions", {"model": MISTRAL, "prompt": PROMPT, "max_tokens": 50})
    rows = await settled(proxy)
    assert [(r.api, r.cost_source, r.generation_id) for r in rows] == [("completions", "upstream", completion.id)]
    assert booked_nano(rows) == billed_nano(emulator)
    assert (rows[0].prompt_tokens, rows[0].completion_tokens) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )


@pytest.mark.parametrize("model", ["cheap", "oa"])  # OpenRouter's wire shape, and OpenAI's
async def test_a_naive_choices0_loop_over_a_stream_runs_clean(proxy, emulator, chunk_schema, model):
    stream = await proxy.client().completions.create(model=model, prompt=PROMPT, stream=True)
    text = ""
    async for chunk in stream:  # what most clients write: no check that `choices` is not empty
        chunk_schema.validate(dump(chunk))
        text += chunk.choices[0].text
        assert chunk.usage is None
    whole = await proxy.client().completions.create(model=model, prompt=PROMPT)
    assert text == whole.choices[0].text
    rows = await settled(proxy)
    assert [r.cost_source for r in rows] == ["upstream" if model == "cheap" else "catalogue"] * 2
    assert rows[0].cost_usd == rows[1].cost_usd > 0  # the stream was billed from the usage the client never saw
    if model == "oa":  # the proxy asked the OpenAI upstream for usage the client had not asked for
        assert emulator.state.requests[0].body["stream_options"] == {"include_usage": True}
    assert booked_nano(rows) == billed_nano(emulator)


@pytest.mark.parametrize("model", ["cheap", "oa"])
async def test_include_usage_brings_the_usage_chunk(proxy, emulator, chunk_schema, model):
    stream = await proxy.client().completions.create(
        model=model, prompt=PROMPT, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    for chunk in chunks:
        chunk_schema.validate(dump(chunk))
    *texts, last = chunks
    assert last.choices == [] and last.usage is not None and all(c.choices for c in texts)
    (bill,) = emulator.state.bills.values()
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (bill.prompt_tokens, bill.completion_tokens)


async def test_openrouters_own_path_is_served_too(proxy, emulator, openai_api_schemas):
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{proxy.url}/api/v1/completions", json={"model": "cheap", "prompt": PROMPT})
        body = await response.json()
    openai_api_schemas.validate("CreateCompletionResponse", body)
    assert response.headers["x-proxy-model"] == MISTRAL and body["choices"][0]["text"]


async def test_an_explicit_include_usage_false_is_honoured_on_an_openai_upstream(proxy, emulator):
    body = {"model": "oa", "prompt": PROMPT, "stream": True, "stream_options": {"include_usage": False}}
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{proxy.url}/v1/completions", json=body)
        raw = await response.read()
    assert raw.endswith(b"data: [DONE]\n\n") and b'"choices":[]' not in raw and b'"usage"' not in raw
    (row,) = await settled(proxy)
    assert row.cost_source == "catalogue" and row.completion_tokens > 0  # billed from the usage it stripped


async def test_a_503_falls_back_to_the_next_member(proxy, emulator):
    emulator.state.faults.set(MISTRAL, Fault(status=503))
    raw = await proxy.client().completions.with_raw_response.create(model="cheap", prompt=PROMPT, stream=True)
    assert raw.headers["x-proxy-route"] == f"cheap: {MISTRAL}=http_503,http_503 {LLAMA}=ok"
    texts = [chunk.choices[0].text async for chunk in raw.parse()]
    assert "".join(texts).startswith(f"[{LLAMA}]")
    rows = await settled(proxy)
    assert [(r.model, r.attempts, r.api) for r in rows] == [(LLAMA, 3, "completions")]
    assert booked_nano(rows) == billed_nano(emulator)


async def test_a_budget_refusal_is_an_openai_error(make_proxy, emulator, openai_api_schemas):
    proxy = await make_proxy(MODELS, extra="budget: {daily_usd: 0.0001}\n")
    with pytest.raises(openai.RateLimitError) as refused:
        await proxy.client().completions.create(model="cheap", prompt=PROMPT)  # 16,384 tokens at worst
    openai_api_schemas.validate("ErrorResponse", refused.value.response.json())
    assert refused.value.body["code"] == "budget_exceeded" and "daily budget" in refused.value.body["message"]
    assert refused.value.response.headers["retry-after"]
    completion = await proxy.client().completions.create(model="cheap", prompt=PROMPT, max_tokens=20)
    assert completion.choices[0].text  # a bounded request fits
    assert emulator.state.requests[-1].body["max_tokens"] == 20 and len(emulator.state.bills) == 1


async def test_an_embeddings_model_refuses_a_completion_and_the_reverse(proxy, emulator):
    with pytest.raises(openai.BadRequestError) as refused:
        await proxy.client().completions.create(model="embed", prompt=PROMPT)
    assert "'embed' is an embeddings model" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as missing:
        await proxy.client().post("/completions", body={"model": "cheap"}, cast_to=object)
    assert missing.value.body["param"] == "prompt"
    assert emulator.state.requests == []


async def test_a_stream_cut_by_openrouter_is_estimated_then_reconciled(proxy, emulator):
    emulator.state.generation_lag = 1  # OpenRouter does not know the generation for a moment
    emulator.state.faults.set(MISTRAL, Fault(drop_midstream=True, after_chunks=3))
    stream = await proxy.client().completions.create(model="cheap", prompt=PROMPT, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="broke off"):
        async for chunk in stream:
            received.append(chunk.choices[0].text)
    assert len(received) == 3
    await proxy.ledger.flush()
    (first,) = await proxy.ledger.rows()
    (bill,) = emulator.state.bills.values()
    assert (first.cost_source, first.error, first.generation_id) == ("estimate", "stream_interrupted", bill.id)
    (row,) = await settled(proxy)
    assert (row.cost_source, row.estimate_usd) == ("reconciled", first.cost_usd)
    assert booked_nano([row]) == billed_nano(emulator)


async def test_a_stream_cut_on_an_openai_upstream_is_billed_from_its_text(proxy, emulator):
    """No lookup exists there: the estimate (four bytes a token of the prompt and of the text that
    arrived) is the bill, which is how the emulator counts too."""
    emulator.state.faults.set("gpt-4o-mini", Fault(drop_midstream=True, after_chunks=2))
    stream = await proxy.client().completions.create(model="oa", prompt=PROMPT, stream=True)
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            assert chunk.choices[0].text
    (row,) = await settled(proxy)
    assert (row.cost_source, row.upstream, row.error) == ("estimate", "openai", "stream_interrupted")
    (bill,) = emulator.state.bills.values()
    assert (row.prompt_tokens, row.completion_tokens) == (bill.prompt_tokens, bill.completion_tokens)
    assert row.cost_usd == pytest.approx(bill.cost, abs=1e-9)


async def test_a_midstream_error_reaches_the_client_and_is_reconciled(proxy, emulator):
    emulator.state.faults.set(MISTRAL, Fault(midstream_error=True, after_chunks=1, message="provider fell over"))
    stream = await proxy.client().completions.create(model="cheap", prompt=PROMPT, stream=True)
    with pytest.raises(openai.APIError, match="provider fell over"):
        async for _ in stream:
            pass
    (row,) = await settled(proxy)
    assert (row.cost_source, row.error) == ("reconciled", "upstream_stream_error")
    assert booked_nano([row]) == billed_nano(emulator)


async def test_metrics_carry_the_completions_api_label(proxy, emulator):
    await proxy.client().completions.create(model="cheap", prompt=PROMPT)
    stream = await proxy.client().completions.create(model="cheap", prompt=PROMPT, stream=True)
    async for _ in stream:
        pass
    await settled(proxy)
    registry = proxy.app[METRICS].registry
    requests = {"virtual_model": "cheap", "model": MISTRAL, "status": "200", "api": "completions"}
    assert registry.get_sample_value("orproxy_requests_total", requests) == 2
    cost = {"virtual_model": "cheap", "model": MISTRAL, "key": "none", "api": "completions"}
    assert registry.get_sample_value("orproxy_cost_usd_total", cost) == pytest.approx(
        sum(bill.cost for bill in emulator.state.bills.values()), rel=1e-12
    )
    assert registry.get_sample_value("orproxy_requests_total", {**requests, "api": "chat"}) is None
