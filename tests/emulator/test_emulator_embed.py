"""The emulator's embeddings, legacy completions and automatic prompt caching, over real sockets:
both wire shapes (OpenRouter's under /api/v1, OpenAI's under /v1), faults, and the bill."""

from __future__ import annotations

import array
import base64
import json
import math
from typing import Any

import jsonschema
import orjson
import pytest

from proxy.emulator import EMULATOR_STATE, Fault, create_emulator_app
from proxy.emulator.billing import text_tokens
from tests.support.apis import completion_chunk_validator

AUTH = {"Authorization": "Bearer sk-or-v1-test"}
NOW = 1_790_000_000.0
SMALL = "openai/text-embedding-3-small"
MINI = "openai/gpt-4o-mini"


@pytest.fixture(scope="module")
def chunk_validator() -> jsonschema.Draft202012Validator:
    return completion_chunk_validator()


@pytest.fixture
def app():
    return create_emulator_app(clock=lambda: NOW)


@pytest.fixture
def state(app):
    return app[EMULATOR_STATE]


@pytest.fixture
async def client(aiohttp_client, app):
    return await aiohttp_client(app)


def sse(raw: bytes) -> tuple[list[str], list[Any]]:
    """(comments, data payloads) of a whole SSE body; [DONE] stays a string."""
    comments, data = [], []
    for event in raw.decode().split("\n\n")[:-1]:
        if event.startswith(":"):
            comments.append(event)
        else:
            payload = event.removeprefix("data: ")
            data.append(payload if payload == "[DONE]" else json.loads(payload))
    return comments, data


def floats(encoded: str) -> list[float]:
    return array.array("f", base64.b64decode(encoded)).tolist()


# ---------------------------------------------------------------- embeddings


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_embeddings_in_each_wire_shape(client, state, openai_api_schemas, prefix):
    response = await client.post(f"{prefix}/embeddings", json={"model": SMALL, "input": "the lamp"}, headers=AUTH)
    assert response.status == 200
    body = await response.json()
    openai_api_schemas.validate("CreateEmbeddingResponse", body)
    (bill,) = state.bills.values()
    assert response.headers["X-Generation-Id"] == bill.id and bill.id.startswith("gen-emb-")
    assert (bill.model, bill.prompt_tokens, bill.completion_tokens) == (SMALL, text_tokens(len(b"the lamp")), 0)
    assert bill.cost == pytest.approx(bill.prompt_tokens * 2e-8, rel=1e-12)
    assert len(body["data"][0]["embedding"]) == 1536
    assert math.isclose(sum(v * v for v in body["data"][0]["embedding"]), 1.0, rel_tol=1e-9)
    if prefix == "/api/v1":  # OpenRouter's: the generation id, the provider and the cost
        assert (body["id"], body["provider"], body["usage"]["cost"]) == (bill.id, "OpenAI", bill.cost)
    else:  # OpenAI's: none of those
        assert set(body) == {"object", "data", "model", "usage"} and set(body["usage"]) == {
            "prompt_tokens",
            "total_tokens",
        }


async def test_embeddings_are_deterministic_and_base64_is_the_same_vector(client):
    async def embed(**fields: Any) -> list[Any]:
        response = await client.post("/api/v1/embeddings", json={"model": SMALL, **fields}, headers=AUTH)
        return [item["embedding"] for item in (await response.json())["data"]]

    first, second, other = await embed(input=["fog", "fog", "storm"])
    assert first == second and first != other
    (encoded,) = await embed(input="fog", encoding_format="base64")
    assert floats(encoded) == pytest.approx(first, abs=1e-7)  # float32 of the same vector
    (short,) = await embed(input="fog", dimensions=8)
    assert len(short) == 8


async def test_embedding_tokens_per_input_kind(client, state):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}}
    inputs = ["héllo wörld", [101, 2023, 102], {"content": [{"type": "text", "text": "a caption"}, image]}]
    response = await client.post("/api/v1/embeddings", json={"model": SMALL, "input": inputs}, headers=AUTH)
    assert response.status == 200 and len((await response.json())["data"]) == 3
    (bill,) = state.bills.values()
    assert bill.prompt_tokens == text_tokens(len("héllo wörld".encode())) + 3 + text_tokens(9) + 765


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/api/v1/embeddings", {"model": MINI, "input": "x"}, "is not an embeddings model"),
        ("/api/v1/embeddings", {"model": SMALL}, "Input required"),
        ("/api/v1/embeddings", {"model": SMALL, "input": ""}, "Input required"),
        ("/api/v1/embeddings", {"model": SMALL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ("/api/v1/chat/completions", {"model": SMALL, "messages": [{"role": "user", "content": "x"}]}, "embeddings"),
        ("/api/v1/completions", {"model": SMALL, "prompt": "x"}, "embeddings model"),
        ("/api/v1/completions", {"model": MINI}, "`prompt`"),
    ],
)
async def test_requests_to_the_wrong_kind_of_model_are_refused(client, state, path, body, message):
    response = await client.post(path, json=body, headers=AUTH)
    assert response.status == 400
    assert message in (await response.json())["error"]["message"]
    assert state.bills == {}


async def test_embedding_models_have_a_list_of_their_own(client):
    async def ids(path: str) -> set[str]:
        return {entry["id"] for entry in (await (await client.get(path)).json())["data"]}

    embedding = await ids("/api/v1/embeddings/models")
    assert {SMALL, "qwen/qwen3-embedding-8b", "text-embedding-3-small"} <= embedding
    text = await ids("/api/v1/models")
    assert MINI in text and not embedding & text  # /models lists text models, as OpenRouter's does
    assert await ids("/api/v1/models?output_modalities=embeddings") == embedding
    assert await ids("/api/v1/models?output_modalities=all") == embedding | text


