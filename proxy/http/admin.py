"""Admin routes: on only when the admin key's env variable is set; compared in constant time."""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.core.errors import InvalidRequest, ProxyError, ServiceUnavailable, Unauthorized
from proxy.core.keys import bearer_matches
from proxy.http.appkeys import ACCOUNTANT, RELOADER, RUNTIME
from proxy.http.errors import openai_errors
from proxy.money.reports import GROUPS, PERIODS, spend_report

JSON = "application/json"


class AdminRoutes:
    def __init__(self, admin_key: str, key_env: str) -> None:
        self._admin_key = admin_key
        self._key_env = key_env

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/admin/spend", openai_errors(self.spend))
        router.add_get("/admin/status", openai_errors(self.status))
        router.add_post("/admin/reload", openai_errors(self.reload))

    def _authorize(self, request: web.Request) -> None:
        if not bearer_matches(request.headers.get("Authorization"), self._admin_key):
            raise Unauthorized(f"Admin routes need `Authorization: Bearer <admin key>` (the value of {self._key_env}).")

    async def spend(self, request: web.Request) -> web.Response:
        self._authorize(request)
        period = request.query.get("period", "day")
        by = request.query.get("by", "model")
        if period not in PERIODS:
            raise InvalidRequest(f"`period` must be one of {', '.join(PERIODS)}", param="period")
        if by not in GROUPS:
            raise InvalidRequest(f"`by` must be one of {', '.join(GROUPS)}", param="by")
        accountant = request.app[ACCOUNTANT]
        ledger = accountant.ledger
        if ledger is None:
            raise ServiceUnavailable("The ledger is not open yet.")
        now = accountant.now()
        config = request.app[RUNTIME].current.config
        report = await spend_report(ledger, period, by, config.budget.timezone, now)
        book = accountant.book
        book.roll(now)  # after midnight with no request since, the book still holds yesterday's figures
        report["budget"] = [
            {"scope": scope or "global", "window": window, "spent_usd": spent, "limit_usd": limit}
            for scope, window, spent, limit in book.snapshot()
        ]
        return web.Response(body=orjson.dumps(report), content_type=JSON)

    async def status(self, request: web.Request) -> web.Response:
        self._authorize(request)
        runtime = request.app[RUNTIME].current
        reloader = request.app.get(RELOADER)
        body = {
            "virtual_models": list(runtime.config.models),
            "upstreams": {
                name: {"kind": client.kind, "has_key": bool(client.api_key)} for name, client in runtime.clients.items()
            },
            "reload": reloader.status.as_dict() if reloader else None,
        }
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    async def reload(self, request: web.Request) -> web.Response:
        self._authorize(request)
        reloader = request.app.get(RELOADER)
        if reloader is None:
            raise ServiceUnavailable("This proxy was started without a config file path; nothing to reload.")
        status = await reloader.reload("POST /admin/reload")
        if status.last_result != "success":
            error = ProxyError(
                "The new config is invalid; the previous one keeps serving: " + "; ".join(status.last_errors),
                code="invalid_config",
            )
            error.status, error.type = 422, "invalid_request_error"
            raise error
        return web.Response(body=orjson.dumps(status.as_dict()), content_type=JSON)
