"""The response cache's pure rules: when a request may use it, its key, what may be stored,
the policy from the config, and the stored form of an answer. No IO (see `proxy.cache.store`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

# Request fields that cannot change the answer. `model` is represented by the chain.
IGNORED_FIELDS = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "metadata",
        "model",
        "safety_identifier",
        "prompt_cache_key",
        "store",
    }
)
_KEY_PREFIX = b"orproxy-cache/1\n"  # bump when the canonical form changes: old entries just stop matching


@dataclass(frozen=True, slots=True)
class CachePolicy:
    enabled: bool = True
    ttl_s: float = 86_400.0
    max_entries: int = 10_000
    max_entry_bytes: int = 1_048_576

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ttl_s) and self.ttl_s > 0):
            raise ValueError(f"cache.ttl_s must be a number of seconds > 0, got {self.ttl_s!r}")
        for name in ("max_entries", "max_entry_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"cache.{name} must be a whole number >= 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    completion: dict  # the non-streamed chat.completion object, as the upstream returned it
    model: str  # the real model that answered
    upstream: str
    cost_usd: float  # what the original request cost: what each hit saves
    prompt_tokens: int
    completion_tokens: int
    created_at: float  # epoch seconds of the original answer


def wants_cache(body: Mapping[str, Any], header: str | None) -> bool:
    """Whether this request may be answered from (and stored in) the cache."""
    if header is not None:
        switch = header.strip().lower()
        if switch == "off":
            return False
        if switch == "on":
            return True
    temperature = body.get("temperature")
    # type(), not isinstance(): `false` is an int in Python but not a temperature.
    return type(temperature) in (int, float) and temperature == 0


def cache_key(body: Mapping[str, Any], chain: Sequence[str]) -> str:
    """sha256 hex of the request's canonical form and the ordered chain of real models."""
    request = {name: _canonical_number(value) for name, value in body.items() if name not in IGNORED_FIELDS}
    canonical = orjson.dumps({"chain": list(chain), "request": request}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(_KEY_PREFIX + canonical).hexdigest()


def _canonical_number(value: Any) -> Any:
    # `"temperature": 0.0` and `0` ask the same thing; only top-level parameters are numbers
    # worth normalising, and below 2**53 the integer is exact.
    if type(value) is float and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def cacheable(completion: Any) -> bool:
    """An answer, not an error: `choices` present and non-empty, no `error`, no choice that errored."""
    if not isinstance(completion, dict) or "error" in completion:
        return False
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(choice, dict) and choice.get("finish_reason") != "error" for choice in choices)


def storable(answer: CachedAnswer, policy: CachePolicy) -> tuple[bytes | None, str]:
    """The stored form of an answer, or None and why it may not be stored."""
    if not cacheable(answer.completion):
        return None, "not a successful completion"
    if not (math.isfinite(answer.cost_usd) and answer.cost_usd >= 0):
        return None, f"cost_usd {answer.cost_usd!r} is not a finite number >= 0"
    payload = encode_answer(answer)
    if len(payload) > policy.max_entry_bytes:
        return None, f"{len(payload)} bytes exceed max_entry_bytes {policy.max_entry_bytes}"
    return payload, ""


def encode_answer(answer: CachedAnswer) -> bytes:
    return orjson.dumps(
        {
            "completion": answer.completion,
            "model": answer.model,
            "upstream": answer.upstream,
            "cost_usd": answer.cost_usd,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "created_at": answer.created_at,
        }
    )


def decode_answer(payload: bytes) -> CachedAnswer:
    stored = orjson.loads(payload)
    return CachedAnswer(
        completion=stored["completion"],
        model=stored["model"],
        upstream=stored["upstream"],
        cost_usd=float(stored["cost_usd"]),
        prompt_tokens=int(stored["prompt_tokens"]),
        completion_tokens=int(stored["completion_tokens"]),
        created_at=float(stored["created_at"]),
    )
