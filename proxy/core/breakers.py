"""Member health: the circuit breaker behind `retry.cooldown`.

A target that fails `failures` times within `window_s` is skipped for
`cooldown_s`, then tried again. Time is passed in, never read, so the logic is
tested with plain numbers.
"""

from __future__ import annotations

import itertools
from collections import deque

from proxy.config import Cooldown
from proxy.core.routing import Block, Target

MAX_TRACKED = 4096  # targets with a failure window at once


class CircuitBreakers:
    """State only: failure windows and open breakers. The policy (`retry.cooldown`) comes with
    each call from the config snapshot the request runs on, so a reload changes it for the
    next failure while the counts carry over."""

    def __init__(self) -> None:
        self._failures: dict[Target, deque[float]] = {}
        self._open: dict[Target, Block] = {}

    def record_failure(self, policy: Cooldown, target: Target, now: float, detail: str = "") -> bool:
        """Count a failure; return True when it opens the breaker."""
        if target not in self._failures and len(self._failures) >= MAX_TRACKED:
            self._forget_stale(policy, now)
        window = self._failures.setdefault(target, deque())
        window.append(now)
        while window and window[0] <= now - policy.window_s:
            window.popleft()
        if len(window) >= policy.failures and policy.cooldown_s > 0:
            window.clear()
            until = now + policy.cooldown_s
            self._open[target] = Block(
                "cooldown", until, detail or f"{policy.failures} failures within {policy.window_s:g}s"
            )
            return True
        return False

    def _forget_stale(self, policy: Cooldown, now: float) -> None:
        """Direct slugs are chosen by clients: drop windows with no failure left in them, and if
        every one is still live, the oldest, so memory stays bounded whatever clients send."""
        horizon = now - policy.window_s
        for target in [t for t, w in self._failures.items() if not w or w[-1] <= horizon]:
            del self._failures[target]
        # Still full of live windows: drop the oldest eighth at once, so the scan above runs once
        # per few hundred new targets rather than once per failure.
        if len(self._failures) >= MAX_TRACKED:
            for target in list(itertools.islice(self._failures, MAX_TRACKED // 8)):
                del self._failures[target]

    def record_success(self, target: Target) -> None:
        if target in self._failures:
            del self._failures[target]

    def active(self, now: float) -> dict[Target, Block]:
        """Open breakers at `now`; expired ones are closed (half-open: the next call decides)."""
        if self._open:
            for target in [t for t, block in self._open.items() if block.until is not None and block.until <= now]:
                del self._open[target]
        return self._open

    def is_open(self, target: Target, now: float) -> bool:
        return target in self.active(now)


class BlockView:
    """What routing asks per target: is it blocked, and why? Merges the static blocks
    (an upstream without a key) with the live ones (open breakers, exhausted rate limits)."""

    __slots__ = ("_by_target", "_by_upstream")

    def __init__(self, by_upstream: dict[str, Block], *by_target: dict[Target, Block]) -> None:
        self._by_upstream = by_upstream
        self._by_target = tuple(blocks for blocks in by_target if blocks)

    def __bool__(self) -> bool:
        return bool(self._by_upstream or self._by_target)

    def get(self, target: Target) -> Block | None:
        block = self._by_upstream.get(target.upstream)
        if block is None:
            for blocks in self._by_target:
                block = blocks.get(target)
                if block is not None:
                    break
        return block
