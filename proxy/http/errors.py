"""Every error leaves in the shape of the client's API, so SDKs raise the right exception class:
OpenAI's (`{"error": {message, type, param, code}}`) everywhere, Anthropic's
(`{"type": "error", "error": {type, message}}`) on the Messages API.

A per-route wrapper rather than an aiohttp middleware: a middleware costs every request a
few microseconds of chain-building and context switching, and the proxy's budget for its own
overhead is measured in tens of microseconds. Unknown paths and methods reach a catch-all
route that answers 404/405 in the same shape.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from proxy.core.apis import APIS
from proxy.core.apis.base import ErrorStyle
from proxy.core.errors import ProxyError

log = logging.getLogger("orproxy")
# What a client that took a wrong turn is told the proxy serves: every API's routes.
SERVED = ", ".join(f"POST {route}" for api in APIS for route in api.routes) + " and GET /v1/models"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Anthropic's error types by HTTP status, as its errors page lists them (its SDKs pick the
# exception class from the status too); other 4xx are `invalid_request_error`, other 5xx
# `api_error`. 503 (every member cooling down) is `overloaded_error`, as OpenRouter's Messages
# API maps an overloaded provider; 408 (a client's body too slow) is a timeout like 504's.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def openai_errors(handler: Handler, style: ErrorStyle = "openai") -> Handler:
    """Answer every failure of `handler` in the error shape of `style`."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as exc:
            return error_response(exc, exc.request_id, style=style)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(_from_http(exc, exc.text or exc.reason), None, style=style)
        except Exception:
            error_id = uuid.uuid4().hex
            log.exception("unexpected error while handling %s %s (error id %s)", request.method, request.path, error_id)
            return error_response(
                ProxyError(
                    f"The proxy hit an internal error (error id {error_id}); it has been logged.", code="internal_error"
                ),
                error_id,
                style=style,
            )

    return wrapped


async def unknown_route(request: web.Request) -> web.Response:
    """The catch-all: 405 when the path exists with other methods, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if any(route.handler is unknown_route for route in resource):
            continue
        _match, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        error = _from_http(
            web.HTTPMethodNotAllowed(request.method, sorted(allowed)),
            f"Method {request.method} is not allowed on {request.path}; use {', '.join(sorted(allowed))}.",
        )
        return error_response(error, None, {"Allow": ", ".join(sorted(allowed))}, style=style_of(request.path))
    return error_response(not_found(request), None, style=style_of(request.path))


def style_of(path: str) -> ErrorStyle:
    """The error shape of the API a path belongs to (`/v1/messages/batches` is Anthropic's)."""
    path = path.removeprefix("/api")
    for api in APIS:
        if api.error_style != "openai" and any(path == r or path.startswith(r + "/") for r in api.routes):
            return api.error_style
    return "openai"


def not_found(request: web.Request) -> ProxyError:
    return _from_http(
        web.HTTPNotFound(),
        f"No route {request.method} {request.path[:200]}; this proxy serves {SERVED}.",
    )


def _from_http(exc: web.HTTPException, message: str) -> ProxyError:
    error = ProxyError(message, code=exc.reason.lower().replace(" ", "_"))
    error.status, error.type = exc.status, "invalid_request_error" if exc.status < 500 else "server_error"
    return error


def error_response(
    exc: ProxyError, request_id: str | None, extra: dict[str, str] | None = None, *, style: ErrorStyle = "openai"
) -> web.Response:
    """Every answer carries x-request-id, x-proxy-attempts and x-proxy-route, refusals included:
    the handler's own when it got as far as a plan, else none tried and the refusal's code."""
    headers = exc.headers()
    headers["Content-Type"] = "application/json"
    headers["x-request-id"] = request_id or uuid.uuid4().hex
    headers["x-proxy-attempts"] = "0"
    headers["x-proxy-route"] = f"-: {exc.code or exc.type}"
    if exc.proxy_headers:
        headers.update(exc.proxy_headers)
    if extra:
        headers.update(extra)
    body = exc.body() if style == "openai" else anthropic_body(exc, headers["x-request-id"])
    return web.Response(status=exc.status, body=body, headers=headers)


def anthropic_body(exc: ProxyError, request_id: str | None = None) -> bytes:
    """`{"type": "error", "error": {type, message}, "request_id"}`: the request id is the one in `x-request-id`."""
    kind = ANTHROPIC_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": exc.message}, "request_id": request_id})


def header_value(text: str, limit: int = 512) -> str:
    """A header value built from what a client sent (a model name): printable ASCII, bounded."""
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
