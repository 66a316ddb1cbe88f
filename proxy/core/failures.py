"""Pure: what an upstream failure means for the fallback chain.

One table decides, for every status and error body, whether to retry the same
member, move to the next one, skip the rest of that upstream, or hand the error
back to the client. The executor only follows the verdict.
"""

from __future__ import annotations

import enum
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any


class Action(enum.Enum):
    RETRY = "retry"  # transient: try the same member again (then the next)
    NEXT = "next"  # this member cannot serve the request: go to the next one
    OTHER_UPSTREAM = "other_upstream"  # this upstream cannot serve anyone (credits): skip its members
    BAD_KEY = "bad_key"  # the proxy's own upstream key was refused: skip its members
    CLIENT = "client"  # the request itself is wrong: return it to the client at once


@dataclass(frozen=True, slots=True)
class Failure:
    action: Action
    reason: str  # a short, bounded label: http_503, timeout, connect_error, ...
    message: str = ""
    status: int | None = None  # the upstream's HTTP status, None when no response came
    retry_after: float | None = None  # seconds, from Retry-After or the rate-limit reset
    code: str | None = None
    names_input: bool = False  # the upstream's error points at the request (a `param`, "invalid ...")

    @property
    def counts_against_member(self) -> bool:
        """Whether the circuit breaker may count it: client mistakes, and errors that blame the
        request's own input, are not the model's fault (`proxy.core.breakers.blamed` decides the rest)."""
        return self.action in (Action.RETRY, Action.NEXT) and not self.names_input


RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 524, 529})
CLIENT_STATUSES = frozenset({400, 413, 422})
# An upstream error that says the request's input is at fault, whatever its status: one client's
# malformed request must not count against a model's health for everyone.
_NAMES_INPUT = re.compile(
    r"\binvalid\b|\bmalformed\b|\bunsupported\b|could not (parse|decode|process (the|your) (input|request))|"
    r"failed to (parse|decode|validate)|\bvalidation (error|failed)|\bschema\b|\bunparseable\b",
    re.IGNORECASE,
)
_CONTEXT_LENGTH = re.compile(
    r"context[ _-]?(length|window)|maximum context|too many tokens|prompt is too long", re.IGNORECASE
)


def classify_status(
    status: int, error: Mapping[str, Any] | None, headers: Mapping[str, str], now: float | None = None
) -> Failure:
    """The verdict for an HTTP error response (error: the body's `error` object, if any)."""
    error = error or {}
    message = str(error.get("message") or f"HTTP {status}")
    raw_code = error.get("code")
    code = raw_code if isinstance(raw_code, str) else None
    retry_after = parse_retry_after(headers, now)
    reason = f"http_{status}"
    if status == 401:
        return Failure(Action.BAD_KEY, reason, message, status)
    if status == 402:
        return Failure(Action.OTHER_UPSTREAM, reason, message, status)
    if _is_retryable_by_body(error) or status in RETRYABLE_STATUSES or status >= 500:
        return Failure(Action.RETRY, reason, message, status, retry_after, code, names_input(error, message))
    if code == "context_length_exceeded" or _CONTEXT_LENGTH.search(message):
        return Failure(Action.NEXT, "context_length", message, status, None, code)
    if status in CLIENT_STATUSES:
        return Failure(Action.CLIENT, reason, message, status, None, code)
    # 403 (moderation of one provider), 404 (no endpoints for this model) and the rest:
    # another member may well serve the request.
    return Failure(Action.NEXT, reason, message, status, None, code)


def names_input(error: Mapping[str, Any], message: str) -> bool:
    """An error that names a parameter of the request, or says its input is invalid or malformed."""
    return bool(error.get("param")) or bool(_NAMES_INPUT.search(message))


def _is_retryable_by_body(error: Mapping[str, Any]) -> bool:
    metadata = error.get("metadata")
    for holder in (error, metadata if isinstance(metadata, Mapping) else {}):
        availability = holder.get("availability")
        if isinstance(availability, Mapping) and availability.get("retryable") is True:
            return True
    return False


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait, from Retry-After (seconds or an HTTP date), else X-RateLimit-Reset (epoch ms)."""
    value = headers.get("Retry-After")
    now = time.time() if now is None else now
    if value:
        value = value.strip()
        try:
            seconds = float(value)
            return seconds if math.isfinite(seconds) and seconds >= 0 else None
        except ValueError:
            pass
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - now)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    reset = headers.get("X-RateLimit-Reset")
    if reset and headers.get("X-RateLimit-Remaining", "").strip() == "0":
        try:
            stamp = float(reset)
        except ValueError:
            return None
        if stamp > 1e11:  # OpenRouter sends epoch milliseconds
            stamp /= 1000.0
        return max(0.0, stamp - now)
    return None


def timeout_failure(detail: str) -> Failure:
    return Failure(Action.RETRY, "timeout", f"timed out {detail}")


def connection_failure(detail: str) -> Failure:
    return Failure(Action.RETRY, "connect_error", detail)


def dropped_failure(detail: str) -> Failure:
    return Failure(Action.RETRY, "dropped", detail)
