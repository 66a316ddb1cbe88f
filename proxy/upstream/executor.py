"""Runs a routing plan: retries with backoff and Retry-After, cooldowns, fallback.

The plan says who to try and in what order; `failures.classify_status` says
what each failure means; this module only follows both, and turns an
exhausted chain into the one error that best tells the client what happened.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from proxy.config import Retry
from proxy.core.breakers import CircuitBreakers
from proxy.core.errors import (
    ProxyError,
    RateLimited,
    UpstreamFailed,
    UpstreamKeyMissing,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.core.failures import Action, Failure
from proxy.core.record import Attempt
from proxy.core.routing import Plan, Target
from proxy.upstream.client import UpstreamClient, UpstreamError

T = TypeVar("T")


@dataclass(slots=True)
class Answer(Generic[T]):
    target: Target
    result: T
    attempts: list[Attempt] = field(default_factory=list)
    started: float = 0.0  # monotonic time the answering attempt began


class Executor:
    def __init__(
        self,
        clients: Mapping[str, UpstreamClient],
        retry: Retry,
        breakers: CircuitBreakers,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._clients = clients
        self._retry = retry
        self._breakers = breakers
        self._wall = wall
        self._monotonic = monotonic
        self._sleep = sleep
        self._jitter = jitter
        self._secrets = tuple(c.api_key for c in clients.values() if c.api_key)

    async def run(
        self, plan: Plan, body: dict[str, Any], attempt: Callable[[UpstreamClient, bytes, str], Awaitable[T]]
    ) -> Answer[T]:
        """Try the plan's targets in order until `attempt` succeeds for one."""
        attempts: list[Attempt] = []
        dead_upstreams: dict[str, Failure] = {}
        for target in plan.targets:
            if target.upstream in dead_upstreams:
                continue
            client = self._clients[target.upstream]
            payload = client.prepare_body(body, target.model)
            for number in range(1, self._retry.attempts_per_model + 1):
                started = self._monotonic()
                try:
                    result = await attempt(client, payload, target.model)
                except UpstreamError as exc:
                    failure = exc.failure
                    attempts.append(
                        Attempt(
                            target,
                            failure.reason,
                            failure.status,
                            self._redact(failure.message),
                            self._monotonic() - started,
                            failure.retry_after,
                        )
                    )
                    if failure.counts_against_member:
                        self._breakers.record_failure(self._retry.cooldown, target, self._wall())
                    if failure.action is Action.CLIENT:
                        raise UpstreamRejected(
                            failure.status or 400, self._redact(failure.message), code=failure.code
                        ) from None
                    if failure.action in (Action.BAD_KEY, Action.OTHER_UPSTREAM):
                        dead_upstreams[target.upstream] = failure
                        break
                    delay = self._retry_delay(failure, number)
                    if delay is None or self._breakers.is_open(target, self._wall()):
                        break
                    await self._sleep(delay)
                    continue
                self._breakers.record_success(target)
                attempts.append(Attempt(target, "ok", 200, "", self._monotonic() - started))
                return Answer(target, result, attempts, started)
        raise exhausted_error(plan, attempts, dead_upstreams, self._clients, self._wall())

    def _retry_delay(self, failure: Failure, number: int) -> float | None:
        """Seconds before retrying the same member, or None to move on to the next one."""
        if failure.action is not Action.RETRY or number >= self._retry.attempts_per_model:
            return None
        if failure.retry_after is not None:
            return failure.retry_after if failure.retry_after <= self._retry.max_retry_after_s else None
        base = min(self._retry.backoff_max_s, self._retry.backoff_s * 2 ** (number - 1))
        return base / 2 + base / 2 * self._jitter()  # "equal jitter": never zero, never in lockstep

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text


def exhausted_error(
    plan: Plan,
    attempts: list[Attempt],
    dead_upstreams: Mapping[str, Failure],
    clients: Mapping[str, UpstreamClient],
    now: float,
) -> ProxyError:
    """The single error that best explains why no member answered."""
    who = f"'{plan.chain_owner}'" if plan.chain_owner else f"'{plan.requested}'"
    if not attempts:
        return _nothing_tried(plan, who, clients, now)
    failed = [a for a in attempts if a.outcome != "ok"]
    listing = "; ".join(f"{a.target}: {a.status or '-'} {a.outcome} ({_clip(a.message)})" for a in failed)
    skipped = "".join(f"; skipped {t}: {b.reason}" for t, b in plan.skipped)
    bad_keys = [name for name, f in dead_upstreams.items() if f.action is Action.BAD_KEY]
    if bad_keys and all(a.outcome == "http_401" for a in failed):
        envs = ", ".join(_key_env(clients, name) for name in bad_keys)
        return UpstreamFailed(
            f"The upstream refused the proxy's own API key ({envs}); this is a proxy "
            f"configuration problem, not your key. Attempts: {listing}",
            code="upstream_auth_failed",
        )
    if all(a.status == 429 for a in failed):
        waits = [a.retry_after for a in failed if a.retry_after is not None]
        return RateLimited(
            f"Every member of {who} is rate-limited upstream. Attempts: {listing}{skipped}",
            retry_after=min(waits) if waits else 1.0,
        )
    if all(a.outcome == "timeout" for a in failed):
        return UpstreamTimeout(f"Every member of {who} timed out. Attempts: {listing}{skipped}")
    return UpstreamFailed(f"Every member of {who} failed ({len(failed)} attempts): {listing}{skipped}")


def _nothing_tried(plan: Plan, who: str, clients: Mapping[str, UpstreamClient], now: float) -> ProxyError:
    blocks = [block for _, block in plan.skipped]
    listing = "; ".join(f"{t}: {b.reason}" + (f" ({b.detail})" if b.detail else "") for t, b in plan.skipped)
    if blocks and all(b.reason == "no_api_key" for b in blocks):
        envs = sorted({_key_env(clients, t.upstream) for t, _ in plan.skipped})
        return UpstreamKeyMissing(
            f"The proxy has no upstream API key: set the environment variable "
            f"{' or '.join(envs)} where the proxy runs, then restart it."
        )
    waits = [b.until for b in blocks if b.until is not None]
    retry_after = max(0.0, min(waits) - now) if waits else None
    if blocks and all(b.reason == "rate_limited" for b in blocks):
        return RateLimited(f"Every member of {who} is rate-limited until its reset: {listing}", retry_after=retry_after)
    return UpstreamUnavailable(f"Every member of {who} is unavailable right now: {listing}", retry_after=retry_after)


def _key_env(clients: Mapping[str, UpstreamClient], upstream: str) -> str:
    client = clients.get(upstream)
    return client.key_env if client else upstream


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["Answer", "Attempt", "Executor", "exhausted_error"]
