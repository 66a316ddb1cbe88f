"""POST /v1/embeddings end to end: the official openai SDK -> the proxy -> the emulator, real sockets.
Embeddings virtual models (`kind: embeddings`), fallback, budgets, keys, the ledger against the
emulator's bill to the nano-dollar, and the `api` label."""

from __future__ import annotations

import aiohttp
import openai
import orjson
import pytest

from proxy.emulator import Fault
from proxy.http.appkeys import METRICS
from tests.support.audit import billed_nano, booked_nano, settled

SMALL, QWEN = "openai/text-embedding-3-small", "qwen/qwen3-embedding-8b"
MODELS = f"""
models:
  embed:
    kind: embeddings
    chain: [{SMALL}, {QWEN}, {{model: text-embedding-3-small, upstream: openai}}]
  cheap: {{chain: [mistralai/mistral-7b-instruct]}}
  quality: {{chain: [anthropic/claude-sonnet-4.5]}}
"""
HELLO = [{"role": "user", "content": "hello"}]
STEPPED = 'budget: {daily_usd: 10, downgrade: [{at: 0.000001, map: {"*": cheap}}]}\n'  # in force after a request
DOCUMENTS = ["The keeper lit the lamp at dusk.", "灯台守は夜明けに灯を消した。", "🌊⛈️🏝️🔦"]


@pytest.fixture
async def proxy(make_proxy):
    return await make_proxy(MODELS)


async def test_embeddings_through_the_sdk_are_served_billed_and_schema_valid(proxy, emulator, openai_api_schemas):
    raw = await proxy.client().embeddings.with_raw_response.create(model="embed", input=DOCUMENTS)
    result = raw.parse()  # the SDK asked for base64 (its default) and decoded it
    openai_api_schemas.validate("CreateEmbeddingResponse", result.model_dump(exclude_unset=True))
    assert [len(item.embedding) for item in result.data] == [1536] * 3 and result.model == SMALL
    assert raw.headers["x-proxy-virtual-model"] == "embed" and raw.headers["x-proxy-model"] == SMALL
    assert raw.headers["x-proxy-route"] == f"embed: {SMALL}=ok"
    (seen,) = emulator.state.requests
    assert seen.path == "/api/v1/embeddings"
    assert seen.body == {"model": SMALL, "input": DOCUMENTS, "encoding_format": "base64"}

    float_answer = await proxy.client().embeddings.with_raw_response.create(
        model="embed", input="The keeper", encoding_format="float", dimensions=64
    )
    body = orjson.loads(float_answer.content)
    openai_api_schemas.validate("CreateEmbeddingResponse", body)  # the bytes as they reached the client
    assert len(body["data"][0]["embedding"]) == 64

    rows = await settled(proxy)
    assert [(r.api, r.model, r.cost_source, r.completion_tokens) for r in rows] == [
        ("embeddings", SMALL, "upstream", 0)
    ] * 2
    assert booked_nano(rows) == billed_nano(emulator)  # generation by generation, to the nano-dollar
    assert [r.prompt_tokens for r in rows] == [b.prompt_tokens for b in emulator.state.bills.values()]
    assert all(r.baseline_cost_usd == r.cost_usd for r in rows)  # no savings claimed against a chat model


async def test_a_503_falls_back_to_the_next_embedding_model_then_to_the_openai_upstream(proxy, emulator):
    emulator.state.faults.set(SMALL, Fault(status=503))
    raw = await proxy.client().embeddings.with_raw_response.create(model="embed", input="storm")
    assert raw.parse().model == QWEN
    assert raw.headers["x-proxy-route"] == f"embed: {SMALL}=http_503,http_503 {QWEN}=ok"

    emulator.state.faults.set(QWEN, Fault(status=503))
    raw = await proxy.client().embeddings.with_raw_response.create(model="embed", input="storm")
    assert raw.parse().model == "text-embedding-3-small" and raw.headers["x-proxy-attempts"] == "5"
    assert emulator.state.requests[-1].path == "/v1/embeddings"

    rows = await settled(proxy)
    assert [(r.model, r.upstream, r.cost_source) for r in rows] == [
        (QWEN, "openrouter", "upstream"),
        ("text-embedding-3-small", "openai", "catalogue"),  # OpenAI's answer has no cost: priced by tokens
    ]
    bills = {bill.model: bill for bill in emulator.state.bills.values()}
    assert booked_nano(rows[:1]) == {bills[QWEN].id: billed_nano(emulator)[bills[QWEN].id]}
    openai_bill = bills["text-embedding-3-small"]  # OpenAI's answer carries no generation id to match on
    assert round(rows[1].cost_usd * 1e9) == round(openai_bill.cost * 1e9) > 0
    assert rows[1].prompt_tokens == openai_bill.prompt_tokens


