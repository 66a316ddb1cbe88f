"""Pure routing: features in, ordered plan out. Every rule kind, as a table."""

import pytest

from proxy.config import parse_config
from proxy.core.breakers import BlockView
from proxy.core.features import RequestFeatures, extract_features
from proxy.core.routing import Block, Router, Target, UnknownModel

CONFIG = parse_config("""
upstreams:
  openrouter: {base_url: https://openrouter.ai/api/v1}
  openai: {base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY}
models:
  cheap: {chain: [mistralai/mistral-7b-instruct, {model: gpt-4o-mini, upstream: openai}]}
  balanced: {chain: [google/gemini-2.5-flash]}
  quality: {chain: [anthropic/claude-sonnet-4.5, openai/gpt-4o-mini]}
  code: {chain: [x-ai/grok-code-fast-1]}
  vision: {chain: [google/gemini-2.5-pro]}
  structured: {chain: [openai/gpt-4o]}
  tooling: {chain: [anthropic/claude-3.5-haiku]}
  streamy: {chain: [meta-llama/llama-3.1-8b-instruct]}
  auto:
    route:
      - {when: {task: code_generation}, to: code}
      - {when: {task: [complex_analysis, research]}, to: quality}
      - {when: {has_images: true}, to: vision}
      - {when: {json_mode: true}, to: structured}
      - {when: {has_tools: true}, to: tooling}
      - {when: {last_user_message_matches: '\\btranslate\\b'}, to: balanced}
      - {when: {prompt_tokens_over: 4000}, to: balanced}
      - {when: {stream: true, prompt_tokens_under: 10}, to: streamy}
      - {to: tier2}
  tier2:
    route:
      - {when: {prompt_tokens_over: 1000}, to: balanced}
      - {to: cheap}
""")
ROUTER = Router(CONFIG)


@pytest.mark.parametrize(
    "features, owner, rule",
    [
        (RequestFeatures(task="code_generation"), "code", "models.auto.route[0]"),
        (RequestFeatures(task="research"), "quality", "models.auto.route[1]"),
        (RequestFeatures(task="complex_analysis", has_tools=True), "quality", "models.auto.route[1]"),
        (RequestFeatures(has_images=True), "vision", "models.auto.route[2]"),
        (RequestFeatures(json_mode=True), "structured", "models.auto.route[3]"),
        (RequestFeatures(has_tools=True), "tooling", "models.auto.route[4]"),
        (RequestFeatures(last_user_text="Please Translate this"), "balanced", "models.auto.route[5]"),
        (RequestFeatures(last_user_text="translated"), "cheap", "models.auto.route[8]"),
        (RequestFeatures(prompt_tokens=4001), "balanced", "models.auto.route[6]"),
        (RequestFeatures(prompt_tokens=4000), "balanced", "models.auto.route[8]"),  # over 1000: tier2's first rule
        (RequestFeatures(stream=True, prompt_tokens=5), "streamy", "models.auto.route[7]"),
        (RequestFeatures(stream=True, prompt_tokens=10), "cheap", "models.auto.route[8]"),
        (RequestFeatures(task="simple_rewrite"), "cheap", "models.auto.route[8]"),
        (RequestFeatures(), "cheap", "models.auto.route[8]"),
    ],
)
def test_auto_rules(features, owner, rule):
    plan = ROUTER.plan("auto", features)
    assert plan.chain_owner == owner
    assert plan.steps[0].rule == rule
    assert plan.targets == ROUTER.chain_of(owner)


def test_nested_route_records_every_step():
    plan = ROUTER.plan("auto", RequestFeatures(prompt_tokens=2000))
    assert [s.rule for s in plan.steps] == ["models.auto.route[8]", "models.tier2.route[0]"]
    assert plan.chain_owner == "balanced"
    assert plan.describe().startswith("auto>tier2>balanced: google/gemini-2.5-flash")


