"""One emulator's state: what it was asked (recorded requests, counters), what it billed (per
generation, and the key's usage), its prompt cache and its armed faults. Tests read and poke it
directly as `app[EMULATOR_STATE]`; the handlers share it.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from .billing import CACHE_MIN_TOKENS, Bill, Charge, cacheable_prefix, message_prefixes
from .completions import ModelInfo, Reply
from .faults import FaultPlan

MAX_RECORDED = 10_000  # recorded requests kept, so a long benchmark cannot exhaust memory
_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(slots=True)
class RecordedRequest:
    path: str
    headers: CIMultiDict[str]  # as received (case-insensitive); redacted only when served over HTTP
    body: dict[str, Any]
    model: str | None


def _fresh_stats() -> dict[str, Any]:
    return {
        "requests": 0,
        "completions": 0,
        "errors": 0,
        "drops": 0,
        "streams_started": 0,
        "streams_completed": 0,
        "streams_cancelled": 0,
        "streams_failed": 0,
        "per_model": {},
    }


@dataclass(slots=True)
class EmulatorState:
    """Everything one emulator instance knows; tests read and poke it directly.

    faults: armed faults; requests: recorded chat requests (oldest trimmed past
    max_recorded, MAX_RECORDED unless told); stats: counters; key_usage: USD billed to the key so far;
    credit_limit: the key's limit reported by /key (None = unlimited); bills: every
    generation's bill, or the newest of them past `max_bills` (benchmarks).
    """

    catalogue: dict[str, Any]
    models: dict[str, ModelInfo]
    api_key: str | None
    clock: Callable[[], float]
    faults: FaultPlan = field(default_factory=FaultPlan)
    requests: list[RecordedRequest] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=_fresh_stats)
    key_usage: float = 0.0
    credit_limit: float | None = 100.0
    rng: random.Random = field(default_factory=random.Random)
    bills: dict[str, Bill] = field(default_factory=dict)  # generation id -> what it was billed
    prompt_cache: set[tuple[str, str]] = field(default_factory=set)  # (model, cached system message)
    generation_lag: int = 0  # lookups of a generation answered 404 before it is found (OpenRouter's delay)
    generation_lookups: dict[str, int] = field(default_factory=dict)
    max_bills: int | None = None  # None: every bill is kept (the tests' audits read them all)
    max_recorded: int = MAX_RECORDED  # requests kept in `requests` (a benchmark's 58 kB bodies: keep few)

    def new_id(self, created: int) -> str:
        return f"gen-{created}-{''.join(self.rng.choices(_ALPHANUMERIC, k=20))}"

    def charge(self, body: dict[str, Any], model: ModelInfo, reply: Reply) -> Charge:
        """What a whole answer to `body` is charged, reading or writing the prompt cache."""
        if model.provider == "Anthropic" and isinstance(body.get("cache_control"), dict):
            return self._auto_cached(body["messages"], model, reply)
        cached = written = 0
        prefix = cacheable_prefix(body["messages"])
        if prefix is not None:
            key = (model.id, prefix[0])
            if key in self.prompt_cache:
                cached = min(prefix[1], reply.prompt_tokens)
            else:
                self.prompt_cache.add(key)
                written = min(prefix[1], reply.prompt_tokens) if model.cache_write_price is not None else 0
        return Charge(reply.prompt_tokens, reply.completion_tokens, cached, written)

    def _auto_cached(self, messages: list[Any], model: ModelInfo, reply: Reply) -> Charge:
        """Automatic caching (a top-level `cache_control`): the longest whole-message prefix cached
        before is read, and the whole prompt is written for the next turn."""
        cached = 0
        prefixes = message_prefixes(messages)
        for text, tokens in prefixes:
            if (model.id, text) in self.prompt_cache:
                cached = min(tokens, reply.prompt_tokens)
                break
        text, tokens = prefixes[0]
        written = 0
        if (model.id, text) not in self.prompt_cache and tokens >= CACHE_MIN_TOKENS:
            self.prompt_cache.add((model.id, text))
            written = max(0, min(tokens, reply.prompt_tokens) - cached) if model.cache_write_price is not None else 0
        return Charge(reply.prompt_tokens, reply.completion_tokens, cached, written)

    def bill(
        self,
        gen_id: str,
        model: ModelInfo,
        charge: Charge,
        *,
        streamed: bool,
        cancelled: bool = False,
        finish_reason: str | None = None,
    ) -> Bill:
        """Record what one generation costs; the key's usage grows by as much."""
        cost = charge.cost(model.prices)[0]
        bill = Bill(
            gen_id,
            model.id,
            model.provider,
            self.clock(),
            streamed,
            charge.prompt_tokens,
            charge.completion_tokens,
            charge.cached_tokens,
            charge.cache_write_tokens,
            cost,
            cancelled,
            finish_reason,
        )
        self.bills[gen_id] = bill
        if self.max_bills is not None and len(self.bills) > self.max_bills:
            # A benchmark's millions of generations: keep the newest half (lookups of older ones 404).
            for old in list(itertools.islice(self.bills, len(self.bills) - self.max_bills // 2)):
                del self.bills[old]
        self.key_usage += cost
        return bill

    def record(self, request: web.Request, body: dict[str, Any], model: str | None) -> None:
        if len(self.requests) >= self.max_recorded:
            del self.requests[: max(1, self.max_recorded // 2)]
        self.requests.append(RecordedRequest(request.path, CIMultiDict(request.headers), body, model))


EMULATOR_STATE = web.AppKey("emulator_state", EmulatorState)
