"""Poll OpenRouter's GET /key for the key's credit balance, so a dashboard warns before it runs out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from proxy.ops.metrics import Gauges
from proxy.ops.runtime import RuntimeRef

log = logging.getLogger("orproxy")


async def poll_credits(runtimes: RuntimeRef, gauges: Gauges, clock: Callable[[], float] = time.monotonic) -> None:
    """Forever: for each OpenRouter upstream with a key and `credits_poll_s > 0`, read `limit_remaining`
    and `usage_daily` when its interval is due. The upstreams are looked up afresh every round, so a
    reload that adds, replaces or removes one is followed. A failed poll is logged and retried."""
    due: dict[str, float] = {}
    failures: dict[str, int] = {}
    while True:
        runtime = runtimes.current
        now = clock()
        for name, client in runtime.clients.items():
            interval = runtime.config.upstreams[name].credits_poll_s
            if client.kind != "openrouter" or not client.api_key or interval <= 0 or due.get(name, 0.0) > now:
                continue
            due[name] = now + interval
            try:
                data = await client.key_info()
            except Exception as exc:
                failures[name] = failures.get(name, 0) + 1
                if failures[name] in (1, 10) or failures[name] % 100 == 0:
                    log.warning("could not read the credit balance of upstream %r: %s", name, exc)
                continue
            failures[name] = 0
            remaining = data.get("limit_remaining")
            if isinstance(remaining, (int, float)):
                gauges.credits_remaining[name] = float(remaining)
            used = data.get("usage_daily")
            if isinstance(used, (int, float)):
                gauges.credits_used_today[name] = float(used)
        for name in [n for n in gauges.credits_remaining if n not in runtime.clients]:
            del gauges.credits_remaining[name]  # an upstream removed by a reload has no balance to show
        # Until the next poll is due; re-check at least every second, so a reload is noticed soon.
        wait = min((when for name, when in due.items() if name in runtime.clients), default=now + 1.0) - clock()
        await asyncio.sleep(min(1.0, max(0.01, wait)))
