"""Pure: the retry and fallback policy for one request, as a state machine over its plan.

Attempt results and the time go in; a decision comes out: call a member, wait and
call it again, or stop with the one error that best tells the client what happened.
The async executor only drives it, so every rule here is tested as a table with
plain values: no sockets, no sleeping, no clocks (the caller passes `now`, and
the jitter source is injected).

The rules (README, "What the proxy does with a request"): each member gets
`attempts_per_model` tries with equal-jitter backoff on transient failures,
honouring Retry-After up to `max_retry_after_s` (beyond it, the next member at
once); a member whose breaker opened gets no more retries; a client error goes
back at once; a refused key or exhausted credits rule out the rest of that upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from proxy.config import Retry
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
from proxy.core.redact import redact
from proxy.core.routing import Plan, Target


@dataclass(frozen=True, slots=True)
class Call:
    """Call `target` now: the first attempt on a member (`number` is always 1)."""

    target: Target
    number: int = 1


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep `delay_s`, then call the same `target` again as attempt `number`."""

    target: Target
    number: int
    delay_s: float


@dataclass(frozen=True, slots=True)
class Done:
    """`target` answered; its attempt is recorded and the request is served."""

    target: Target


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The chain is exhausted: raise `error`, the single most telling one."""

    error: ProxyError


@dataclass(frozen=True, slots=True)
class ToClient:
    """The upstream refused the request itself (400/413/422): pass its error back as is."""

    error: UpstreamRejected


Decision = Call | Wait | Done | GiveUp | ToClient


class RetryPolicy:
    """One request's walk through one plan. Not reusable: build one per request.

    `key_envs` names, per upstream, the environment variable of its key (for the
    messages that tell an operator what to fix); `secrets` are the upstream keys
    that must never appear in an attempt's or a client error's message.
    """

    def __init__(
        self,
        plan: Plan,
        retry: Retry,
        *,
        key_envs: Mapping[str, str],
        secrets: Sequence[str],
        jitter: Callable[[], float],
    ) -> None:
        self._plan = plan
        self._retry = retry
        self._key_envs = key_envs
        self._secrets = secrets
        self._jitter = jitter
        self._index = -1  # position in plan.targets of the member being tried
        self._number = 0  # attempts made on that member
        self._in_flight: Target | None = None
        self.attempts: list[Attempt] = []
        self._dead_upstreams: dict[str, Failure] = {}

    @property
    def dead_upstreams(self) -> Mapping[str, Failure]:
        """Upstreams ruled out for the rest of the request (refused key, no credits), and why."""
        return self._dead_upstreams

    def start(self, now: float) -> Call | GiveUp:
        """The first decision: call the plan's first member, or give up when it has none."""
        if self._index != -1:
            raise RuntimeError("RetryPolicy.start called twice; build one policy per request")
        return self._next_member(now)

    def succeeded(self, duration_s: float) -> Done:
        target = self._take_in_flight()
        self.attempts.append(Attempt(target, "ok", 200, "", duration_s))
        return Done(target)

    def failed(self, failure: Failure, *, now: float, breaker_open: bool, duration_s: float = 0.0) -> Decision:
        """The decision after an attempt failed. `breaker_open`: whether the member's circuit
        breaker is open now, this failure counted; `now`: wall time, epoch seconds."""
        target = self._take_in_flight()
        message = redact(failure.message, self._secrets)
        self.attempts.append(Attempt(target, failure.reason, failure.status, message, duration_s, failure.retry_after))
        if failure.action is Action.CLIENT:
            return ToClient(UpstreamRejected(failure.status or 400, message, code=failure.code))
        if failure.action in (Action.BAD_KEY, Action.OTHER_UPSTREAM):
            self._dead_upstreams[target.upstream] = failure
            return self._next_member(now)
        # The delay is worked out before the breaker is looked at, as it always was, so an
        # injected jitter source is drawn from in the same order.
        delay = backoff_delay(self._retry, failure, self._number, self._jitter)
        if delay is None or breaker_open:
            return self._next_member(now)
        self._number += 1
        self._in_flight = target
        return Wait(target, self._number, delay)

    def _take_in_flight(self) -> Target:
        target = self._in_flight
        if target is None:
            raise RuntimeError("no attempt in flight: the policy did not ask for a call")
        self._in_flight = None
        return target

    def _next_member(self, now: float) -> Call | GiveUp:
        targets = self._plan.targets
        for index in range(self._index + 1, len(targets)):
            self._index = index
            target = targets[index]
            if target.upstream not in self._dead_upstreams:
                self._number = 1
                self._in_flight = target
                return Call(target)
        self._index = len(targets)
        error = exhausted_error(self._plan, self.attempts, self._dead_upstreams, self._key_envs, now)
        if error.retry_after is not None:  # an upstream's Retry-After of 1e9 is not passed on as it is
            error.retry_after = min(error.retry_after, self._retry.max_block_s)
        return GiveUp(error)


def backoff_delay(retry: Retry, failure: Failure, number: int, jitter: Callable[[], float]) -> float | None:
    """Seconds before retrying the same member after its attempt `number` failed, or None to move on."""
    if failure.action is not Action.RETRY or number >= retry.attempts_per_model:
        return None
    if failure.retry_after is not None:
        return failure.retry_after if failure.retry_after <= retry.max_retry_after_s else None
    base = min(retry.backoff_max_s, retry.backoff_s * 2 ** (number - 1))
    return base / 2 + base / 2 * jitter()  # "equal jitter": never zero, never in lockstep


def exhausted_error(
    plan: Plan,
    attempts: Sequence[Attempt],
    dead_upstreams: Mapping[str, Failure],
    key_envs: Mapping[str, str],
    now: float,
) -> ProxyError:
    """The single error that best explains why no member answered."""
    who = f"'{plan.chain_owner}'" if plan.chain_owner else f"'{plan.requested}'"
    if not attempts:
        return _nothing_tried(plan, who, key_envs, now)
    failed = [a for a in attempts if a.outcome != "ok"]
    listing = "; ".join(f"{a.target}: {a.status or '-'} {a.outcome} ({_clip(a.message)})" for a in failed)
    skipped = "".join(f"; skipped {t}: {b.reason}" for t, b in plan.skipped)
    bad_keys = [name for name, f in dead_upstreams.items() if f.action is Action.BAD_KEY]
    if bad_keys and all(a.outcome == "http_401" for a in failed):
        envs = ", ".join(key_envs.get(name, name) for name in bad_keys)
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


def _nothing_tried(plan: Plan, who: str, key_envs: Mapping[str, str], now: float) -> ProxyError:
    blocks = [block for _, block in plan.skipped]
    listing = "; ".join(f"{t}: {b.reason}" + (f" ({b.detail})" if b.detail else "") for t, b in plan.skipped)
    if blocks and all(b.reason == "no_api_key" for b in blocks):
        envs = sorted({key_envs.get(t.upstream, t.upstream) for t, _ in plan.skipped})
        return UpstreamKeyMissing(
            f"The proxy has no upstream API key: set the environment variable "
            f"{' or '.join(envs)} where the proxy runs, then restart it."
        )
    waits = [b.until for b in blocks if b.until is not None]
    retry_after = max(0.0, min(waits) - now) if waits else None
    if blocks and all(b.reason == "rate_limited" for b in blocks):
        return RateLimited(f"Every member of {who} is rate-limited until its reset: {listing}", retry_after=retry_after)
    return UpstreamUnavailable(f"Every member of {who} is unavailable right now: {listing}", retry_after=retry_after)


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