async def test_an_armed_fault_fails_an_embeddings_request(client, state):
    state.faults.set(SMALL, Fault(status=503, times=1))
    failed = await client.post("/api/v1/embeddings", json={"model": SMALL, "input": "x"}, headers=AUTH)
    assert failed.status == 503 and (await failed.json())["error"]["metadata"]["provider_name"] == "OpenAI"
    assert (await client.post("/api/v1/embeddings", json={"model": SMALL, "input": "x"}, headers=AUTH)).status == 200
    assert len(state.bills) == 1


# ---------------------------------------------------------------- legacy completions


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_a_whole_completion_in_each_wire_shape(client, state, openai_api_schemas, prefix):
    prompt = "Once upon a time, a lighthouse keeper"
    response = await client.post(f"{prefix}/completions", json={"model": MINI, "prompt": prompt}, headers=AUTH)
    body = await response.json()
    openai_api_schemas.validate("CreateCompletionResponse", body)
    (bill,) = state.bills.values()
    assert body["id"] == bill.id == response.headers["X-Generation-Id"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"].startswith(f"[{MINI}] You said:")
    assert body["usage"]["prompt_tokens"] == bill.prompt_tokens == text_tokens(len(orjson.dumps(prompt)))
    assert ("cost" in body["usage"], "provider" in body) == ((prefix == "/api/v1"),) * 2


async def test_an_openrouter_stream_of_text_chunks(client, state, chunk_validator):
    body = {"model": MINI, "prompt": "Tell me about the sea", "stream": True}
    whole = await (await client.post("/api/v1/completions", json={**body, "stream": False}, headers=AUTH)).json()
    comments, data = sse(await (await client.post("/api/v1/completions", json=body, headers=AUTH)).read())
    assert comments == [": OPENROUTER PROCESSING"] and data[-1] == "[DONE]"
    chunks = data[:-1]
    for chunk in chunks:
        chunk_validator.validate(chunk)
        assert chunk["provider"] == "OpenAI"
    *texts, usage = chunks
    assert "".join(c["choices"][0]["text"] for c in texts) == whole["choices"][0]["text"]
    assert texts[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["cost"] == state.bills[usage["id"]].cost


@pytest.mark.parametrize("include_usage", [False, True])
async def test_an_openai_stream_has_usage_only_when_asked(client, chunk_validator, include_usage):
    body = {"model": "gpt-4o-mini", "prompt": "Hi", "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    comments, data = sse(await (await client.post("/v1/completions", json=body, headers=AUTH)).read())
    assert comments == [] and data[-1] == "[DONE]"
    for chunk in data[:-1]:
        chunk_validator.validate(chunk)
    with_usage = [c for c in data[:-1] if c.get("usage")]
    if include_usage:
        assert [c["choices"] for c in with_usage] == [[]] and "cost" not in with_usage[0]["usage"]
        assert data[-2] is with_usage[0]  # the last chunk
    assert all("usage" not in c for c in data[:-1] if c["choices"])


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_a_broken_completion_stream_ends_with_the_error_and_bills_what_was_sent(client, state, prefix):
    state.faults.set(MINI, Fault(midstream_error=True, after_chunks=2, message="boom"))
    body = {"model": MINI, "prompt": "Tell me a long story about the storm", "stream": True}
    _, data = sse(await (await client.post(f"{prefix}/completions", json=body, headers=AUTH)).read())
    assert data[-1]["error"]["message"] == "boom" and "[DONE]" not in data
    sent = "".join(c["choices"][0]["text"] for c in data[:-1])
    (bill,) = state.bills.values()
    assert bill.completion_tokens == text_tokens(len(sent.encode())) and bill.finish_reason == "error"
    if prefix == "/api/v1":  # OpenRouter's error chunk still has the stream's shape
        assert data[-1]["choices"][0]["finish_reason"] == "error" and data[-1]["id"] == bill.id
    else:
        assert set(data[-1]) == {"error"}


# ---------------------------------------------------------------- automatic prompt caching


async def test_a_top_level_cache_control_caches_whole_prompts_on_anthropic_models(client, state):
    system = {"role": "system", "content": "You keep the lighthouse log. " * 8}
    turns = [
        [system, {"role": "user", "content": "Any ships?"}],
        [system, {"role": "user", "content": "Any ships?"}, {"role": "assistant", "content": "One."}],
    ]
    turns.append([*turns[1], {"role": "user", "content": "Which?"}])
    model = "anthropic/claude-3-haiku"
    for messages in turns:
        body = {"model": model, "messages": messages, "cache_control": {"type": "ephemeral"}}
        assert (await client.post("/api/v1/chat/completions", json=body, headers=AUTH)).status == 200
    first, second, third = state.bills.values()
    prefix = [text_tokens(len(orjson.dumps(turn))) for turn in turns]
    assert (first.cached_tokens, first.cache_write_tokens) == (0, first.prompt_tokens)
    assert (second.cached_tokens, second.cache_write_tokens) == (prefix[0], second.prompt_tokens - prefix[0])
    assert (third.cached_tokens, third.cache_write_tokens) == (prefix[1], third.prompt_tokens - prefix[1])

    state.prompt_cache.clear()  # without it, the system message alone is cached (the implicit rule)
    for messages in turns[:2]:
        await client.post("/api/v1/chat/completions", json={"model": model, "messages": messages}, headers=AUTH)
    fourth, fifth = list(state.bills.values())[3:]
    assert fourth.cached_tokens == 0 and 0 < fifth.cached_tokens < second.cached_tokens
