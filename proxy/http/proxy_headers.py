"""The proxy's own headers on an answer (`x-request-id`, `x-proxy-*`) and the route a request
took, as the answer, the error, the ledger row and the batch runner tell it."""

from __future__ import annotations

from proxy.core.errors import ProxyError
from proxy.core.record import Attempt, RequestRecord
from proxy.core.routing import Plan
from proxy.http.errors import header_value


def failed(record: RequestRecord, exc: ProxyError, plan: Plan, downgrade: str | None) -> None:
    """A request that got no answer: the record and the error say what was tried, as a success's do."""
    record.status, record.error = exc.status, exc.code
    exc.request_id = record.request_id
    record.attempts = list(exc.attempts)
    exc.proxy_headers = proxy_headers(record.request_id, plan, record.attempts, downgrade)
    exc.proxy_headers.pop("x-proxy-model", None)  # nobody answered
    record.route = exc.proxy_headers["x-proxy-route"]


def proxy_headers(request_id: str, plan: Plan, attempts: list[Attempt], downgrade: str | None) -> dict[str, str]:
    headers = {
        "x-request-id": request_id,
        "x-proxy-virtual-model": header_value(plan.requested),
        "x-proxy-attempts": str(len(attempts)),
        "x-proxy-route": header_value(route_header(plan, attempts), 2048),
    }
    if attempts:
        headers["x-proxy-model"] = attempts[-1].target.model
    if downgrade:
        headers["x-proxy-downgrade"] = downgrade
    return headers


def route_header(plan: Plan, attempts: list[Attempt]) -> str:
    """e.g. `auto>cheap: mistralai/mistral-7b-instruct=http_503,http_503 meta-llama/llama-3.1-8b-instruct=ok`."""
    outcomes: dict[str, list[str]] = {}
    for attempt in attempts:
        outcomes.setdefault(str(attempt.target), []).append(attempt.outcome)
    head = plan.head()
    tried = " ".join(f"{target}={','.join(results)}" for target, results in outcomes.items())
    skipped = "".join(f" {target}=skipped:{block.reason}" for target, block in plan.skipped)
    return f"{head}: {tried}{skipped}"
