"""Poll OpenRouter's GET /key for the key's credit balance, so a dashboard warns before it runs out."""

from __future__ import annotations

import asyncio
import logging

from .metrics import Gauges
from .upstream import UpstreamClient

log = logging.getLogger("orproxy")


async def poll_credits(client: UpstreamClient, gauges: Gauges, interval_s: float) -> None:
    """Forever: read `limit_remaining` and `usage_daily`; a failed poll is logged and retried next round."""
    failures = 0
    while True:
        try:
            data = await client.key_info()
        except Exception as exc:  # noqa: BLE001 - a dashboard gauge must never stop the proxy
            failures += 1
            if failures in (1, 10) or failures % 100 == 0:
                log.warning("could not read the credit balance of upstream %r: %s", client.name, exc)
        else:
            failures = 0
            remaining = data.get("limit_remaining")
            if isinstance(remaining, (int, float)):
                gauges.credits_remaining[client.name] = float(remaining)
            used = data.get("usage_daily")
            if isinstance(used, (int, float)):
                gauges.credits_used_today[client.name] = float(used)
        await asyncio.sleep(interval_s)
