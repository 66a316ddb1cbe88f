"""What happened to one client request, priced once and handed to every sink:
the budget book, the ledger (awaited: the row is committed before the answer
completes), the access log and the metrics read the same record."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from proxy.core.apis import APIS
from proxy.core.bounds import bound_tokens, bound_usd, flags_of
from proxy.core.budget import BudgetCalendar, Reservation
from proxy.core.policy import Policy
from proxy.core.pricing import Cost, PriceBook, Tokens
from proxy.core.record import RequestRecord, billed_tokens
from proxy.money.ledger_api import LedgerStore
from proxy.money.ledger_rows import LedgerRow
from proxy.state.spend import LocalSpend, SpendStore

log = logging.getLogger("orproxy")
CHAT_APIS = {api.name: api.model_kind == "chat" for api in APIS}  # the APIs chat models serve
access_log = logging.getLogger("orproxy.access")


# Told of every settled request, with the policy (config snapshot) it ran on.
Sink = Callable[[RequestRecord, Policy], None]


class Accountant:
    """Settles a request once: prices it with its snapshot's prices, books it against its
    snapshot's budget, writes the ledger row and tells the sinks. Holds no config: the policy
    comes with each call. The ledger is a resource opened at start-up and closed at shutdown."""

    def __init__(
        self, sinks: Iterable[Sink] = (), clock: Callable[[], float] = time.time, spend: SpendStore | None = None
    ) -> None:
        self.ledger: LedgerStore | None = None
        self._sinks = tuple(sinks)
        self._clock = clock
        self._spend = spend if spend is not None else LocalSpend()  # where the budget's book is kept

    def now(self) -> float:
        """The clock the spend book runs on (injected in tests)."""
        return self._clock()

    def observe_refusal(self, record: RequestRecord, policy: Policy) -> None:
        """A request refused before it had a model (bad key, bad body): seen by the log and the
        metrics, but not the ledger (a flood of bad keys must not fill the disk) nor the budget."""
        record.settled = True
        self._notify(record, policy)

    def _notify(self, record: RequestRecord, policy: Policy) -> None:
        for sink in self._sinks:
            try:
                sink(record, policy)
            except Exception:
                log.exception("accounting sink %r failed", sink)

    async def settle(
        self, record: RequestRecord, reservation: Reservation | None, policy: Policy, *, wait: bool = True
    ) -> None:
        """Book the request once: idempotent, and never raises into the request. `wait`: return
        once its ledger row is committed (else it is only queued)."""
        committed = await self.book(record, reservation, policy)
        if wait and committed is not None:
            await self.committed(record, committed)

    async def committed(self, record: RequestRecord, commit: asyncio.Future[None]) -> None:
        """Wait for the commit `book` queued; a failed one is logged, never raised. Cancelling
        the wait does not withdraw the row."""
        try:
            await commit
        except Exception:
            cost = record.cost.usd if record.cost is not None else 0.0
            log.exception("could not write ledger row for request %s (cost $%.6f)", record.request_id, cost)

    async def book(
        self, record: RequestRecord, reservation: Reservation | None, policy: Policy
    ) -> asyncio.Future[None] | None:
        """Book the request once (idempotent; never raises): price it, settle its budget, tell the
        sinks and queue its ledger row. Returns the future of that row's commit (None: no ledger,
        already booked, or the row could not be queued), for whoever must wait for it
        (`committed`) before the answer completes."""
        if record.settled:
            return None
        record.settled = True
        now = self._clock()
        clamped: list[str] = []
        tokens = bound_tokens(billed_tokens(record), clamped)
        cost = price(policy.prices, record, tokens, reservation.amount if reservation is not None else 0.0)
        record.cost = cost = Cost(bound_usd("cost_usd", cost.usd, clamped), cost.source)
        baseline = 0.0
        if record.model:
            # The savings baseline is a chat model: it could not have served an embeddings request,
            # so such a request is its own baseline (no savings claimed, none lost).
            baseline = policy.prices.baseline(tokens) if CHAT_APIS.get(record.api, True) else cost.usd
        record.baseline_usd = bound_usd("baseline_cost_usd", baseline, clamped)
        record.saved_usd = bound_usd("saved_usd", record.saved_usd, clamped)
        if clamped:  # a bug or a hostile upstream: the row keeps its place, with what was clamped
            record.flags = flags_of(clamped)
            log.warning(
                "request %s: absurd figures from %s clamped (%s); the row says so in `flags`",
                record.request_id,
                record.model or record.upstream or "the proxy",
                ", ".join(clamped),
            )
        # Booked in the day the request started, like its ledger row (`ts` is `started_at`).
        await self._spend.settle(policy, reservation, record.key_name, cost.usd, now, record.started_at)
        self._notify(record, policy)
        if self.ledger is None:
            return None
        try:
            return self.ledger.record_nowait(_row(record, tokens))
        except Exception:
            log.exception("could not write ledger row for request %s (cost $%.6f)", record.request_id, cost.usd)
            return None


def price(prices: PriceBook, record: RequestRecord, tokens: Tokens, reserved: float = 0.0) -> Cost:
    """What a request cost; `tokens` as `billed_tokens` gives them, `reserved` its reservation."""
    if record.cached:
        return Cost(0.0, "cached")
    if record.abandoned and record.usage is None:
        # Given up (shutdown) while the upstream may still be working on it: its bill is unknown,
        # so the most it could be. Reconciliation corrects it when a generation id is known.
        return Cost(reserved, "reserved")
    if record.model is None:
        return Cost(0.0, "upstream")  # nothing answered: nothing to pay
    usage = record.usage
    if usage is not None:
        return prices.cost(record.model, tokens, usage.cost_usd)
    # A stream cut before its usage chunk: bill what was seen, estimated from the text.
    return prices.cost(record.model, tokens, None, estimated=True)


async def recorded_spend(ledger: LedgerStore, calendar: BudgetCalendar) -> tuple[dict[str, float], dict[str, float]]:
    """What the ledger holds per key for the calendar's current day and month: `SpendCounters.load` takes it."""
    return (
        await ledger.spend_by_key_between(calendar.day_start),
        await ledger.spend_by_key_between(calendar.month_start),
    )


def _row(record: RequestRecord, tokens: Tokens) -> LedgerRow:
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
        cached_tokens=tokens.cached,
        cache_write_tokens=tokens.cache_write,
        flags=record.flags,
        api=record.api,
        batch_id=record.batch_id,
        custom_id=record.custom_id,
    )


def log_access(record: RequestRecord, policy: Policy) -> None:
    """The access log, a sink like the others; `logging.access_log` of the request's snapshot decides.
    What a client chose (the model name, the request id) is escaped and clipped: a newline cannot
    forge a line, and a 5 MB name does not make a 5 MB line."""
    if not policy.config.logging.access_log:
        return
    usage = record.usage
    cost = record.cost

    def field(text: str, limit: int = 200) -> str:
        if len(text) <= limit and text.isascii() and text.isprintable() and " " not in text:
            return text  # nearly always: one check, no copy
        clipped = text[:limit]
        escaped = clipped.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")
        return escaped + ("…" if len(text) > limit else "")

    access_log.info(
        "%s %s%s -> %s status=%s attempts=%d latency_ms=%.1f tokens=%s/%s cost=%s%s%s%s",
        field(record.request_id),
        field(record.requested_model) or "-",
        f" key={record.key_name}" if record.key_name else "",
        field(record.model or "-"),
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