def test_chain_model_keeps_its_order_and_upstreams():
    plan = ROUTER.plan("cheap", RequestFeatures())
    assert plan.targets == (Target("mistralai/mistral-7b-instruct", "openrouter"), Target("gpt-4o-mini", "openai"))
    assert plan.steps == ()


def test_direct_slug_passes_through_to_the_direct_upstream():
    plan = ROUTER.plan("anthropic/claude-3-haiku", RequestFeatures())
    assert plan.direct and plan.targets == (Target("anthropic/claude-3-haiku", "openrouter"),)


@pytest.mark.parametrize("name", ["gpt5", "cheapp", "", "a b/c", "/x"])
def test_unknown_names_are_refused_with_the_valid_ones(name):
    with pytest.raises(UnknownModel) as caught:
        ROUTER.plan(name, RequestFeatures())
    assert "cheap" in caught.value.valid and "auto" in caught.value.valid


def test_direct_models_can_be_turned_off():
    router = Router(CONFIG.model_copy(update={"allow_direct_models": False}))
    with pytest.raises(UnknownModel):
        router.plan("anthropic/claude-3-haiku", RequestFeatures())


def test_blocked_members_are_skipped_with_their_reason():
    cool = Block("cooldown", 100.0)
    view = BlockView({"openai": Block("no_api_key")}, {Target("mistralai/mistral-7b-instruct", "openrouter"): cool})
    plan = ROUTER.plan("cheap", RequestFeatures(), view)
    assert plan.targets == ()
    assert [(str(t), b.reason) for t, b in plan.skipped] == [
        ("mistralai/mistral-7b-instruct", "cooldown"),
        ("gpt-4o-mini@openai", "no_api_key"),
    ]
    assert "skip gpt-4o-mini@openai: no_api_key" in plan.describe()


@pytest.mark.parametrize(
    "body, headers, expected",
    [
        # prompt_tokens: the upper bound, a token per byte of the messages as JSON (32 bytes for
        # [{"role":"user","content":"hi"}]) and 4 per message; prompt_estimate: four bytes a token
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            {},
            RequestFeatures(prompt_tokens=36, last_user_text="hi", prompt_estimate=8),
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "metadata": {"task": "Code_Generation"}},
            {},
            RequestFeatures(task="code_generation", prompt_tokens=35, last_user_text="x", prompt_estimate=8),
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "metadata": {"task": "a"}},
            {"X-Task-Type": "complex_analysis"},
            RequestFeatures(task="complex_analysis", prompt_tokens=35, last_user_text="x", prompt_estimate=8),
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "look"},
                            {"type": "image_url", "image_url": {"url": "data:x"}},
                        ],
                    }
                ],
                "stream": True,
                "max_tokens": 50,
            },
            {},
            # the message without its image part (59 bytes as a list), 4 for the message, 2,500 for
            # the image; typically a quarter of the bytes and 765 for the image
            RequestFeatures(
                has_images=True,
                stream=True,
                prompt_tokens=59 + 4 + 2500,
                last_user_text="look",
                max_tokens=50,
                prompt_estimate=15 + 765,
            ),
        ),
        (
            {
                "messages": [{"role": "user", "content": "a" * 400}, {"role": "assistant", "content": "ok"}],
                "response_format": {"type": "json_schema", "json_schema": {}},
                "tools": [{"type": "function"}],
            },
            {},
            RequestFeatures(
                has_tools=True,
                json_mode=True,
                # the messages (466 bytes), 4 each, the tool (21 bytes) and 16 for it, the schema (39 bytes)
                prompt_tokens=466 + 8 + 21 + 16 + 39,
                last_user_text="a" * 400,
                prompt_estimate=-(-(466 + 21) // 4),  # four bytes a token of the messages and the tool
            ),
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 7, "max_tokens": 99},
            {},
            RequestFeatures(prompt_tokens=35, last_user_text="x", max_tokens=7, prompt_estimate=8),
        ),
    ],
)
def test_feature_extraction(body, headers, expected):
    assert extract_features(body, headers) == expected
