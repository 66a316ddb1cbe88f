"""Typed keys for what the app factory keeps on the application."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .accounting import Accounting
from .config import Config
from .health import CircuitBreakers
from .runtime import RuntimeRef

CONFIG = web.AppKey("config", Config)
SESSION = web.AppKey("session", aiohttp.ClientSession)
RUNTIME = web.AppKey("runtime", RuntimeRef)
BREAKERS = web.AppKey("breakers", CircuitBreakers)
ACCOUNTING = web.AppKey("accounting", Accounting)
