"""Typed keys for what the app factory keeps on the application."""

from __future__ import annotations

from aiohttp import web

from .accounting import Accountant
from .cache import ResponseCache
from .config import Config
from .health import CircuitBreakers
from .metrics import Metrics
from .ratelimits import RateLimits
from .reload import Reloader
from .runtime import RuntimeRef

CONFIG = web.AppKey("config", Config)
RUNTIME = web.AppKey("runtime", RuntimeRef)
BREAKERS = web.AppKey("breakers", CircuitBreakers)
ACCOUNTANT = web.AppKey("accountant", Accountant)
METRICS = web.AppKey("metrics", Metrics)
RATELIMITS = web.AppKey("ratelimits", RateLimits)
RELOADER = web.AppKey("reloader", Reloader)
CACHE = web.AppKey("cache", ResponseCache)
