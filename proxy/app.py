"""The app factory: the one place that builds resources, owns their lifetimes
(cleanup_ctx) and wires routes and middlewares."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Mapping

import aiohttp
from aiohttp import web

from .accounting import Accounting, Sink, log_access
from .app_keys import ACCOUNTING, BREAKERS, CONFIG, RUNTIME, SESSION
from .config import Config
from .handlers import ChatHandler, error_middleware, healthz, list_models
from .health import CircuitBreakers
from .runtime import RuntimeRef, build_runtime, warn_missing_keys

UPSTREAM_CONNECTIONS = 1000


def create_app(config: Config, *, env: Mapping[str, str] | None = None, sinks: Iterable[Sink] = ()) -> web.Application:
    """Build the proxy application for `config`; upstream keys are read from `env` (default: os.environ)."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[error_middleware])
    app[CONFIG] = config
    app[BREAKERS] = CircuitBreakers(config.retry.cooldown)
    app[ACCOUNTING] = Accounting([log_access] if config.logging.access_log else [])
    for sink in sinks:
        app[ACCOUNTING].add(sink)
    app.cleanup_ctx.append(_upstreams(os.environ if env is None else env))

    chat = ChatHandler(app[BREAKERS], app[ACCOUNTING]).chat_completions
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/api/v1/chat/completions", chat)  # clients configured with OpenRouter's own path
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    return app


def _upstreams(env: Mapping[str, str]):
    async def context(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS, ttl_dns_cache=300, keepalive_timeout=60)
        session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        app[SESSION] = session
        runtime = build_runtime(app[CONFIG], session, env, app[BREAKERS])
        warn_missing_keys(runtime)
        app[RUNTIME] = RuntimeRef(runtime)
        try:
            yield
        finally:
            await session.close()

    return context
