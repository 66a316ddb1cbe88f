"""Admin routes: on only when the admin key's env variable is set; compared in constant time."""

from __future__ import annotations

import hmac

import orjson
from aiohttp import web

from .accounting import Accountant
from .config import Config
from .errors import InvalidRequest, ServiceUnavailable, Unauthorized
from .reports import GROUPS, PERIODS, spend_report


class AdminRoutes:
    def __init__(self, admin_key: str, accountant: Accountant, config: Config) -> None:
        self._expected = f"Bearer {admin_key}".encode()
        self._accountant = accountant
        self._config = config

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/admin/spend", self.spend)

    def _authorize(self, request: web.Request) -> None:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            raise Unauthorized("Admin routes need `Authorization: Bearer <admin key>` (the value of "
                               f"{self._config.admin.key_env}).")

    async def spend(self, request: web.Request) -> web.Response:
        self._authorize(request)
        period = request.query.get("period", "day")
        by = request.query.get("by", "model")
        if period not in PERIODS:
            raise InvalidRequest(f"`period` must be one of {', '.join(PERIODS)}", param="period")
        if by not in GROUPS:
            raise InvalidRequest(f"`by` must be one of {', '.join(GROUPS)}", param="by")
        ledger = self._accountant.ledger
        if ledger is None:
            raise ServiceUnavailable("The ledger is not open yet.")
        now = self._accountant.now()
        report = await spend_report(ledger, period, by, self._config.budget.timezone, now)
        book = self._accountant.book
        book.roll(now)   # after midnight with no request since, the book still holds yesterday's figures
        report["budget"] = [{"scope": scope or "global", "window": window, "spent_usd": spent, "limit_usd": limit}
                            for scope, window, spent, limit in book.snapshot()]
        return web.Response(body=orjson.dumps(report), content_type="application/json")
