"""What happened to one client request: the record every sink reads, and its usage.

Pure data: the handler fills it in as the request goes, `proxy.money.accounting`
prices it once and hands it to the budget book, the ledger, the log and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.core.features import CHARS_PER_TOKEN
from proxy.core.pricing import Cost, Tokens
from proxy.core.routing import Target


@dataclass(frozen=True, slots=True)
class Attempt:
    target: Target
    outcome: str  # "ok", or the failure's reason (http_503, timeout, ...)
    status: int | None
    message: str = ""
    duration_s: float = 0.0
    retry_after: float | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None  # the upstream's own figure (OpenRouter's usage.cost), when it gave one
    cached_tokens: int = 0  # of prompt_tokens, read from the provider's prompt cache
    cache_write_tokens: int = 0  # of prompt_tokens, written to it (OpenRouter reports these)

    @classmethod
    def from_payload(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        cost = usage.get("cost")
        details = usage.get("prompt_tokens_details")
        details = details if isinstance(details, dict) else {}
        return cls(
            _int(usage.get("prompt_tokens")),
            _int(usage.get("completion_tokens")),
            float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None,
            _int(details.get("cached_tokens")),
            _int(details.get("cache_write_tokens")),
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    started_at: float  # epoch seconds
    requested_model: str
    virtual_model: str | None  # the virtual model whose chain served it (None: direct slug)
    streamed: bool
    key_name: str | None = None
    prompt_estimate: int = 0  # prompt tokens estimated from the text, for when no usage comes
    status: int = 0
    model: str | None = None  # the real model that answered
    upstream: str | None = None
    provider: str | None = None
    generation_id: str | None = None
    usage: Usage | None = None
    streamed_text_bytes: int = 0  # UTF-8 bytes of the text streamed so far: bills a stream cut before its usage
    attempts: list[Attempt] = field(default_factory=list)
    latency_s: float = 0.0
    ttft_s: float | None = None
    error: str | None = None  # a short label: the error code, or stream_interrupted / client_disconnected
    route: str = ""
    downgrade: str | None = None
    cost: Cost | None = None
    baseline_usd: float = 0.0
    cached: bool = False  # answered from the response cache
    saved_usd: float = 0.0  # a cache hit: what the answer cost when it was bought
    client_gone: bool = False  # the client hung up before its answer: booked as 499 client_disconnected
    abandoned: bool = False  # the proxy gave up before the upstream answered (shutdown): booked at the reservation
    flags: str | None = None  # figures clamped by `proxy.core.bounds`, e.g. "clamped:cost_usd"
    api: str = "chat"  # the client API it came in by (`proxy.core.apis`)
    batch_id: str | None = None  # a batch line (`proxy.batch`): its batch and custom_id
    custom_id: str | None = None
    settled: bool = False

    def note_origin(self, answer: dict[str, Any]) -> None:
        """The generation id and provider an answer (or its first stream chunk) names."""
        generation, provider = answer.get("id"), answer.get("provider")
        self.generation_id = generation if isinstance(generation, str) else None
        self.provider = provider if isinstance(provider, str) else None


def billed_tokens(record: RequestRecord) -> Tokens:
    """The upstream's usage, else an estimate: the prompt's upper bound and the text seen."""
    usage = record.usage
    if usage is not None:
        return Tokens(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens)
    if record.model is None:
        return Tokens(0, 0)
    return Tokens(record.prompt_estimate, -(-record.streamed_text_bytes // CHARS_PER_TOKEN))
