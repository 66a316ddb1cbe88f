"""Pure: OpenAI's Batch API as the proxy keeps it. What a batch and a file are, how an input file is
checked line by line before anything runs, the status a batch moves through, the objects and
result lines the API answers with, and when a batch line may be dispatched.

No IO: the store (`proxy.money.batch_store`) keeps these records, the runner (`proxy.batch.runner`)
moves them, the routes (`proxy.http.batches`) render them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from proxy.core.errors import ProxyError
from proxy.core.pricing import PriceBook
from proxy.core.routing import Plan

# The endpoints a batch line may target, and the proxy's API that serves each.
ENDPOINTS: Mapping[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/completions": "completions",
}
COMPLETION_WINDOWS: Mapping[str, float] = {"24h": 86_400.0}
# OpenAI's statuses. A batch is `validating` only while its file is read (create answers after).
VALIDATING, FAILED, IN_PROGRESS, FINALIZING = "validating", "failed", "in_progress", "finalizing"
COMPLETED, EXPIRED, CANCELLING, CANCELLED = "completed", "expired", "cancelling", "cancelled"
TERMINAL = frozenset((FAILED, COMPLETED, EXPIRED, CANCELLED))
ACTIVE = (IN_PROGRESS, FINALIZING, CANCELLING)
# What becomes of one line: the outcome label of `orproxy_batch_lines_total`.
LINE_OUTCOMES = ("completed", "failed", "expired", "cancelled", "interrupted")
MAX_ERRORS_SHOWN = 100  # validation errors listed on a failed batch (OpenAI lists a sample too)
CUSTOM_ID_MAX = 512


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    key_name: str | None = None

    def to_object(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass(frozen=True, slots=True)
class LineError:
    line: int | None  # 1-based line of the input file; None for an error of the whole file
    code: str
    message: str
    param: str | None = None

    def to_object(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class InputLine:
    line: int  # 1-based
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One batch as stored; timestamps are epoch seconds (None: not reached)."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    key_name: str | None = None
    metadata: Mapping[str, str] | None = None
    errors: tuple[LineError, ...] = ()
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    paused_until: float | None = None  # the budget share is spent: no line dispatches before this
    upstream: str = "proxy"  # proxy | openrouter: where its lines run

    def to_object(self, cost_usd: float | None = None) -> dict[str, Any]:
        """OpenAI's Batch object (fields not reached yet are left out, as its schema has them
        optional, not nullable); `cost_usd` (what its lines cost so far) as the proxy's own extra."""
        errors = {"object": "list", "data": [e.to_object() for e in self.errors]} if self.errors else None
        fields: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": dict(self.metadata) if self.metadata is not None else None,
        }
        out = {name: value for name, value in fields.items() if value is not None}
        if cost_usd is not None:
            out["x_proxy"] = {"cost_usd": cost_usd, "paused_until": self.paused_until, "upstream": self.upstream}
        return out


@dataclass(slots=True)
class LineResult:
    """What became of one line: an answer (any status), or an error of the batch (expiry...)."""

    custom_id: str
    request_id: str | None
    status_code: int | None  # None: no answer (the `error` says why)
    body: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.status_code == 200


def result_line(line_id: str, result: LineResult) -> bytes:
    """One line of the output (a 200) or error file, in OpenAI's shape."""
    response = None
    if result.status_code is not None:
        response = {"status_code": result.status_code, "request_id": result.request_id, "body": result.body}
    error = None
    if result.error_code is not None:
        error = {"code": result.error_code, "message": result.error_message}
    return orjson.dumps({"id": line_id, "custom_id": result.custom_id, "response": response, "error": error}) + b"\n"


def parse_input(
    content: bytes,
    endpoint: str,
    *,
    max_lines: int,
    check: Callable[[dict[str, Any]], None],
) -> tuple[list[InputLine], list[LineError]]:
    """Every line of a batch input file, or every error found (each naming its line). `check`
    raises a ProxyError for a body the endpoint's API, the routing or the client's key refuses."""
    lines: list[InputLine] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    count = 0
    for number, raw in _numbered(content):
        count += 1
        if count > max_lines:
            message = f"line {number}: the file has more than {max_lines} lines (batches.max_lines)"
            errors.append(LineError(number, "too_many_lines", message))
            break
        parsed = _line(number, raw, endpoint, seen, check)
        if isinstance(parsed, LineError):
            errors.append(parsed)
        else:
            lines.append(parsed)
    if count == 0:
        errors.append(LineError(None, "empty_file", "the input file has no request lines"))
    return lines, errors


