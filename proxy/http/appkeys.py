"""Typed keys for what the app factory keeps on the application."""

from __future__ import annotations

from aiohttp import web

from proxy.cache.store import ResponseCache
from proxy.config import Config
from proxy.core.breakers import CircuitBreakers
from proxy.core.ratelimits import RateLimits
from proxy.money.accounting import Accountant
from proxy.ops.metrics import Metrics
from proxy.ops.reload import Reloader
from proxy.ops.runtime import RuntimeRef

CONFIG = web.AppKey("config", Config)
RUNTIME = web.AppKey("runtime", RuntimeRef)
BREAKERS = web.AppKey("breakers", CircuitBreakers)
ACCOUNTANT = web.AppKey("accountant", Accountant)
METRICS = web.AppKey("metrics", Metrics)
RATELIMITS = web.AppKey("ratelimits", RateLimits)
RELOADER = web.AppKey("reloader", Reloader)
CACHE = web.AppKey("cache", ResponseCache)
