"""The fault plan: which misbehaviour the emulator injects for which model.

A `Fault` describes one misbehaviour (an HTTP error, latency, a dropped
connection, a broken stream); a `FaultPlan` arms faults per model, optionally
for a limited number of requests.  Pure data and bookkeeping, no IO, so it is
shared unchanged by the in-process API and the `/_emulator/faults` endpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .completions import error_body

# Arming a fault for this pseudo-model applies it to every model that has no
# fault of its own; handy for "the whole upstream is down" scenarios.
ANY_MODEL = "*"
DEFAULT_RATE_LIMIT = 20  # requests per window advertised on a 429 without explicit limits
DEFAULT_RESET_MS = 10_000
DEFAULT_MESSAGES = {
    400: "Bad Request",
    401: "No auth credentials found",
    402: "Insufficient credits. Add more using https://openrouter.ai/settings/credits",
    403: "Your chosen model requires moderation and your input was flagged",
    408: "Request timed out",
    429: "Rate limit exceeded: too many requests",
    502: "Provider returned error",
    503: "No endpoints found that can handle the request",
}


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected misbehaviour; the defaults describe a healthy reply.

    status: HTTP error status to answer with (None = success).
    message/code/error_metadata: override `error.message`, `error.code` and
        `error.metadata` of the error JSON (HTTP errors and mid-stream errors).
    retry_after: seconds, sent as a `Retry-After` header on error responses.
    rate_limit: (limit, remaining, reset_epoch_ms) for the `X-RateLimit-*`
        headers; sent on 429s (defaults apply if unset) and on successes.
    latency_s: delay before answering; streams keep sending
        `: OPENROUTER PROCESSING` comments meanwhile.
    chunk_delay_s: pause between streamed chunks.
    drop: close the TCP connection without any HTTP response.
    midstream_error / drop_midstream: after `after_chunks` content chunks,
        send OpenRouter's error chunk / cut the connection.
    times: how many requests the fault applies to (None = until cleared).
    when_prompt_contains: apply only to requests whose messages contain this
        text (a provider that chokes on one kind of input, not on everyone's).
    """

    status: int | None = None
    message: str | None = None
    code: int | str | None = None
    error_metadata: dict[str, Any] | None = None
    retry_after: float | None = None
    rate_limit: tuple[int, int, int] | None = None
    latency_s: float = 0.0
    chunk_delay_s: float = 0.0
    drop: bool = False
    midstream_error: bool = False
    drop_midstream: bool = False
    after_chunks: int = 0
    times: int | None = None
    when_prompt_contains: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"Fault.status must be an HTTP error status (400-599), got {self.status}")
        if self.times is not None and self.times < 1:
            raise ValueError(f"Fault.times must be >= 1 or None (forever), got {self.times}")
        for name in ("latency_s", "chunk_delay_s", "after_chunks"):
            if getattr(self, name) < 0:
                raise ValueError(f"Fault.{name} must be >= 0, got {getattr(self, name)}")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError(f"Fault.retry_after must be >= 0, got {self.retry_after}")
        if self.rate_limit is not None and len(self.rate_limit) != 3:
            raise ValueError("Fault.rate_limit must be (limit, remaining, reset_epoch_ms)")

    @property
    def streams_normally(self) -> bool:
        """True when the fault does not replace or break the reply itself."""
        return self.status is None and not self.drop

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> Fault:
        """Build a fault from JSON-ish fields, naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown Fault field(s) {unknown}; known fields: {sorted(known)}")
        values = dict(fields)
        if values.get("rate_limit") is not None:
            values["rate_limit"] = tuple(int(v) for v in values["rate_limit"])
        try:
            return cls(**values)
        except TypeError as exc:  # wrong value types surface here
            raise ValueError(str(exc)) from exc

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rate_limit_headers(limits: tuple[int, int, int]) -> dict[str, str]:
    limit, remaining, reset_ms = limits
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(reset_ms),
    }


def fault_error(fault: Fault, provider: str, now_ms: int) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and OpenRouter error JSON of a fault that has a status."""
    status = fault.status or 500
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = f"{fault.retry_after:g}"
    limits = fault.rate_limit
    if limits is None and status == 429:  # OpenRouter always tells a throttled client when to come back
        wait_ms = DEFAULT_RESET_MS if fault.retry_after is None else int(fault.retry_after * 1000)
        limits = (DEFAULT_RATE_LIMIT, 0, now_ms + wait_ms)
    if limits is not None:
        headers.update(rate_limit_headers(limits))
    metadata = fault.error_metadata
    if metadata is None and status in (429, 502, 503):  # upstream failures name the provider
        metadata = {"provider_name": provider, "raw": f"emulated {status} from {provider}"}
    message = fault.message or DEFAULT_MESSAGES.get(status, "Internal Server Error")
    code = status if fault.code is None else fault.code
    return status, headers, error_body(code, message, metadata)


def _prompt_text(body: Mapping[str, Any] | None) -> str:
    """What a request asks about: chat's messages, an embeddings `input`, a completion's `prompt`."""
    if body is None:
        return ""
    asked = body.get("messages") or body.get("input") or body.get("prompt")
    return str(asked) if asked else ""


@dataclass(slots=True)
class _Armed:
    fault: Fault
    remaining: int | None


class FaultPlan:
    """Faults armed per model; `take` consumes one use per request."""

    __slots__ = ("_armed",)

    def __init__(self) -> None:
        self._armed: dict[str, _Armed] = {}

    def set(self, model: str, fault: Fault) -> None:
        """Arm `fault` for `model` (or `"*"`), replacing any fault it had."""
        self._armed[model] = _Armed(fault, fault.times)

    def clear(self, model: str | None = None) -> None:
        """Disarm the fault of `model`, or every fault when model is None."""
        if model is None:
            self._armed.clear()
        else:
            self._armed.pop(model, None)

    def take(self, model: str, body: Mapping[str, Any] | None = None) -> Fault | None:
        """The fault for this request to `model`, counting it as one use."""
        if not self._armed:  # the common, healthy case: one dict check
            return None
        key = model if model in self._armed else ANY_MODEL
        armed = self._armed.get(key)
        if armed is None:
            return None
        wanted = armed.fault.when_prompt_contains
        if wanted is not None and wanted not in _prompt_text(body):
            return None
        if armed.remaining is not None:
            armed.remaining -= 1
            if armed.remaining <= 0:
                del self._armed[key]
        return armed.fault

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Armed faults with their remaining uses, for `GET /_emulator/faults`."""
        return {model: {**armed.fault.to_json(), "remaining": armed.remaining} for model, armed in self._armed.items()}

    def __len__(self) -> int:
        return len(self._armed)