@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/v1/embeddings"])
async def test_each_kind_of_request_is_refused_by_the_other_kind_of_model(proxy, emulator, openai_api_schemas, path):
    with pytest.raises(openai.BadRequestError) as chat_to_embed:
        await proxy.client().chat.completions.create(model="embed", messages=HELLO)
    message = chat_to_embed.value.body["message"]
    assert "'embed' is an embeddings model" in message and "Use a chat model: cheap, quality." in message
    assert chat_to_embed.value.body["param"] == "model"

    async with aiohttp.ClientSession() as http:  # the raw route, both prefixes, in OpenAI's error shape
        response = await http.post(f"{proxy.url}{path}", json={"model": "cheap", "input": "x"})
        body = await response.json()
    openai_api_schemas.validate("ErrorResponse", body)
    assert response.status == 400 and body["error"]["code"] == "model_kind_mismatch"
    assert (
        "'cheap' is a chat model" in body["error"]["message"]
        and "an embeddings model: embed." in (body["error"]["message"])
    )
    assert emulator.state.requests == []  # refused before anything went upstream


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "embed"}, "input"),
        ({"model": "embed", "input": ""}, "input"),
        ({"model": "embed", "input": []}, "input"),
        ({"model": "embed", "input": [["not", "tokens"]]}, "input[0]"),
        ({"model": "embed", "input": "x", "stream": True}, "stream"),
        ({"model": "embed", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
async def test_bad_bodies_name_the_parameter(proxy, emulator, body, param):
    with pytest.raises(openai.BadRequestError) as refused:
        await proxy.client().post("/embeddings", body=body, cast_to=object)
    assert refused.value.body["param"] == param
    assert emulator.state.requests == []


async def test_a_budget_refusal_is_an_openai_error_and_an_input_reserves_no_completion(make_proxy, emulator):
    # $0.000001 a day: an embedding of a few words reserves its input alone (about $1e-7) and fits;
    # a chat request's worst case (the model's whole completion cap) does not.
    proxy = await make_proxy(MODELS, extra="budget: {daily_usd: 0.000001}\n")
    client = proxy.client()
    await client.embeddings.create(model="embed", input="a few words")
    with pytest.raises(openai.RateLimitError) as chat_refused:
        await client.chat.completions.create(model="cheap", messages=HELLO)
    assert chat_refused.value.body["code"] == "budget_exceeded"
    with pytest.raises(openai.RateLimitError) as refused:
        await client.embeddings.create(model="embed", input="x" * 200)  # 200 tokens at most: $4e-6
    assert refused.value.body["code"] == "budget_exceeded" and refused.value.body["type"] == "insufficient_quota"
    assert "daily budget" in refused.value.body["message"]
    assert len(emulator.state.bills) == 1


async def test_budget_steps_stay_within_a_kind(make_proxy, emulator):
    proxy = await make_proxy(MODELS, extra=STEPPED)
    client = proxy.client()
    await client.chat.completions.create(model="quality", messages=HELLO)  # spend past the first step
    stepped = await client.chat.completions.with_raw_response.create(model="quality", messages=HELLO)
    assert stepped.headers["x-proxy-downgrade"].startswith("quality->cheap")
    embedded = await client.embeddings.with_raw_response.create(model="embed", input="lamp")
    assert "x-proxy-downgrade" not in embedded.headers  # "*": cheap would send it to a chat chain
    assert embedded.parse().model == SMALL


async def test_a_key_limited_to_chat_models_cannot_embed(make_proxy):
    keys = "keys: [{name: bot, key_env: BOT_KEY, models: [cheap]}]\n"
    env = {"TEST_OPENROUTER_KEY": "sk-or-test-upstream-secret-0123456789", "BOT_KEY": "bot-secret"}
    proxy = await make_proxy(MODELS, extra=keys, env=env)
    with pytest.raises(openai.PermissionDeniedError):
        await proxy.client(api_key="bot-secret").embeddings.create(model="embed", input="x")
    with pytest.raises(openai.AuthenticationError):
        await proxy.client(api_key="wrong").embeddings.create(model="embed", input="x")


async def test_metrics_carry_the_embeddings_api_label(proxy, emulator):
    await proxy.client().embeddings.create(model="embed", input=DOCUMENTS)
    await settled(proxy)
    registry = proxy.app[METRICS].registry
    labels = {"virtual_model": "embed", "model": SMALL, "status": "200", "api": "embeddings"}
    assert registry.get_sample_value("orproxy_requests_total", labels) == 1
    (bill,) = emulator.state.bills.values()
    cost = registry.get_sample_value(
        "orproxy_cost_usd_total", {"virtual_model": "embed", "model": SMALL, "key": "none", "api": "embeddings"}
    )
    assert cost == pytest.approx(bill.cost, rel=1e-12)
    tokens = {"model": SMALL, "kind": "prompt", "api": "embeddings"}
    assert registry.get_sample_value("orproxy_tokens_total", tokens) == bill.prompt_tokens


async def test_the_model_list_says_which_kind_each_virtual_model_is(proxy, openai_api_schemas):
    embed = await proxy.client().models.retrieve("embed")
    openai_api_schemas.validate("Model", embed.model_dump(exclude_unset=True))
    assert (embed.model_extra or {})["kind"] == "embeddings"
    listed = {m.id: (m.model_extra or {}).get("kind") async for m in proxy.client().models.list()}
    assert {name: listed[name] for name in ("embed", "cheap", "quality")} == {
        "embed": "embeddings",
        "cheap": "chat",
        "quality": "chat",
    }
