"""Admin routes: on only while the config snapshot has an admin key (`admin.key_env` names a set
variable), compared in constant time. Off, they answer 404 like any unknown path."""

from __future__ import annotations

import os
from typing import cast

import orjson
from aiohttp import web

from proxy.core.errors import InvalidRequest, ProxyError, ServiceUnavailable, Unauthorized
from proxy.core.keys import bearer_matches
from proxy.http.appkeys import ACCOUNTANT, RELOADER, RUNTIME, STATE
from proxy.http.errors import not_found, openai_errors
from proxy.money.reports import GROUPS, PERIODS, GroupBy, Period, spend_report
from proxy.ops.runtime import Runtime

JSON = "application/json"


class AdminRoutes:
    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/admin/spend", openai_errors(self.spend))
        router.add_get("/admin/status", openai_errors(self.status))
        router.add_post("/admin/reload", openai_errors(self.reload))
        router.add_post("/admin/unblock", openai_errors(self.unblock))

    def _authorize(self, request: web.Request) -> Runtime:
        runtime = request.app[RUNTIME].current
        if runtime.admin_key is None:
            raise not_found(request)
        if not bearer_matches(request.headers.get("Authorization"), runtime.admin_key):
            raise Unauthorized(
                f"Admin routes need `Authorization: Bearer <admin key>` (the value of {runtime.config.admin.key_env})."
            )
        return runtime

    async def spend(self, request: web.Request) -> web.Response:
        runtime = self._authorize(request)
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
        report = await spend_report(
            ledger, cast(Period, period), cast(GroupBy, by), runtime.config.budget.timezone, now
        )
        book = runtime.policy.book
        await request.app[STATE].spend.refresh(runtime.policy)  # the shared figures, on Redis
        book.roll(now)  # after midnight with no request since, the book still holds yesterday's figures
        report["budget"] = [
            {"scope": scope or "global", "window": window, "spent_usd": spent, "limit_usd": limit}
            for scope, window, spent, limit in book.snapshot()
        ]
        return web.Response(body=orjson.dumps(report), content_type=JSON)

    async def status(self, request: web.Request) -> web.Response:
        runtime = self._authorize(request)
        reloader = request.app.get(RELOADER)
        body = {
            "virtual_models": list(runtime.config.models),
            "upstreams": {
                name: {"kind": client.kind, "has_key": bool(client.api_key)} for name, client in runtime.clients.items()
            },
            "reload": reloader.status.as_dict() if reloader else None,
            "blocks": self._blocks(request),
            "process": {"pid": os.getpid()},  # which worker answered, under `serve --workers N`
            "state": request.app[STATE].status(),
        }
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    @staticmethod
    def _blocks(request: web.Request) -> list[dict]:
        """Members skipped right now: open breakers and upstream-imposed rate-limit blocks."""
        state = request.app[STATE]
        now = state.clock()
        shown = []
        for source, blocks in (("breaker", state.breakers.active(now)), ("rate_limit", state.ratelimits.active(now))):
            for target, block in blocks.items():
                owners = state.breakers.owners(target) if source == "breaker" else None
                shown.append(
                    {
                        "model": target.model,
                        "upstream": target.upstream,
                        "source": source,
                        "reason": block.reason,
                        "detail": block.detail,
                        "until": block.until,
                        "seconds_left": None if block.until is None else round(block.until - now, 3),
                        "keys": sorted(owners) if owners else "all",
                    }
                )
        return shown

    async def unblock(self, request: web.Request) -> web.Response:
        """Lift every block (or those of `?model=`): open breakers and rate-limit blocks."""
        self._authorize(request)
        model = request.query.get("model") or None
        state = request.app[STATE]
        closed = state.breakers.close(model)
        lifted = state.ratelimits.clear(model)
        body = {
            "unblocked": [
                {"model": t.model, "upstream": t.upstream, "source": source}
                for source, targets in (("breaker", closed), ("rate_limit", lifted))
                for t in targets
            ]
        }
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    async def reload(self, request: web.Request) -> web.Response:
        self._authorize(request)
        reloader = request.app.get(RELOADER)
        if reloader is None:
            raise ServiceUnavailable("This proxy was started without a config file path; nothing to reload.")
        status = await reloader.reload("POST /admin/reload")
        if status.last_result == "failure":
            error = ProxyError(
                "The new config is invalid; the previous one keeps serving: " + "; ".join(status.last_errors),
                code="invalid_config",
            )
            error.status, error.type = 422, "invalid_request_error"
            raise error
        return web.Response(body=orjson.dumps(status.as_dict()), content_type=JSON)
