"""Drives the retry policy for one request: the IO half of `proxy.core.retry`.

The policy decides who to call, when to wait and which error to raise; this
module only does what it says: prepares each member's body, awaits the call,
sleeps, and keeps the circuit breakers told of every result.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from proxy.config import Retry
from proxy.core.apis import CHAT, Api
from proxy.core.breakers import CircuitBreakers, blamed
from proxy.core.failures import Failure
from proxy.core.overhead import Overhead
from proxy.core.record import Attempt
from proxy.core.retry import Call, Decision, GiveUp, RetryPolicy, ToClient, Wait
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
        self._key_envs = {name: c.key_env for name, c in clients.items()}

    @property
    def secrets(self) -> tuple[str, ...]:
        """The upstream keys this executor sends: what no answer may carry back to a client."""
        return self._secrets

    async def run(
        self,
        plan: Plan,
        body: dict[str, Any],
        attempt: Callable[[UpstreamClient, bytes, str], Awaitable[T]],
        key: str | None = None,
        api: Api = CHAT,
        overhead: Overhead | None = None,
    ) -> Answer[T]:
        """Try the plan's targets as the policy says until `attempt` succeeds for one. `key`: the
        name of the request's client key, which scopes the breakers its failures open; `api`: the
        client's API, which says what each upstream is sent; `overhead`: told how long the attempts
        and the backoff between them waited (on the real clock, whatever clock the policy reads)."""
        policy = RetryPolicy(plan, self._retry, key_envs=self._key_envs, secrets=self._secrets, jitter=self._jitter)
        failures: list[tuple[Target, Failure]] = []  # told to the breakers once the request is over
        decision: Decision = policy.start(self._wall())
        while isinstance(decision, Call):
            target = decision.target
            client = self._clients[target.upstream]
            cached = api.with_prompt_cache(body, target.model, client.kind) if plan.prompt_cache else None
            # Once per member, reused by its retries.
            payload = api.prepare(body if cached is None else cached, target.model, client.kind)
            while True:
                started = self._monotonic()
                waiting = time.perf_counter()
                try:
                    result = await attempt(client, payload, target.model)
                except UpstreamError as exc:
                    _waited(overhead, waiting)
                    failures.append((target, exc.failure))
                    decision = self._failed(policy, target, exc.failure, started, key)
                    if not isinstance(decision, Wait):
                        break
                    waiting = time.perf_counter()
                    await self._sleep(decision.delay_s)
                    _waited(overhead, waiting)
                    continue
                _waited(overhead, waiting)
                self._breakers.record_success(target)
                self._blame(failures, True, key)
                policy.succeeded(self._monotonic() - started)
                return Answer(target, result, policy.attempts, started)
        self._blame(failures, False, key)
        if isinstance(decision, GiveUp | ToClient):
            decision.error.attempts = tuple(policy.attempts)
            raise decision.error
        raise RuntimeError(f"the retry policy stopped without an error: {decision!r}")

    def _failed(
        self, policy: RetryPolicy, target: Target, failure: Failure, started: float, client: str | None
    ) -> Decision:
        duration = self._monotonic() - started
        now = self._wall()
        breaker_open = self._breakers.is_open(target, now, client)  # opened by other requests' failures
        return policy.failed(failure, now=now, breaker_open=breaker_open, duration_s=duration)

    def _blame(self, failures: list[tuple[Target, Failure]], served: bool, client: str | None) -> None:
        """Count this request's failures against the members they blame (`breakers.blamed`), as one request."""
        if not failures:
            return
        now, request = self._wall(), object()
        for target in blamed(failures, served):
            self._breakers.record_failure(self._retry.cooldown, target, now, request=request, client=client)


def _waited(overhead: Overhead | None, since: float) -> None:
    if overhead is not None:
        overhead.waited_s += time.perf_counter() - since


__all__ = ["Answer", "Attempt", "Executor"]
