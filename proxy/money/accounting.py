"""What happened to one client request, priced once and handed to every sink:
the budget book, the ledger (awaited: the row is committed before the answer
completes), the access log and the metrics read the same record."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from proxy.core.budget import Refusal, Reservation, SpendBook
from proxy.core.pricing import Cost, PriceBook
from proxy.core.record import RequestRecord, billed_tokens
from proxy.core.routing import Plan
from proxy.money.ledger import Ledger, LedgerRow

log = logging.getLogger("orproxy")
access_log = logging.getLogger("orproxy.access")


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
