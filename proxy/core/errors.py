"""The proxy's error tree, each mapped once to OpenAI's error JSON.

    ProxyError                      500 server_error
    ├── InvalidRequest              400 invalid_request_error
    │   ├── BodyTooLarge            413
    │   └── UpstreamRejected        the upstream's 4xx (400/413/422), its message passed on
    ├── ModelNotFound               404 model_not_found
    ├── Unauthorized                401 (the client's proxy key: missing or wrong)
    │   └── UpstreamKeyMissing      401 the proxy itself has no upstream key: names the variable to set
    ├── Forbidden                   403 (a model outside the client key's list)
    ├── RateLimited                 429 every member rate-limited; Retry-After set
    ├── BudgetExceeded              429 insufficient_quota / budget_exceeded; Retry-After = the budget's reset
    ├── UpstreamFailed              502 every member failed; the message lists each attempt
    ├── UpstreamUnavailable         503 every member cooling down; Retry-After set
    ├── UpstreamTimeout             504 every member timed out
    └── ServiceUnavailable          503 the proxy itself is not ready (e.g. the ledger is not open)

SDKs pick the exception class from the status, so the status is what matters
most; `type` and `code` follow OpenAI's own values where it has them.
"""

from __future__ import annotations

import math

import orjson


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    request_id: str | None = None
    # Set where they are known: the upstream attempts made before giving up (by the executor) and
    # the proxy's answer headers (x-proxy-route, x-proxy-attempts, ...) by the handler.
    attempts: tuple = ()
    proxy_headers: dict[str, str] | None = None

    def __init__(
        self, message: str, *, code: str | None = None, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UpstreamRejected(InvalidRequest):
    """A client error the upstream reported (bad parameters): returned as is, never retried."""

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class UpstreamKeyMissing(Unauthorized):
    code = "upstream_key_missing"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamFailed(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_failed"


class UpstreamUnavailable(ProxyError):
    status = 503
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class BudgetExceeded(ProxyError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "unavailable"
