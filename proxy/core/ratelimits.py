"""Upstream rate-limit state, read from response headers; it steers routing.

OpenRouter sends `X-RateLimit-Limit/Remaining/Reset` (reset in epoch
milliseconds), mostly on 429s; OpenAI-style upstreams send
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every response, with
resets as durations such as `1s` or `6m0s`. The latest reading per upstream and
model is kept; a target whose remaining is 0 until a reset in the future is
skipped without a call. Time is passed in; nothing here does IO.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxy.core.failures import parse_retry_after
from proxy.core.routing import Block, Target

log = logging.getLogger("orproxy")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Reading:
    limit: float | None
    remaining: float
    reset_at: float | None  # epoch seconds


_SIGNALS = ("X-RateLimit-Remaining", "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens")
# Direct slugs are chosen by clients, so readings are keyed by values from outside: keep only the
# most recently updated ones, so a client cycling through model names cannot grow this without end.
MAX_READINGS = 1024


DEFAULT_MAX_BLOCK_S = 3600.0


class RateLimits:
    """State only: the latest readings and the blocks they imply. `warn_below` (the config's
    `rate_limits.warn_below`) and `max_block_s` (`retry.max_block_s`: no upstream may block a
    member for longer) come with each call from the snapshot the request runs on."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._readings: dict[tuple[Target, str], Reading] = {}
        self._blocked: dict[Target, Block] = {}
        self._clock = clock
        self._max_until = float("inf")  # now + retry.max_block_s, set by each observation

    def observe_response(
        self,
        upstream: str,
        model: str,
        status: int,
        headers: Mapping[str, str],
        *,
        warn_below: float = 0.1,
        max_block_s: float = DEFAULT_MAX_BLOCK_S,
    ) -> None:
        """The upstream clients' hook: a few header lookups when the response says nothing of limits."""
        if status != 429 and not any(name in headers for name in _SIGNALS):
            return
        now = self._clock()
        self.observe(Target(model, upstream), headers, status, now, warn_below=warn_below, max_block_s=max_block_s)

    def observe(
        self,
        target: Target,
        headers: Mapping[str, str],
        status: int,
        now: float,
        *,
        warn_below: float = 0.1,
        max_block_s: float = DEFAULT_MAX_BLOCK_S,
    ) -> None:
        """Record what a response's headers say about the limits."""
        self._max_until = now + max_block_s
        if "X-RateLimit-Remaining" in headers:
            self._record(
                warn_below,
                target,
                "requests",
                headers.get("X-RateLimit-Limit"),
                headers["X-RateLimit-Remaining"],
                _epoch(headers.get("X-RateLimit-Reset"), now),
                now,
            )
        for scope in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{scope}")
            if remaining is not None and "X-RateLimit-Remaining" not in headers:
                self._record(
                    warn_below,
                    target,
                    scope,
                    headers.get(f"x-ratelimit-limit-{scope}"),
                    remaining,
                    _duration(headers.get(f"x-ratelimit-reset-{scope}"), now),
                    now,
                )
        if status == 429:
            wait = parse_retry_after(headers, now)
            if wait is not None and wait > 0:
                self._block(target, now + wait, "429 with Retry-After")

    def _record(
        self,
        warn_below: float,
        target: Target,
        scope: str,
        limit: str | None,
        remaining: str,
        reset_at: float | None,
        now: float,
    ) -> None:
        try:
            left = float(remaining)
            cap = float(limit) if limit not in (None, "") else None
        except (TypeError, ValueError):
            return
        key = (target, scope)
        previous = self._readings.pop(key, None)  # re-inserted last: the dict's order is least recent first
        self._readings[key] = Reading(cap, left, reset_at)
        if len(self._readings) > MAX_READINGS:
            del self._readings[next(iter(self._readings))]
        if left <= 0 and reset_at is not None and reset_at > now:
            self._block(target, reset_at, f"{scope} remaining 0")
        elif cap and left < cap * warn_below and not _low(previous, warn_below):
            # Said once when the limit runs low, not on every response while it stays low.
            log.warning(
                "rate limit of %s on %s is running low: %g of %g %s left",
                target.model,
                target.upstream,
                left,
                cap,
                scope,
            )

    def _block(self, target: Target, until: float, detail: str) -> None:
        if until > self._max_until:
            until, detail = self._max_until, f"{detail} (capped by retry.max_block_s)"
        current = self._blocked.get(target)
        if current is None or (current.until or 0) < until:
            self._blocked[target] = Block("rate_limited", until, f"{detail} until reset")

    def adopt(self, target: Target, block: Block) -> None:
        """A block another process saw (shared state): kept until the later of the two."""
        current = self._blocked.get(target)
        if current is None or (current.until or 0.0) < (block.until or 0.0):
            self._blocked[target] = block

    def active(self, now: float) -> dict[Target, Block]:
        if self._blocked:
            for target in [t for t, b in self._blocked.items() if b.until is not None and b.until <= now]:
                del self._blocked[target]
        return self._blocked

    def readings(self) -> dict[tuple[Target, str], Reading]:
        return self._readings

    def clear(self, model: str | None = None) -> list[Target]:
        """Lift the blocks (of one model, or all) and forget their readings: a reload, or
        `POST /admin/unblock`, gives every member its chance again at once."""
        lifted = [t for t in self._blocked if model is None or t.model == model]
        for target in lifted:
            del self._blocked[target]
        for key in [k for k in self._readings if model is None or k[0].model == model]:
            del self._readings[key]
        return lifted


def _low(reading: Reading | None, warn_below: float) -> bool:
    return reading is not None and bool(reading.limit) and reading.remaining < (reading.limit or 0.0) * warn_below


def _epoch(value: str | None, now: float) -> float | None:
    if not value:
        return None
    try:
        stamp = float(value)
    except ValueError:
        return None
    return stamp / 1000.0 if stamp > 1e11 else (stamp if stamp > 1e9 else now + stamp)


def _duration(value: str | None, now: float) -> float | None:
    """OpenAI's reset durations: `1s`, `6m0s`, `20ms`, `1h2m3.5s`; a bare number means seconds."""
    if not value:
        return None
    try:
        return now + float(value)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts:
        return None
    return now + sum(float(amount) * _UNIT[unit] for amount, unit in parts)
