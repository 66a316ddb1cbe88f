"""The emulator's bill: what it charges for each generation, kept per generation id.

Tests audit the proxy against this record, request by request, to the nano-dollar, and the
proxy's reconciliation reads it back through `GET /generation?id=` as it would OpenRouter's.

How the emulator counts and charges (pure; the handlers in `app` decide when to bill):
- tokens: a token per four UTF-8 bytes of text (the prompt counted as its messages' and tools'
  JSON), an image part `IMAGE_TOKENS` whatever its size;
- prompt caching: a system message (the first message, role `system` or `developer`) of at least
  `CACHE_MIN_TOKENS` is written to the model's cache the first time, and read from it after; on an
  Anthropic model, a request with a top-level `cache_control` (OpenRouter's automatic caching)
  reads the longest whole-message prefix cached before and writes its whole prompt instead;
  cached and written tokens are part of `prompt_tokens`, as OpenAI and OpenRouter report them,
  and are charged at the catalogue's `input_cache_read` / `input_cache_write` prices;
- a request answered whole is billed whole; a non-streamed one even when its client hung up
  (the model finished it); a stream cut short, by the provider or by a client that hung up, is
  billed for its prompt and the text it had sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

IMAGE_TOKENS = 765  # what OpenAI bills a 1024x1024 image in high detail (85 + 4 tiles x 170)
CACHE_MIN_TOKENS = 64
IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def text_tokens(size: int) -> int:
    """ceil(bytes / 4): the emulator's tokenizer for `size` UTF-8 bytes of text."""
    return -(-size // 4)


def prompt_tokens(messages: list[Any], tools: Any = None) -> int:
    """The prompt's tokens: its messages (and tools) as JSON, image parts at `IMAGE_TOKENS` each."""
    images = 0
    kept: list[Any] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(_is_image(part) for part in content):
            images += sum(1 for part in content if _is_image(part))
            message = {**message, "content": [part for part in content if not _is_image(part)]}
        kept.append(message)
    size = len(orjson.dumps(kept)) + (len(orjson.dumps(tools)) if tools else 0)
    return text_tokens(size) + IMAGE_TOKENS * images


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def cacheable_prefix(messages: list[Any]) -> tuple[str, int] | None:
    """The system message a provider would cache (its JSON, its tokens), or None."""
    first = messages[0] if messages else None
    if not isinstance(first, dict) or first.get("role") not in ("system", "developer"):
        return None
    text = orjson.dumps(first).decode()
    tokens = text_tokens(len(text.encode()))
    return (text, tokens) if tokens >= CACHE_MIN_TOKENS else None


def message_prefixes(messages: list[Any]) -> list[tuple[str, int]]:
    """Each whole-message prefix of the prompt (its JSON, its tokens), the whole prompt first: what
    automatic caching (a top-level `cache_control` on an Anthropic model) can read back."""
    prefixes = []
    for end in range(len(messages), 0, -1):
        text = orjson.dumps(messages[:end]).decode()
        prefixes.append((text, text_tokens(len(text.encode()))))
    return prefixes


@dataclass(frozen=True, slots=True)
class Prices:
    prompt: float
    completion: float
    cache_read: float | None = None  # None: the model has no cache-read price (reads cost the prompt price)
    cache_write: float | None = None  # None: writes are not charged apart (nor reported)


@dataclass(frozen=True, slots=True)
class Charge:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    def cost(self, prices: Prices) -> tuple[float, float, float]:
        """(total, prompt part, completion part) in USD."""
        fresh = self.prompt_tokens - self.cached_tokens - self.cache_write_tokens
        read = prices.prompt if prices.cache_read is None else prices.cache_read
        write = prices.prompt if prices.cache_write is None else prices.cache_write
        prompt = fresh * prices.prompt + self.cached_tokens * read + self.cache_write_tokens * write
        completion = self.completion_tokens * prices.completion
        return prompt + completion, prompt, completion


@dataclass(slots=True)
class Bill:
    """One generation as the emulator billed it."""

    id: str
    model: str
    provider: str
    created: float  # epoch seconds
    streamed: bool
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    cost: float
    cancelled: bool = False
    finish_reason: str | None = None


def generation_data(bill: Bill) -> dict[str, Any]:
    """`data` of OpenRouter's GET /generation?id= for a generation billed as `bill`."""
    return {
        "id": bill.id,
        "upstream_id": "chatcmpl-" + bill.id.removeprefix("gen-"),
        "total_cost": bill.cost,
        "cache_discount": None,
        "upstream_inference_cost": bill.cost,
        "created_at": datetime.fromtimestamp(bill.created, UTC).isoformat(),
        "model": bill.model,
        "app_id": None,
        "streamed": bill.streamed,
        "cancelled": bill.cancelled,
        "provider_name": bill.provider,
        "latency": 0,
        "moderation_latency": None,
        "generation_time": 0,
        "finish_reason": bill.finish_reason,
        "native_finish_reason": bill.finish_reason,
        "tokens_prompt": bill.prompt_tokens,
        "tokens_completion": bill.completion_tokens,
        "native_tokens_prompt": bill.prompt_tokens,
        "native_tokens_completion": bill.completion_tokens,
        "native_tokens_completion_images": 0,
        "native_tokens_reasoning": 0,
        "native_tokens_cached": bill.cached_tokens,
        "num_media_prompt": None,
        "num_input_audio_prompt": None,
        "num_media_completion": 0,
        "num_search_results": 0,
        "origin": "",
        "usage": bill.cost,
        "is_byok": False,
        "external_user": None,
        "api_type": "completions",
        "router": None,
    }


def billed_total(bills: Mapping[str, Bill]) -> float:
    return sum(bill.cost for bill in bills.values())
