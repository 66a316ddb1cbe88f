"""What happened to one client request, gathered once and handed to every sink
(the access log now; the ledger and the metrics read the same record)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .executor import Attempt

access_log = logging.getLogger("orproxy.access")


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None   # the upstream's own figure (OpenRouter's usage.cost), when it gave one

    @classmethod
    def from_payload(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        cost = usage.get("cost")
        return cls(_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")),
                   float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    started_at: float                 # epoch seconds
    requested_model: str
    virtual_model: str | None         # the virtual model whose chain served it (None: direct slug)
    streamed: bool
    status: int = 0
    model: str | None = None          # the real model that answered
    upstream: str | None = None
    provider: str | None = None
    generation_id: str | None = None
    usage: Usage | None = None
    attempts: list[Attempt] = field(default_factory=list)
    latency_s: float = 0.0
    ttft_s: float | None = None
    error: str | None = None          # a short label: the error code, or stream_interrupted / client_disconnected
    route: str = ""

    @property
    def fallbacks(self) -> int:
        """How many times the request moved on to another member."""
        changes = 0
        for before, after in zip(self.attempts, self.attempts[1:]):
            changes += before.target != after.target
        return changes


Sink = Callable[[RequestRecord], None]


class Accounting:
    """Fans a finished request out to the sinks; a failing sink never fails the request."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self._sinks = list(sinks)

    def add(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def record(self, record: RequestRecord) -> None:
        for sink in self._sinks:
            try:
                sink(record)
            except Exception:  # noqa: BLE001 - accounting must never take a request down
                logging.getLogger("orproxy").exception("accounting sink %r failed", sink)


def log_access(record: RequestRecord) -> None:
    usage = record.usage
    access_log.info(
        "%s %s -> %s status=%s attempts=%d latency_ms=%.1f tokens=%s/%s cost=%s%s%s",
        record.request_id, record.requested_model, record.model or "-", record.status, len(record.attempts),
        record.latency_s * 1000,
        usage.prompt_tokens if usage else "-", usage.completion_tokens if usage else "-",
        f"{usage.cost_usd:.6f}" if usage and usage.cost_usd is not None else "-",
        " stream" if record.streamed else "", f" error={record.error}" if record.error else "")
