"""What happened to one client request, priced once and handed to every sink:
the budget book, the ledger (awaited: the row is committed before the answer
completes), the access log and the metrics read the same record."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.core.budget import Refusal, Reservation, SpendBook
from proxy.core.features import CHARS_PER_TOKEN
from proxy.core.pricing import Cost, PriceBook
from proxy.core.routing import Plan
from proxy.money.ledger import Ledger, LedgerRow
from proxy.upstream.executor import Attempt

log = logging.getLogger("orproxy")
access_log = logging.getLogger("orproxy.access")


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None  # the upstream's own figure (OpenRouter's usage.cost), when it gave one

    @classmethod
    def from_payload(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        cost = usage.get("cost")
        return cls(
            _int(usage.get("prompt_tokens")),
            _int(usage.get("completion_tokens")),
            float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None,
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
    streamed_text_bytes: int = 0  # a stream without usage: about how much text came
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
    settled: bool = False

    def note_origin(self, answer: dict[str, Any]) -> None:
        """The generation id and provider an answer (or its first stream chunk) names."""
        generation, provider = answer.get("id"), answer.get("provider")
        self.generation_id = generation if isinstance(generation, str) else None
        self.provider = provider if isinstance(provider, str) else None


Sink = Callable[[RequestRecord], None]


class Accountant:
    """Reserves before a request goes upstream, and settles after it: price, book, ledger, sinks."""

    def __init__(
        self,
        prices: PriceBook,
        book: SpendBook,
        ledger: Ledger | None,
        sinks: Iterable[Sink] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.prices = prices
        self.book = book
        self.ledger = ledger
        self._sinks = list(sinks)
        self._clock = clock

    def now(self) -> float:
        """The clock the spend book runs on (injected in tests)."""
        return self._clock()

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def worst_case(self, plan: Plan, prompt_tokens: int, max_tokens: int | None) -> float:
        """The dearest member decides: a fallback may land on it."""
        return max((self.prices.worst_case(t.model, prompt_tokens, max_tokens) for t in plan.targets), default=0.0)

    def reserve(self, key: str | None, amount: float) -> Reservation | Refusal:
        return self.book.try_reserve(key, amount, self._clock())

    def price(self, record: RequestRecord, tokens: tuple[int, int]) -> Cost:
        """`tokens` as `billed_tokens` gives them."""
        if record.cached:
            return Cost(0.0, "cached")
        if record.model is None:
            return Cost(0.0, "upstream")  # nothing answered: nothing to pay
        usage = record.usage
        if usage is not None:
            return self.prices.cost(record.model, *tokens, usage.cost_usd)
        # A stream cut before its usage chunk: bill what was seen, estimated from the text.
        return self.prices.cost(record.model, *tokens, None, estimated=True)

    def observe_refusal(self, record: RequestRecord) -> None:
        """A request refused before it had a model (bad key, bad body): seen by the log and the
        metrics, but not the ledger (a flood of bad keys must not fill the disk) nor the budget."""
        record.settled = True
        self._notify(record)

    def _notify(self, record: RequestRecord) -> None:
        for sink in self._sinks:
            try:
                sink(record)
            except Exception:
                log.exception("accounting sink %r failed", sink)

    async def settle(self, record: RequestRecord, reservation: Reservation | None, *, wait: bool = True) -> None:
        """Book the request once: idempotent, and never raises into the request."""
        if record.settled:
            return
        record.settled = True
        now = self._clock()
        tokens = billed_tokens(record)
        record.cost = cost = self.price(record, tokens)
        record.baseline_usd = self.prices.baseline(*tokens) if record.model else 0.0
        if reservation is not None:
            self.book.settle(reservation, cost.usd, now)
        elif cost.usd:
            self.book.add_spend(record.key_name, cost.usd, now)
        self._notify(record)
        if self.ledger is None:
            return
        try:
            row = _row(record, tokens)
            if wait:
                await self.ledger.record(row)
            else:
                self.ledger.record_nowait(row)
        except Exception:
            log.exception("could not write ledger row for request %s (cost $%.6f)", record.request_id, cost.usd)


async def recorded_spend(ledger: Ledger, book: SpendBook) -> tuple[dict[str, float], dict[str, float]]:
    """What the ledger holds per key for the book's current day and month: `book.load` takes it."""
    calendar = book.calendar
    return (
        await ledger.spend_by_key_between(calendar.day_start),
        await ledger.spend_by_key_between(calendar.month_start),
    )


def billed_tokens(record: RequestRecord) -> tuple[int, int]:
    """(prompt, completion): the upstream's usage, else an estimate from the text seen."""
    if record.usage is not None:
        return record.usage.prompt_tokens, record.usage.completion_tokens
    if record.model is None:
        return 0, 0
    return record.prompt_estimate, -(-record.streamed_text_bytes // CHARS_PER_TOKEN)


def _row(record: RequestRecord, tokens: tuple[int, int]) -> LedgerRow:
    cost = record.cost or Cost(0.0, "upstream")
    return LedgerRow(
        ts=record.started_at,
        request_id=record.request_id,
        key_name=record.key_name,
        requested_model=record.requested_model[:200],
        virtual_model=record.virtual_model,
        model=record.model,
        upstream=record.upstream,
        provider=record.provider,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        cost_usd=cost.usd,
        cost_source=cost.source,
        baseline_cost_usd=record.baseline_usd,
        latency_s=record.latency_s,
        ttft_s=record.ttft_s,
        status=record.status,
        attempts=len(record.attempts),
        streamed=record.streamed,
        generation_id=record.generation_id,
        error=record.error,
        cached=record.cached,
        saved_usd=record.saved_usd,
    )


def log_access(record: RequestRecord) -> None:
    usage = record.usage
    cost = record.cost
    access_log.info(
        "%s %s%s -> %s status=%s attempts=%d latency_ms=%.1f tokens=%s/%s cost=%s%s%s%s",
        record.request_id,
        record.requested_model,
        f" key={record.key_name}" if record.key_name else "",
        record.model or "-",
        record.status,
        len(record.attempts),
        record.latency_s * 1000,
        usage.prompt_tokens if usage else "-",
        usage.completion_tokens if usage else "-",
        f"{cost.usd:.6f}({cost.source})" if cost else "-",
        " stream" if record.streamed else "",
        f" downgrade={record.downgrade!r}" if record.downgrade else "",
        f" error={record.error}" if record.error else "",
    )