def _numbered(content: bytes) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(content.split(b"\n"), 1):
        if raw.strip():
            yield number, raw


def _line(
    number: int, raw: bytes, endpoint: str, seen: dict[str, int], check: Callable[[dict[str, Any]], None]
) -> InputLine | LineError:
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return LineError(number, "invalid_json_line", f"line {number} is not valid JSON: {exc}")
    if not isinstance(item, dict):
        return LineError(number, "invalid_request", f"line {number} must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > CUSTOM_ID_MAX:
        return LineError(
            number, "invalid_custom_id", f"line {number}: custom_id must be a string of 1-512 characters", "custom_id"
        )
    if custom_id in seen:
        return LineError(
            number,
            "duplicate_custom_id",
            f"line {number}: custom_id {custom_id!r} was already used on line {seen[custom_id]}",
            "custom_id",
        )
    seen[custom_id] = number
    if item.get("method") != "POST":
        return LineError(number, "invalid_method", f"line {number}: method must be POST", "method")
    url = item.get("url")
    if url != endpoint:
        known = url in ENDPOINTS if isinstance(url, str) else False
        why = f"it differs from the batch's endpoint {endpoint}" if known else f"use {endpoint}"
        return LineError(
            number, "invalid_url", f"line {number}: url {str(url)[:100]!r} is not served here: {why}", "url"
        )
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError(number, "invalid_request", f"line {number}: body must be a JSON object", "body")
    if body.get("stream") is True:
        return LineError(number, "invalid_request", f"line {number}: a batch line cannot be streamed", "body.stream")
    try:
        check(body)
    except ProxyError as exc:
        param = f"body.{exc.param}" if exc.param else "body"
        return LineError(number, exc.code or "invalid_request", f"line {number}: {exc.message}", param)
    return InputLine(number, custom_id, body)


# --- scheduling ------------------------------------------------------------------------------


def dispatch_wait(*, interactive_in_flight: int, busy_in_flight: int, rate_limited: bool) -> str | None:
    """Why no batch line may start now (None: one may): live traffic comes first."""
    if rate_limited:
        return "rate_limited"
    if interactive_in_flight >= busy_in_flight:
        return "busy"
    return None


def share_left(spent_today: float, daily_usd: float | None, share: float) -> float | None:
    """What batch work may still spend today under `budget_share`; None: no daily budget to share."""
    if daily_usd is None or share >= 1.0:
        return None
    return max(0.0, daily_usd * share - spent_today)


def cheapest_first(plan: Plan, prices: PriceBook, prompt_tokens: int, max_tokens: int | None) -> Plan:
    """The plan with its members ordered by their worst-case cost for this request (a stable sort:
    equal prices keep the chain's order), for `batches.prefer: cheapest`."""
    ordered = sorted(plan.targets, key=lambda t: prices.worst_case(t.model, prompt_tokens, max_tokens))
    return replace(plan, targets=tuple(ordered))


def expiry_of(created_at: float, window: str) -> int:
    return int(created_at + COMPLETION_WINDOWS[window])


def finished_status(batch: BatchRecord, now: float) -> str:
    """The terminal status a batch with no line left to run ends in."""
    if batch.status == CANCELLING or batch.cancelling_at is not None:
        return CANCELLED
    if now >= batch.expires_at:
        return EXPIRED
    return COMPLETED


def line_id(batch_id: str, line: int) -> str:
    return f"batch_req_{batch_id.removeprefix('batch_')}_{line}"


def counts(results: Sequence[LineResult]) -> tuple[int, int]:
    """(completed, failed) as OpenAI counts them: an answer of 200 is completed, any other failed."""
    done = sum(1 for r in results if r.succeeded)
    return done, len(results) - done
