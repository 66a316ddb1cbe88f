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
from typing import Any

from proxy.config import Pricing

PER_MILLION = 1_000_000
# When neither the upstream nor the catalogue can price a model, a request is
# still charged: at the dearest catalogue price, so it is never free by accident.
DEFAULT_MAX_COMPLETION_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class Price:
    prompt: float  # USD per prompt token
    completion: float  # USD per completion token
    request: float = 0.0  # USD per request
    context_length: int | None = None
    max_completion_tokens: int | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.prompt + completion_tokens * self.completion + self.request


@dataclass(frozen=True, slots=True)
class Cost:
    usd: float
    source: str  # upstream | override | catalogue | estimate


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
            )
        self.baseline_model = pricing.savings_baseline
        known = list(catalogue.prices.values()) + list(self._overrides.values())
        self._dearest = Price(
            max((p.prompt for p in known), default=0.0), max((p.completion for p in known), default=0.0)
        )

    def lookup(self, model: str) -> tuple[Price, str] | None:
        if model in self._overrides:
            return self._overrides[model], "override"
        price = self.catalogue.prices.get(model)
        return (price, "catalogue") if price is not None else None

    def price_or_dearest(self, model: str) -> Price:
        found = self.lookup(model)
        return found[0] if found else self._dearest

    def cost(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        upstream_cost: float | None,
        *,
        estimated: bool = False,
    ) -> Cost:
        """The cost of one answer: the upstream's own figure when it gave one, else tokens x price."""
        if upstream_cost is not None and math.isfinite(upstream_cost) and upstream_cost >= 0:
            return Cost(upstream_cost, "upstream")
        found = self.lookup(model)
        price, source = found if found else (self._dearest, "estimate")
        return Cost(price.cost(prompt_tokens, completion_tokens), "estimate" if estimated else source)

    def baseline(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What the same tokens would have cost on the savings baseline model."""
        found = self.lookup(self.baseline_model)
        return found[0].cost(prompt_tokens, completion_tokens) if found else 0.0

    def worst_case(self, model: str, prompt_tokens: int, max_tokens: int | None) -> float:
        """The most a request can cost on `model`: for budget reservations."""
        price = self.price_or_dearest(model)
        completion = max_tokens or price.max_completion_tokens or DEFAULT_MAX_COMPLETION_TOKENS
        return price.cost(prompt_tokens, completion)
