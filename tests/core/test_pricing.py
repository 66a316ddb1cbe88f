"""Pure pricing: which source prices a request, unit conversions, baselines and worst cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from proxy.config import PriceOverride, Pricing, load_config
from proxy.core.pricing import DEFAULT_MAX_COMPLETION_TOKENS, Catalogue, Cost, PriceBook, Tokens
from proxy.money.catalogue import packaged_snapshot

ROOT = Path(__file__).resolve().parent.parent.parent

# A small catalogue in OpenRouter's /api/v1/models format (per-TOKEN prices, as strings).
DOCUMENT = {
    "snapshot_date": "2026-01-01",
    "data": [
        {
            "id": "acme/small",
            "pricing": {"prompt": "0.0000001", "completion": "0.0000004"},
            "top_provider": {"context_length": 8000, "max_completion_tokens": 2000},
        },
        {
            "id": "acme/large",
            "pricing": {"prompt": "0.000002", "completion": "0.00001", "request": "0.001"},
            "context_length": 200000,
            "top_provider": {"max_completion_tokens": None},
        },
        {"id": "acme/router", "pricing": {"prompt": "-1", "completion": "-1"}},  # variable price: skipped
        {"id": "acme/broken", "pricing": {"prompt": "n/a", "completion": "0.1"}},  # unusable: skipped
        {"id": "acme/none"},  # no pricing: skipped
    ],
}
CATALOGUE = Catalogue.parse(DOCUMENT)
OVERRIDES = {
    "acme/small": PriceOverride(prompt_usd_per_mtok=3.0, completion_usd_per_mtok=15.0),
    "private/model": PriceOverride(prompt_usd_per_mtok=0.5, completion_usd_per_mtok=50.0),
}


def book(overrides=None, baseline: str = "acme/small") -> PriceBook:
    return PriceBook(CATALOGUE, Pricing(savings_baseline=baseline, overrides=overrides or {}))


def test_catalogue_parses_per_token_prices_and_skips_unpriceable_entries():
    assert set(CATALOGUE.prices) == {"acme/small", "acme/large"}
    small, large = CATALOGUE.prices["acme/small"], CATALOGUE.prices["acme/large"]
    assert (small.prompt, small.completion, small.request) == (1e-7, 4e-7, 0.0)
    assert (small.context_length, small.max_completion_tokens) == (8000, 2000)
    assert (large.request, large.context_length, large.max_completion_tokens) == (0.001, 200000, None)
    assert CATALOGUE.snapshot_date == "2026-01-01"


def test_packaged_catalogue_is_dated_and_prices_every_model_of_the_example_config():
    catalogue = Catalogue.parse(packaged_snapshot())
    assert catalogue.snapshot_date
    config = load_config(ROOT / "config.yaml")
    chain_models = {m.model for vm in config.models.values() for m in vm.chain or ()}
    assert chain_models <= set(catalogue.prices), chain_models - set(catalogue.prices)
    assert config.pricing.savings_baseline in catalogue.prices
    assert catalogue.prices["anthropic/claude-sonnet-4.5"].prompt == pytest.approx(3e-6)  # per token, not per Mtok


@pytest.mark.parametrize(
    "overrides, model, prompt, completion, upstream, expected",
    [
        # the upstream's own figure wins over everything
        ({}, "acme/small", 1000, 1000, 0.123, Cost(0.123, "upstream")),
        (OVERRIDES, "acme/small", 1000, 1000, 0.0, Cost(0.0, "upstream")),
        (OVERRIDES, "unknown/x", 1000, 1000, 0.5, Cost(0.5, "upstream")),
        # no usable upstream figure: the override (per MILLION tokens) beats the catalogue (per token)
        (OVERRIDES, "acme/small", 1_000_000, 0, None, Cost(3.0, "override")),
        (OVERRIDES, "acme/small", 0, 1_000_000, None, Cost(15.0, "override")),
        (OVERRIDES, "acme/small", 1, 1, None, Cost(0.000003 + 0.000015, "override")),
        (OVERRIDES, "private/model", 2_000_000, 10, None, Cost(1.0 + 10 * 0.00005, "override")),
        ({}, "acme/small", 1000, 500, None, Cost(1000 * 1e-7 + 500 * 4e-7, "catalogue")),
        ({}, "acme/large", 10, 10, None, Cost(10 * 2e-6 + 10 * 1e-5 + 0.001, "catalogue")),  # per-request price
        # broken upstream figures are ignored, not trusted
        ({}, "acme/small", 1000, 0, -1.0, Cost(1000 * 1e-7, "catalogue")),
        ({}, "acme/small", 1000, 0, math.nan, Cost(1000 * 1e-7, "catalogue")),
        ({}, "acme/small", 1000, 0, math.inf, Cost(1000 * 1e-7, "catalogue")),
        # unknown to everyone: priced at the dearest known prices, never free
        ({}, "unknown/x", 1000, 100, None, Cost(1000 * 2e-6 + 100 * 1e-5, "estimate")),
        (OVERRIDES, "unknown/x", 1000, 100, None, Cost(1000 * 3e-6 + 100 * 5e-5, "estimate")),
    ],
)
def test_cost_sources(overrides, model, prompt, completion, upstream, expected):
    cost = book(overrides).cost(model, Tokens(prompt, completion), upstream)
    assert cost.source == expected.source
    assert cost.usd == pytest.approx(expected.usd, rel=1e-12, abs=0)


def test_a_cost_estimated_from_streamed_text_says_so():
    cost = book().cost("acme/small", Tokens(100, 10), None, estimated=True)
    assert cost == Cost(pytest.approx(100 * 1e-7 + 10 * 4e-7), "estimate")
    assert cost.usd > 0


@pytest.mark.parametrize(
    "baseline, overrides, prompt, completion, expected",
    [
        ("acme/small", {}, 1000, 100, 1000 * 1e-7 + 100 * 4e-7),
        ("acme/small", OVERRIDES, 1000, 100, 1000 * 3e-6 + 100 * 1.5e-5),
        ("acme/large", {}, 0, 0, 0.001),
        ("nobody/knows", {}, 1000, 100, 0.0),  # no baseline price: no savings claimed
    ],
)
def test_baseline(baseline, overrides, prompt, completion, expected):
    assert book(overrides, baseline).baseline(Tokens(prompt, completion)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "model, overrides, prompt, max_tokens, expected",
    [
        # max_tokens given: it caps the completion
        ("acme/small", {}, 100, 50, 100 * 1e-7 + 50 * 4e-7),
        # else the model's own completion cap
        ("acme/small", {}, 100, None, 100 * 1e-7 + 2000 * 4e-7),
        # else 4096 tokens
        ("acme/large", {}, 100, None, 100 * 2e-6 + DEFAULT_MAX_COMPLETION_TOKENS * 1e-5 + 0.001),
        ("private/model", OVERRIDES, 0, None, DEFAULT_MAX_COMPLETION_TOKENS * 5e-5),
        # unknown model: dearest prices
        ("unknown/x", {}, 10, 10, 10 * 2e-6 + 10 * 1e-5),
        ("unknown/x", {}, 0, None, DEFAULT_MAX_COMPLETION_TOKENS * 1e-5),
    ],
)
def test_worst_case(model, overrides, prompt, max_tokens, expected):
    assert book(overrides).worst_case(model, prompt, max_tokens) == pytest.approx(expected)


def test_an_override_keeps_the_catalogue_completion_cap():
    """Overriding a price changes what a token costs, not how many tokens the model can produce."""
    prices = book(OVERRIDES)
    assert prices.worst_case("acme/small", 0, None) == pytest.approx(2000 * 1.5e-5)


def test_worst_case_is_never_below_a_real_answer_within_max_tokens():
    prices = book()
    for model in ("acme/small", "acme/large", "unknown/x"):
        for completion in (0, 1, 49, 50):
            assert prices.cost(model, Tokens(100, completion), None).usd <= prices.worst_case(model, 100, 50) + 1e-15
