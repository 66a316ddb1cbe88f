"""Pure: the embeddings and legacy completions APIs (checks, features, usage, the stream meter),
virtual model kinds in routing and budgets, prompt caching and session ids, as tables."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.config import ConfigError, parse_config
from proxy.core.apis import APIS, CHAT
from proxy.core.apis.base import has_key
from proxy.core.apis.completions import CompletionsApi
from proxy.core.apis.embeddings import EmbeddingsApi, input_size
from proxy.core.errors import InvalidRequest
from proxy.core.features import IMAGE_TOKENS, RequestFeatures
from proxy.core.pricing import Catalogue, PriceBook
from proxy.core.record import RequestRecord
from proxy.core.routing import Router
from proxy.emulator.billing import text_tokens
from proxy.emulator.embeddings import input_tokens
from proxy.money.catalogue import packaged_snapshot

EMBEDDINGS, COMPLETIONS = EmbeddingsApi(), CompletionsApi()
CONFIG = parse_config("""
upstreams:
  openrouter: {base_url: https://openrouter.ai/api/v1}
models:
  cheap: {chain: [mistralai/mistral-7b-instruct]}
  quality: {chain: [anthropic/claude-sonnet-4.5], prompt_cache: auto}
  embed: {kind: embeddings, chain: [openai/text-embedding-3-small]}
  embed_large: {kind: embeddings, chain: [openai/text-embedding-3-large]}
  auto_embed:
    kind: embeddings
    route: [{when: {prompt_tokens_over: 1000}, to: embed_large}, {to: embed}]
""")
ROUTER = Router(CONFIG)
CHAT_REQUEST, EMBEDDING_REQUEST = RequestFeatures(), RequestFeatures(kind="embeddings")


def test_every_api_is_registered_once_on_its_own_routes():
    names = [api.name for api in APIS]
    assert {"chat", "embeddings", "completions"} <= set(names) and len(names) == len(set(names))
    routes = [route for api in APIS for route in api.routes]
    assert {"/v1/embeddings", "/v1/completions"} <= set(routes) and len(routes) == len(set(routes))
    assert (EMBEDDINGS.model_kind, COMPLETIONS.model_kind, CHAT.model_kind) == ("embeddings", "chat", "chat")


# ---------------------------------------------------------------- checks: the parameter at fault


@pytest.mark.parametrize(
    ("api", "body", "param"),
    [
        (EMBEDDINGS, {"input": "x"}, "model"),
        (EMBEDDINGS, {"model": "embed"}, "input"),
        (EMBEDDINGS, {"model": "embed", "input": ""}, "input"),
        (EMBEDDINGS, {"model": "embed", "input": []}, "input"),
        (EMBEDDINGS, {"model": "embed", "input": 42.5}, "input"),
        (EMBEDDINGS, {"model": "embed", "input": ["ok", None]}, "input[1]"),
        (EMBEDDINGS, {"model": "embed", "input": [[1, 2], []]}, "input[1]"),
        (EMBEDDINGS, {"model": "embed", "input": "x", "stream": True}, "stream"),
        (EMBEDDINGS, {"model": "embed", "input": "x", "dimensions": True}, "dimensions"),
        (COMPLETIONS, {"model": "cheap"}, "prompt"),
        (COMPLETIONS, {"model": "cheap", "prompt": []}, "prompt"),
        (COMPLETIONS, {"model": "cheap", "prompt": [["a"]]}, "prompt"),
        (COMPLETIONS, {"model": "cheap", "prompt": {"text": "x"}}, "prompt"),
        (COMPLETIONS, {"model": "cheap", "prompt": "x", "stream": "yes"}, "stream"),
    ],
)
def test_bad_bodies_are_refused_naming_the_parameter(api, body, param):
    with pytest.raises(InvalidRequest) as refused:
        api.check(body)
    assert refused.value.param == param and refused.value.status == 400


@pytest.mark.parametrize(
    ("api", "body"),
    [
        (EMBEDDINGS, {"model": "embed", "input": "x"}),
        (EMBEDDINGS, {"model": "embed", "input": ["a", "b"], "dimensions": 256, "encoding_format": "base64"}),
        (EMBEDDINGS, {"model": "embed", "input": [101, 102]}),
        (EMBEDDINGS, {"model": "embed", "input": [[101], [102, 103]]}),
        (EMBEDDINGS, {"model": "embed", "input": [{"content": [{"type": "text", "text": "x"}]}]}),
        (COMPLETIONS, {"model": "cheap", "prompt": ""}),
        (COMPLETIONS, {"model": "cheap", "prompt": ["a", "b"], "stream": True}),
        (COMPLETIONS, {"model": "cheap", "prompt": [[1, 2, 3]], "suffix": "end"}),
    ],
)
def test_good_bodies_pass(api, body):
    api.check(body)


# ---------------------------------------------------------------- features: an upper bound on any tokenizer


@pytest.mark.parametrize(
    "value",
    [
        "plain ascii text",
        "灯台守は夜明けに灯を消した",  # 3 bytes a character
        "🌊⛈️🏝️🔦",  # 4 bytes a character
        "\x01\x02\x1b control \x7f",  # JSON escapes: 6 bytes each
        ["first", "second", "第三"],
        [101, 2023, 2003, 102],
        [[101, 2023], [2003, 102, 7]],
    ],
)
def test_the_input_bound_covers_every_byte_and_token_and_the_emulators_count(value):
    size = input_size(value)
    texts = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
    ids = value if isinstance(value, list) and all(isinstance(v, int) for v in value) else []
    ids += [i for v in value if isinstance(v, list) for i in v] if isinstance(value, list) else []
    # A byte-level tokenizer never makes more tokens than bytes; token ids count one each.
    assert size.bound >= sum(len(t.encode()) for t in texts) + len(ids)
    assert size.bound >= input_tokens(value) and size.estimate >= input_tokens(value) > 0
    assert size.estimate <= size.bound


def test_image_parts_of_a_multimodal_input_count_at_the_image_allowance():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    size = input_size([{"content": [{"type": "text", "text": "a cat"}, image]}])
    assert size.images == 1 and IMAGE_TOKENS < size.bound < IMAGE_TOKENS + 100  # the URL is not text


def test_embedding_features_reserve_the_input_and_no_completion():
    headers = {"X-Task-Type": " Search "}
    features = EMBEDDINGS.features({"model": "embed", "input": ["one", "two words"]}, headers)
    assert (features.kind, features.max_tokens, features.stream, features.task) == ("embeddings", 0, False, "search")
    assert features.last_user_text == "two words" and features.prompt_tokens == len(orjson.dumps("one")) + len(
        orjson.dumps("two words")
    )
    prices = PriceBook(Catalogue.parse(packaged_snapshot()), CONFIG.pricing)
    assert prices.worst_case("openai/text-embedding-3-small", 1000, 0) == pytest.approx(1000 * 2e-8)
    unknown = prices.worst_case("someone/unpriced-embedder", 1000, 0)
    assert unknown == pytest.approx(1000 * prices.price_or_dearest("someone/unpriced-embedder").prompt)
    assert prices.worst_case("someone/unpriced-embedder", 1000, None) > 20 * unknown  # a chat model's cap


@pytest.mark.parametrize(
    ("body", "max_tokens"),
    [
        ({"prompt": "x"}, None),  # the model's own cap decides
        ({"prompt": "x", "max_tokens": 100}, 100),
        ({"prompt": "x", "max_tokens": 100, "n": 3}, 300),
        ({"prompt": "x", "max_tokens": 100, "n": 2, "best_of": 5}, 500),  # best_of candidates are billed too
        ({"prompt": "x", "max_tokens": 0}, None),
        ({"prompt": ["a", "b", "c"], "max_tokens": 10, "n": 2}, 60),  # a batch: a completion per prompt
        ({"prompt": [[1, 2], [3]], "max_tokens": 10}, 20),
        ({"prompt": [1, 2, 3], "max_tokens": 10}, 10),  # one prompt, as token ids
    ],
)
def test_a_completions_worst_case_counts_every_choice(body, max_tokens):
    assert COMPLETIONS.features({"model": "cheap", **body}, {}).max_tokens == max_tokens


def test_completion_features_measure_prompt_and_suffix_as_the_emulator_does():
    body = {"model": "cheap", "prompt": "Once upon a time 🌊", "suffix": "The end.", "stream": True}
    features = COMPLETIONS.features(body, {})
    size = len(orjson.dumps(body["prompt"])) + len(orjson.dumps(body["suffix"]))
    assert features.prompt_estimate == text_tokens(size)  # the emulator's count: a cut stream is billed so
    # The bound also covers the prompt as the chat message a chat model reads: as chat's bound counts it.
    as_chat = CHAT.features({"model": "cheap", "messages": [{"role": "user", "content": body["prompt"]}]}, {})
    assert features.prompt_tokens >= as_chat.prompt_tokens + len(orjson.dumps(body["suffix"]))
    assert features.prompt_tokens >= size
    assert (features.kind, features.stream, features.last_user_text) == ("chat", True, body["prompt"])


def test_embedding_usage_has_no_completion_even_when_an_upstream_says_so():
    usage = EMBEDDINGS.usage({"usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19, "cost": 1e-7}})
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.cost_usd) == (12, 0, 1e-7)


# ---------------------------------------------------------------- the completions stream meter


def chunk(**fields: Any) -> bytes:
    return orjson.dumps({"id": "gen-1", "object": "text_completion", "provider": "Mistral", **fields})


@pytest.mark.parametrize("include_usage", [False, True])
def test_the_completions_meter_bills_text_and_usage_and_keeps_the_usage_chunk_from_who_did_not_ask(include_usage):
    record = RequestRecord("r", 0.0, "cheap", "cheap", True)
    meter = COMPLETIONS.meter(record, 10.0, {"stream_options": {"include_usage": include_usage}})
    texts = ["Once ", "upon ", "a tïme"]
    forwarded = [meter.forward(meter.see(chunk(choices=[{"text": t, "index": 0}]), 10.5)) for t in texts]
    last = meter.see(chunk(choices=[], usage={"prompt_tokens": 5, "completion_tokens": 4, "cost": 2e-6}), 11.0)
    assert forwarded == [True] * 3 and meter.forward(last) is include_usage
    assert record.streamed_text_bytes == sum(len(t.encode()) for t in texts)
    assert (record.generation_id, record.provider, record.ttft_s) == ("gen-1", "Mistral", 0.5)
    assert record.usage is not None and (record.usage.completion_tokens, record.usage.cost_usd) == (4, 2e-6)
    assert meter.see(b'{"error": {"message": "boom"}}', 12.0) is not None and record.error == "upstream_stream_error"


# ---------------------------------------------------------------- kinds in routing and budgets


@pytest.mark.parametrize(
    ("model", "features", "message"),
    [
        ("embed", CHAT_REQUEST, "'embed' is an embeddings model (models.embed.kind: embeddings): it serves POST"),
        ("auto_embed", CHAT_REQUEST, "Use a chat model: cheap, quality."),
        ("cheap", EMBEDDING_REQUEST, "'cheap' is a chat model (models.cheap.kind: chat)"),
        ("cheap", EMBEDDING_REQUEST, "Use an embeddings model: auto_embed, embed, embed_large."),
    ],
)
def test_a_request_to_the_other_kind_of_model_is_a_400_naming_the_right_kind(model, features, message):
    with pytest.raises(InvalidRequest) as refused:
        ROUTER.plan(model, features)
    assert message in refused.value.message
    assert (refused.value.param, refused.value.code) == ("model", "model_kind_mismatch")


def test_routes_and_direct_slugs_serve_their_own_kind():
    big = RequestFeatures(kind="embeddings", prompt_tokens=5000)
    assert ROUTER.plan("auto_embed", big).chain_owner == "embed_large"
    assert ROUTER.plan("auto_embed", EMBEDDING_REQUEST).chain_owner == "embed"
    assert ROUTER.plan("openai/text-embedding-3-small", EMBEDDING_REQUEST).direct  # the upstream knows its kind


@pytest.mark.parametrize(
    ("requested", "features", "rewrite", "owner", "rewrites"),
    [
        ("embed_large", EMBEDDING_REQUEST, {"*": "cheap"}, "embed_large", ()),  # "*" stays within the kind
        ("quality", CHAT_REQUEST, {"*": "cheap"}, "cheap", (("quality", "cheap"),)),
        ("openai/text-embedding-3-large", EMBEDDING_REQUEST, {"*": "cheap"}, None, ()),
        ("embed_large", EMBEDDING_REQUEST, {"*": "embed"}, "embed", (("embed_large", "embed"),)),
        ("auto_embed", RequestFeatures(kind="embeddings", prompt_tokens=5000), {"embed_large": "embed"}, "embed", None),
    ],
)
def test_budget_steps_rewrite_only_to_the_requests_kind(requested, features, rewrite, owner, rewrites):
    plan = ROUTER.plan(requested, features, rewrite=rewrite)
    assert plan.chain_owner == owner
    if rewrites is not None:
        assert plan.rewrites == rewrites


def test_the_cheapest_fallback_and_prompt_cache_follow_the_virtual_model():
    assert ROUTER.chain_models_of("embeddings") == ("embed", "embed_large")
    assert ROUTER.chain_models_of("chat") == ("cheap", "quality")
    assert ROUTER.plan("quality", CHAT_REQUEST).prompt_cache is True
    assert ROUTER.plan("quality", CHAT_REQUEST, rewrite={"quality": "cheap"}).prompt_cache is False  # cheap's own


@pytest.mark.parametrize(
    ("extra", "line", "expected"),
    [
        (
            "  e: {kind: embeddings, chain: [x/e]}\n  r: {route: [{to: e}]}\n",
            6,
            "models.r.route[0].to: routes 'r' (kind: chat) to 'e' (kind: embeddings): chat requests can only be "
            "served by chat models",
        ),
        ("  e: {kind: vectors, chain: [x/e]}\n", 5, "models.e.kind: Input should be 'chat' or 'embeddings'"),
        (
            "  e: {kind: embeddings, chain: [x/e], prompt_cache: auto}\n",
            5,
            "models.e: `prompt_cache: auto` applies to chat models",
        ),
        (
            "  e: {kind: embeddings, chain: [x/e]}\nbudget:\n  downgrade: [{at: 0.5, map: {e: cheap}}]\n",
            7,
            "budget.downgrade[0].map.e: steps 'e' (kind: embeddings) to 'cheap' (kind: chat)",
        ),
    ],
)
def test_a_config_that_mixes_kinds_is_refused_with_line_and_path(extra, line, expected):
    base = "upstreams:\n  openrouter: {base_url: https://openrouter.ai/api/v1}\nmodels:\n  cheap: {chain: [a/b]}\n"
    with pytest.raises(ConfigError) as refused:
        parse_config(base + extra, "mixed.yaml")
    rendered = str(refused.value).splitlines()
    assert any(r.startswith(f"mixed.yaml:{line}: {expected}") for r in rendered), rendered


# ---------------------------------------------------------------- prompt caching and session ids


@pytest.mark.parametrize(
    ("api", "body", "model", "kind", "added"),
    [
        (CHAT, {"messages": []}, "anthropic/claude-sonnet-4.5", "openrouter", True),
        (CHAT, {"messages": []}, "anthropic/claude-3-haiku:beta", "openrouter", True),
        (CHAT, {"messages": []}, "anthropic/claude-sonnet-4.5", "openai", False),  # OpenAI refuses the field
        (CHAT, {"messages": []}, "google/gemini-2.5-flash", "openrouter", False),  # caches implicitly
        (CHAT, {"messages": [], "cache_control": {"type": "ephemeral"}}, "anthropic/x", "openrouter", False),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "t", "cache_control": {}}]}]},
            "anthropic/x",
            "openrouter",
            False,
        ),
        (COMPLETIONS, {"prompt": "x"}, "anthropic/claude-sonnet-4.5", "openrouter", False),
        (EMBEDDINGS, {"input": "x"}, "anthropic/claude-sonnet-4.5", "openrouter", False),
    ],
)
def test_prompt_cache_is_added_for_anthropic_family_members_only(api, body, model, kind, added):
    cached = api.with_prompt_cache(body, model, kind)
    if added:
        assert cached == {**body, "cache_control": {"type": "ephemeral"}} and "cache_control" not in body
    else:
        assert cached is None


def test_has_key_finds_a_key_at_any_depth_but_not_in_values():
    assert has_key({"a": [{"b": {"cache_control": 1}}]}, "cache_control")
    assert not has_key({"a": ["cache_control", {"b": "cache_control"}]}, "cache_control")
    deep: Any = {"x": 1}
    for _ in range(200):
        deep = {"n": deep}
    assert not has_key(deep, "cache_control")  # bounded: no recursion error on a hostile body


@pytest.mark.parametrize("api", [CHAT, EMBEDDINGS, COMPLETIONS])
def test_x_session_id_is_passed_on_by_every_api_and_session_id_only_to_openrouter(api):
    assert api.upstream_headers({"x-session-id": "s-1", "Authorization": "Bearer k"}) == {"x-session-id": "s-1"}
    assert api.upstream_headers({"Authorization": "Bearer k"}) is None
    body = {"model": "m", "session_id": "s-1"}
    assert orjson.loads(api.prepare(body, "x/y", "openrouter"))["session_id"] == "s-1"
    assert "session_id" not in orjson.loads(api.prepare(body, "x/y", "openai"))


def test_an_api_with_headers_of_its_own_still_passes_the_session_on():
    class Headed(EmbeddingsApi):
        forwarded_headers = ("anthropic-version",)

    assert Headed().upstream_headers({"anthropic-version": "2023-06-01", "x-session-id": "s"}) == {
        "anthropic-version": "2023-06-01",
        "x-session-id": "s",
    }
