"""Typed keys for what the app factory keeps on the application."""

from __future__ import annotations

from aiohttp import web

from proxy.cache.response_cache import CacheSlot
from proxy.http.inflight import InFlight
from proxy.money.accounting import Accountant
from proxy.money.reconcile import Reconciler
from proxy.ops.metrics import Metrics
from proxy.ops.reload import Reloader
from proxy.ops.runtime import RuntimeRef, SharedState

RUNTIME = web.AppKey("runtime", RuntimeRef)  # the current config snapshot
STATE = web.AppKey("state", SharedState)  # spend counters, breakers, rate-limit readings
ACCOUNTANT = web.AppKey("accountant", Accountant)
METRICS = web.AppKey("metrics", Metrics)
RELOADER = web.AppKey("reloader", Reloader)
CACHE = web.AppKey("cache", CacheSlot)
RECONCILER = web.AppKey("reconciler", Reconciler)  # estimated costs looked up at OpenRouter
INFLIGHT = web.AppKey("inflight", InFlight)  # upstream work a client hang-up does not cancel
