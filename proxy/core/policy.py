"""The pure half of a config snapshot: everything a decision reads, built once per config.

A request takes the `Policy` of the snapshot it started on and keeps it to the end, so a
reload never changes the rules halfway through a request. The long-lived state it reads
(spend counters) is shared between snapshots and passed in at build time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import Config
from proxy.core.budget import SpendBook, SpendCounters
from proxy.core.keys import KeyRing
from proxy.core.pricing import Catalogue, PriceBook
from proxy.core.routing import Router

OTHER, DIRECT, UNKNOWN, NO_KEY = "other", "direct", "unknown", "none"


@dataclass(frozen=True, slots=True)
class Labels:
    """Metric label values stay bounded: a virtual model label is a configured name (else
    `direct` for a real slug, `unknown` for a 404), a model label a configured chain member
    (else `other`), a key label a configured key name (else `none`)."""

    virtual_models: frozenset[str]
    models: frozenset[str]
    keys: frozenset[str]

    @classmethod
    def of(cls, config: Config) -> Labels:
        return cls(
            frozenset(config.models),
            frozenset(m.model for vm in config.models.values() for m in vm.chain or ()),
            frozenset(k.name for k in config.keys),
        )

    def virtual(self, requested: str, answered: bool) -> str:
        if requested in self.virtual_models:
            return requested
        return DIRECT if answered else UNKNOWN

    def model(self, model: str | None) -> str:
        return model if model in self.models else (OTHER if model else "none")

    def key(self, key: str | None) -> str:
        return key if key in self.keys else NO_KEY


@dataclass(frozen=True, slots=True, eq=False)
class Policy:
    config: Config
    router: Router
    prices: PriceBook
    book: SpendBook  # this config's limits and steps, over the shared counters
    keys: KeyRing
    labels: Labels

    @classmethod
    def build(cls, config: Config, catalogue: Catalogue, env: Mapping[str, str], counters: SpendCounters) -> Policy:
        return cls(
            config,
            Router(config),
            PriceBook(catalogue, config.pricing),
            SpendBook(config.budget, config.keys, counters=counters),
            KeyRing(config.keys, env),
            Labels.of(config),
        )
