"""Member health: the circuit breaker behind `retry.cooldown`.

A target that fails for `failures` distinct requests within `window_s` is skipped
for `cooldown_s`, then tried again. Which of a request's failures count is decided
once the request is over (`blamed`): a failure the request itself caused (the same
request failing on every member it tried, or an upstream error naming its input)
counts against no member, so one client's bad requests cannot take a model away
from everyone else. Time is passed in, never read, so the logic is tested with
plain numbers.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping, Sequence

from proxy.config import Cooldown
from proxy.core.failures import Failure
from proxy.core.routing import Block, Target

MAX_TRACKED = 4096  # targets with a failure window at once
ANYONE = object()  # `active`'s default: every open breaker, whoever opened it


def blamed(failures: Sequence[tuple[Target, Failure]], served: bool) -> list[Target]:
    """The members whose health one finished request's failures count against, each once.

    None when the request looks like the cause: it was not served although two or more members
    were tried (a request that fails everywhere is rarely every member's fault), except for
    failures that cannot come from a request's content (the connection could not be made).
    Errors that name the request's input never count (`Failure.counts_against_member`)."""
    counted = [(target, failure) for target, failure in failures if failure.counts_against_member]
    if counted and not served and len({target for target, _ in failures}) >= 2:
        counted = [(target, failure) for target, failure in counted if failure.reason == "connect_error"]
    return list(dict.fromkeys(target for target, _ in counted))


class CircuitBreakers:
    """State only: failure windows and open breakers. The policy (`retry.cooldown`) comes with
    each call from the config snapshot the request runs on, so a reload changes it for the
    next failure while the counts carry over."""

    def __init__(self) -> None:
        self._failures: dict[Target, deque[tuple[float, object, str | None]]] = {}
        self._open: dict[Target, Block] = {}
        self._owners: dict[Target, frozenset[str]] = {}  # open breakers that only these keys' failures opened

    def record_failure(
        self,
        policy: Cooldown,
        target: Target,
        now: float,
        detail: str = "",
        request: object = None,
        client: str | None = None,
    ) -> bool:
        """Count a failure of `request` (None: a request of its own) made with the client key named
        `client` (None: no key); return True when it opens the breaker, which takes `failures`
        distinct requests within the window."""
        if target not in self._failures and len(self._failures) >= MAX_TRACKED:
            self._forget_stale(policy, now)
        window = self._failures.setdefault(target, deque())
        window.append((now, object() if request is None else request, client))
        while window and window[0][0] <= now - policy.window_s:
            window.popleft()
        if len(window) < policy.failures or len({r for _, r, _ in window}) < policy.failures or policy.cooldown_s <= 0:
            return False
        clients = {c for _, _, c in window}
        window.clear()
        owners = self._owners.get(target, frozenset()) if target in self._open else frozenset()
        if None in clients or len(clients | owners) > 1:
            self._owners.pop(target, None)  # more than one key's requests fail on it: everyone's breaker
        else:
            self._owners[target] = frozenset(c for c in clients if c is not None) | owners
        self._open[target] = Block(
            "cooldown", now + policy.cooldown_s, detail or f"{policy.failures} failures within {policy.window_s:g}s"
        )
        return True

    def _forget_stale(self, policy: Cooldown, now: float) -> None:
        """Direct slugs are chosen by clients: drop windows with no failure left in them, and if
        every one is still live, the oldest, so memory stays bounded whatever clients send."""
        horizon = now - policy.window_s
        for target in [t for t, w in self._failures.items() if not w or w[-1][0] <= horizon]:
            del self._failures[target]
        # Still full of live windows: drop the oldest eighth at once, so the scan above runs once
        # per few hundred new targets rather than once per failure.
        if len(self._failures) >= MAX_TRACKED:
            for target in list(itertools.islice(self._failures, MAX_TRACKED // 8)):
                del self._failures[target]

    def adopt(self, target: Target, block: Block, owners: frozenset[str] | None) -> None:
        """A breaker another process opened (shared state): open here too, until the later of the
        two, and applying to the union of the keys (everyone's once more than one key is involved,
        as when failures of several keys open it here)."""
        current = self._open.get(target)
        if current is not None:
            mine = self._owners.get(target)
            owners = None if owners is None or mine is None or len(owners | mine) > 1 else owners | mine
            if (current.until or 0.0) >= (block.until or 0.0):
                block = current
        self._open[target] = block
        if owners:
            self._owners[target] = owners
        else:
            self._owners.pop(target, None)

    def record_success(self, target: Target) -> None:
        if target in self._failures:
            del self._failures[target]

    def active(self, now: float, client: object = ANYONE) -> dict[Target, Block]:
        """Open breakers at `now`; expired ones are closed (half-open: the next call decides). With
        `client` (a key name, or None for no key), only those that apply to that client's requests."""
        if self._open:
            for target in [t for t, block in self._open.items() if block.until is not None and block.until <= now]:
                del self._open[target]
                self._owners.pop(target, None)
        if client is ANYONE or not self._owners:
            return self._open
        return {t: b for t, b in self._open.items() if t not in self._owners or client in self._owners[t]}

    def is_open(self, target: Target, now: float, client: object = ANYONE) -> bool:
        return target in self.active(now, client)

    def close(self, model: str | None = None) -> list[Target]:
        """Close open breakers (of one model, or all) at once: `POST /admin/unblock`."""
        closed = [t for t in self._open if model is None or t.model == model]
        for target in closed:
            del self._open[target]
            self._owners.pop(target, None)
            self._failures.pop(target, None)
        return closed

    def owners(self, target: Target) -> frozenset[str] | None:
        """The keys an open breaker applies to, or None when it applies to everyone."""
        return self._owners.get(target)


class BlockView:
    """What routing asks per target: is it blocked, and why? Merges the static blocks
    (an upstream without a key) with the live ones (open breakers, exhausted rate limits)."""

    __slots__ = ("_by_target", "_by_upstream")

    def __init__(self, by_upstream: Mapping[str, Block], *by_target: Mapping[Target, Block]) -> None:
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
