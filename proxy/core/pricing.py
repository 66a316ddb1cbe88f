"""Prices and costs. Pure: the catalogue document comes in parsed (see `proxy.money.catalogue`).

Units: the catalogue (OpenRouter's /api/v1/models format) gives USD per TOKEN as
strings; config overrides give USD per MILLION tokens. Everything here is
converted to USD per token once, at load, so no cost is off by a factor of a
million.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from proxy.config import Pricing

PER_MILLION = 1_000_000
# When neither the upstream nor the catalogue can price a model, a request is
# still charged: at the dearest catalogue price, so it is never free by accident.
DEFAULT_MAX_COMPLETION_TOKENS = 4096


class Tokens(NamedTuple):
    """What one answer was billed for. Cached reads and cache writes are part of `prompt`, as in
    the usage of OpenAI and OpenRouter (`prompt_tokens_details.cached_tokens`/`cache_write_tokens`)."""

    prompt: int
    completion: int
    cached: int = 0  # prompt tokens read from the provider's prompt cache
    cache_write: int = 0  # prompt tokens written to it


@dataclass(frozen=True, slots=True)
class Price:
    prompt: float  # USD per prompt token
    completion: float  # USD per completion token
    request: float = 0.0  # USD per request
    context_length: int | None = None
    max_completion_tokens: int | None = None
    cache_read: float | None = None  # USD per cached prompt token; None: the prompt price
    cache_write: float | None = None  # USD per prompt token written to the cache; None: the prompt price

    def cost(self, prompt_tokens: int, completion_tokens: int, cached: int = 0, cache_write: int = 0) -> float:
        cached = min(cached, prompt_tokens)
        cache_write = min(cache_write, prompt_tokens - cached)
        fresh = prompt_tokens - cached - cache_write
        read_price = self.prompt if self.cache_read is None else self.cache_read
        write_price = self.prompt if self.cache_write is None else self.cache_write
        return (
            fresh * self.prompt
            + cached * read_price
            + cache_write * write_price
            + completion_tokens * self.completion
            + self.request
        )

    def cost_of(self, tokens: Tokens) -> float:
        return self.cost(tokens.prompt, tokens.completion, tokens.cached, tokens.cache_write)


@dataclass(frozen=True, slots=True)
class Cost:
    usd: float
    # upstream | override | catalogue | estimate (a stream cut short, from its text) | cached |
    # reserved (given up before the upstream answered: the reservation's worst case) |
    # reconciled (an estimate corrected with OpenRouter's own figure)
    source: str


@dataclass(frozen=True)
class Catalogue:
    prices: Mapping[str, Price]
    snapshot_date: str | None = None
    raw: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def parse(cls, document: Mapping[str, Any]) -> Catalogue:
        prices: dict[str, Price] = {}
        for entry in document.get("data", ()):
            pricing = entry.get("pricing") or {}
            try:
                prompt, completion = float(pricing["prompt"]), float(pricing["completion"])
            except (KeyError, TypeError, ValueError):
                continue  # a catalogue entry without usable prices cannot price anything
            if prompt < 0 or completion < 0:  # OpenRouter marks variable-price routers with -1
                continue
            top = entry.get("top_provider") or {}
            prices[entry["id"]] = Price(
                prompt,
                completion,
                float(pricing.get("request") or 0.0),
                entry.get("context_length") or top.get("context_length"),
                top.get("max_completion_tokens"),
                _optional_price(pricing.get("input_cache_read")),
                _optional_price(pricing.get("input_cache_write")),
            )
        return cls(prices, document.get("snapshot_date"), tuple(document.get("data", ())))


class PriceBook:
    def __init__(self, catalogue: Catalogue, pricing: Pricing) -> None:
        self.catalogue = catalogue
        # An override changes what a token costs, not how many tokens the model can produce:
        # keep the catalogue's caps, or worst cases of overridden models fall back to 4096 tokens.
        self._overrides: dict[str, Price] = {}
        for model, o in pricing.overrides.items():
            listed = catalogue.prices.get(model)
            self._overrides[model] = Price(
                o.prompt_usd_per_mtok / PER_MILLION,
                o.completion_usd_per_mtok / PER_MILLION,
                0.0,
                listed.context_length if listed else None,
                listed.max_completion_tokens if listed else None,
                None if o.cache_read_usd_per_mtok is None else o.cache_read_usd_per_mtok / PER_MILLION,
                None if o.cache_write_usd_per_mtok is None else o.cache_write_usd_per_mtok / PER_MILLION,
            )
        self.baseline_model = pricing.savings_baseline
        known = list(catalogue.prices.values()) + list(self._overrides.values())
        self._dearest = Price(
            max((p.prompt for p in known), default=0.0), max((p.completion for p in known), default=0.0)
        )
        # Every model's price and its source, resolved once per config snapshot (an override wins
        # over the catalogue): a request's lookups are one dictionary read each, no tuple built.
        self._resolved: dict[str, tuple[Price, str]] = {
            **{model: (price, "catalogue") for model, price in catalogue.prices.items()},
            **{model: (price, "override") for model, price in self._overrides.items()},
        }
        self._baseline = self._resolved.get(self.baseline_model)

    def lookup(self, model: str) -> tuple[Price, str] | None:
        return self._resolved.get(model)

    def price_or_dearest(self, model: str) -> Price:
        found = self._resolved.get(model)
        return found[0] if found is not None else self._dearest

    def knows(self, model: str) -> bool:
        return model in self._resolved

    def cost(
        self,
        model: str,
        tokens: Tokens,
        upstream_cost: float | None,
        *,
        estimated: bool = False,
    ) -> Cost:
        """The cost of one answer: the upstream's own figure when it gave one, else tokens x price
        (cached reads and cache writes at the catalogue's cache prices)."""
        if upstream_cost is not None and math.isfinite(upstream_cost) and upstream_cost >= 0:
            return Cost(upstream_cost, "upstream")
        found = self._resolved.get(model)
        price, source = found if found is not None else (self._dearest, "estimate")
        return Cost(price.cost_of(tokens), "estimate" if estimated else source)

    def baseline(self, tokens: Tokens) -> float:
        """What the same tokens would have cost on the savings baseline model."""
        found = self._baseline
        return found[0].cost_of(tokens) if found is not None else 0.0

    def worst_case(self, model: str, prompt_tokens: int, max_tokens: int | None) -> float:
        """The most a request can cost on `model`: for budget reservations. `max_tokens` None: as
        many completion tokens as the model may write; 0: none (an embeddings request)."""
        price = self.price_or_dearest(model)
        completion = (
            max_tokens if max_tokens is not None else price.max_completion_tokens or DEFAULT_MAX_COMPLETION_TOKENS
        )
        return price.cost(prompt_tokens, completion)


def _optional_price(value: Any) -> float | None:
    """A catalogue price that may be absent; a negative or unreadable one counts as absent."""
    try:
        price = float(value)
    except (TypeError, ValueError):
        return None
    return price if math.isfinite(price) and price >= 0 else None
