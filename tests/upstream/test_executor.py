"""The real Executor driving real UpstreamClients against the emulator on a real socket.

Time is injected (wall clock, sleep, jitter, monotonic), so retries and backoff
are checked exactly and nothing waits in real time.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.config import Config, Cooldown, Retry, parse_config
from proxy.core.breakers import BlockView, CircuitBreakers
from proxy.core.errors import UpstreamFailed, UpstreamRejected
from proxy.core.features import extract_features
from proxy.core.routing import Plan, Router, Target
from proxy.emulator import Fault
from proxy.upstream.client import UpstreamClient, iter_batches
from proxy.upstream.executor import Executor
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text

NOW = 1_700_000_000.0
MISTRAL = Target("mistralai/mistral-7b-instruct", "openrouter")
LLAMA = Target("meta-llama/llama-3.1-8b-instruct", "openrouter")
GPT = Target("gpt-4o-mini", "openai")
CHEAP = Plan("cheap", "cheap", targets=(MISTRAL, LLAMA, GPT))
BODY: dict[str, Any] = {"model": "cheap", "messages": [{"role": "user", "content": "Say hello in five words."}]}
# backoff bases 0.2, 0.4, 0.8 s; with the jitter fixed at 0.5 each wait is 3/4 of its base
RETRY = Retry(attempts_per_model=3, backoff_s=0.2, backoff_max_s=5.0, max_retry_after_s=2.0, cooldown=Cooldown())


class FakeTime:
    """Wall clock, monotonic clock and sleep in one: sleeping moves both clocks, instantly."""

    def __init__(self) -> None:
        self.now = NOW
        self.ticks = itertools.count(100.0)  # each monotonic reading is one second after the last
        self.slept: list[float] = []

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return next(self.ticks)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def complete(client: UpstreamClient, payload: bytes, model: str) -> tuple[bytes, dict[str, Any]]:
    response = await client.post(payload, stream=False, model=model)
    return await client.read_json(response)


async def open_stream(client: UpstreamClient, payload: bytes, model: str) -> aiohttp.ClientResponse:
    return await client.post(payload, stream=True, model=model)


@pytest.fixture
def config(emulator) -> Config:
    return parse_config(proxy_config_text(emulator.url), "test-config.yaml")


@pytest.fixture
async def make_clients(config) -> AsyncIterator[Callable[..., dict[str, UpstreamClient]]]:
    made: list[UpstreamClient] = []

    def make(keys: Mapping[str, str] | None = None) -> dict[str, UpstreamClient]:
        keys = keys or {}
        clients = {
            name: UpstreamClient(name, upstream, keys.get(name, UPSTREAM_KEY))
            for name, upstream in config.upstreams.items()
        }
        made.extend(clients.values())
        return clients

    yield make
    for client in made:
        await client.close()


@pytest.fixture
def time_() -> FakeTime:
    return FakeTime()


def executor_for(
    clients: Mapping[str, UpstreamClient], fake: FakeTime, retry: Retry = RETRY, breakers: CircuitBreakers | None = None
) -> Executor:
    return Executor(
        clients,
        retry,
        breakers or CircuitBreakers(),
        wall=fake.wall,
        monotonic=fake.monotonic,
        sleep=fake.sleep,
        jitter=lambda: 0.5,
    )


def called(emulator) -> list[str | None]:
    return [r.model for r in emulator.state.requests]


async def test_a_503_then_success_on_the_same_member(emulator, make_clients, time_):
    emulator.state.faults.set(MISTRAL.model, Fault(status=503, times=1))
    answer = await executor_for(make_clients(), time_).run(CHEAP, BODY, complete)
    assert answer.target == MISTRAL
    raw, payload = answer.result
    assert payload["model"] == MISTRAL.model and raw.startswith(b"{")
    assert [(a.target, a.outcome, a.status, a.duration_s) for a in answer.attempts] == [
        (MISTRAL, "http_503", 503, 1.0),
        (MISTRAL, "ok", 200, 1.0),
    ]
    assert answer.started == 102.0  # the monotonic reading when the answering attempt began
    assert time_.slept == pytest.approx([0.15])
    assert called(emulator) == [MISTRAL.model, MISTRAL.model]


async def test_repeated_503s_fall_back_to_the_next_member_after_backing_off(emulator, make_clients, time_):
    emulator.state.faults.set(MISTRAL.model, Fault(status=503))
    answer = await executor_for(make_clients(), time_).run(CHEAP, BODY, complete)
    assert answer.target == LLAMA
    assert [a.outcome for a in answer.attempts] == ["http_503", "http_503", "http_503", "ok"]
    assert time_.slept == pytest.approx([0.15, 0.3])  # no wait after the member's last attempt
    assert called(emulator) == [MISTRAL.model] * 3 + [LLAMA.model]


@pytest.mark.parametrize(
    "retry_after, slept, answered_by",
    [(1.5, [1.5], MISTRAL), (30, [], LLAMA)],
    ids=["within-the-cap-waits-on-the-member", "beyond-the-cap-moves-on-at-once"],
)
async def test_retry_after_from_the_upstream(emulator, make_clients, time_, retry_after, slept, answered_by):
    emulator.state.faults.set(MISTRAL.model, Fault(status=429, retry_after=retry_after, times=1))
    answer = await executor_for(make_clients(), time_).run(CHEAP, BODY, complete)
    assert answer.target == answered_by
    assert answer.attempts[0].retry_after == retry_after
    assert time_.slept == slept


async def test_a_dropped_connection_is_retried(emulator, make_clients, time_):
    emulator.state.faults.set(MISTRAL.model, Fault(drop=True, times=1))
    answer = await executor_for(make_clients(), time_).run(CHEAP, BODY, complete)
    assert answer.target == MISTRAL
    assert [a.outcome for a in answer.attempts] == ["connect_error", "ok"]


async def test_a_refused_key_skips_to_another_upstream(emulator, make_clients, time_):
    breakers = CircuitBreakers()
    clients = make_clients({"openrouter": "sk-or-wrong-key"})
    answer = await executor_for(clients, time_, breakers=breakers).run(CHEAP, BODY, complete)
    assert answer.target == GPT
    assert [(a.target, a.outcome) for a in answer.attempts] == [(MISTRAL, "http_401"), (GPT, "ok")]
    assert emulator.state.stats["requests"] == 2  # llama, on the same refused upstream, was not called
    assert [(r.path, r.model) for r in emulator.state.requests] == [("/v1/chat/completions", GPT.model)]
    assert time_.slept == []
    assert breakers.active(time_.now) == {}  # the proxy's key is not the model's fault


async def test_every_upstream_refusing_its_key_is_a_502_naming_the_variables(emulator, make_clients, time_):
    clients = make_clients({"openrouter": "sk-or-wrong-key", "openai": "sk-wrong-key"})
    with pytest.raises(UpstreamFailed) as caught:
        await executor_for(clients, time_).run(CHEAP, BODY, complete)
    assert caught.value.status == 502 and caught.value.code == "upstream_auth_failed"
    assert "(TEST_OPENROUTER_KEY, TEST_OPENAI_KEY)" in caught.value.message
    assert emulator.state.stats["requests"] == 2


async def test_a_client_error_comes_back_at_once_with_the_key_redacted(emulator, make_clients, time_):
    emulator.state.faults.set(MISTRAL.model, Fault(status=400, message=f"echo Bearer {UPSTREAM_KEY}"))
    with pytest.raises(UpstreamRejected) as caught:
        await executor_for(make_clients(), time_).run(CHEAP, BODY, complete)
    assert caught.value.status == 400
    assert caught.value.message == "echo Bearer [redacted]"
    assert called(emulator) == [MISTRAL.model]


async def test_a_stream_falls_back_before_its_first_byte(emulator, make_clients, time_):
    emulator.state.faults.set(MISTRAL.model, Fault(status=502))
    answer = await executor_for(make_clients(), time_).run(CHEAP, {**BODY, "stream": True}, open_stream)
    try:
        batches = [batch async for batch in iter_batches(answer.result)]
    finally:
        answer.result.release()
    assert answer.target == LLAMA
    assert batches[-1].done  # the fallback's stream ran to its `data: [DONE]`
    assert called(emulator) == [MISTRAL.model] * 3 + [LLAMA.model]


async def test_failures_of_distinct_requests_open_the_breaker_and_the_next_plan_skips_the_member(
    emulator, make_clients, time_, config
):
    retry = Retry(attempts_per_model=3, backoff_s=0.2, cooldown=Cooldown(failures=2, window_s=60, cooldown_s=30))
    breakers = CircuitBreakers()
    executor = executor_for(make_clients(), time_, retry, breakers)
    router = Router(config)
    features = extract_features(BODY, {})

    def plan() -> Plan:
        return router.plan("cheap", features, BlockView({}, breakers.active(time_.wall())))

    emulator.state.faults.set(MISTRAL.model, Fault(status=503))
    first = await executor.run(plan(), BODY, complete)
    assert first.target == LLAMA
    assert called(emulator) == [MISTRAL.model] * 3 + [LLAMA.model]  # three failures, but one request
    assert not breakers.is_open(MISTRAL, time_.wall())
    await executor.run(plan(), BODY, complete)  # the second request to fail on it opens the breaker

    second_plan = plan()
    assert [(t, b.reason) for t, b in second_plan.skipped] == [(MISTRAL, "cooldown")]
    second = await executor.run(second_plan, BODY, complete)
    assert second.target == LLAMA
    assert [a.target for a in second.attempts] == [LLAMA]

    emulator.state.faults.clear()
    time_.now += 31  # the cooldown is over: the member is tried again, and answers
    third = await executor.run(plan(), BODY, complete)
    assert third.target == MISTRAL
    assert called(emulator)[-2:] == [LLAMA.model, MISTRAL.model]


async def test_a_breaker_opened_by_other_requests_stops_retries(emulator, make_clients, time_, config):
    retry = Retry(attempts_per_model=3, backoff_s=0.2, cooldown=Cooldown(failures=2, window_s=60, cooldown_s=30))
    breakers = CircuitBreakers()
    executor = executor_for(make_clients(), time_, retry, breakers)
    plan = Router(config).plan("cheap", extract_features(BODY, {}), None)
    emulator.state.faults.set(MISTRAL.model, Fault(status=503))

    async def others_fail_meanwhile(client: UpstreamClient, payload: bytes, model: str) -> Any:
        if model == MISTRAL.model:  # two other requests fail on the member while this one waits on it
            for _ in range(2):
                breakers.record_failure(retry.cooldown, MISTRAL, time_.wall())
        return await complete(client, payload, model)

    answer = await executor.run(plan, BODY, others_fail_meanwhile)
    assert answer.target == LLAMA
    assert called(emulator) == [MISTRAL.model, LLAMA.model]  # no retry on a member whose breaker is open


async def test_each_member_gets_the_body_its_upstream_understands(emulator, make_clients, time_):
    """The attempt receives each member's prepared body: OpenRouter-only fields go to OpenRouter only."""
    seen: list[tuple[str, str, dict[str, Any]]] = []
    for target in (MISTRAL, LLAMA):
        emulator.state.faults.set(target.model, Fault(status=503))

    async def recording(client: UpstreamClient, payload: bytes, model: str) -> tuple[bytes, dict[str, Any]]:
        seen.append((client.name, model, orjson.loads(payload)))
        return await complete(client, payload, model)

    body = {**BODY, "provider": {"order": ["Together"]}}
    answer = await executor_for(make_clients(), time_, Retry(attempts_per_model=1)).run(CHEAP, body, recording)
    assert answer.target == GPT
    assert [(name, model, sent["model"], "provider" in sent) for name, model, sent in seen] == [
        ("openrouter", MISTRAL.model, MISTRAL.model, True),
        ("openrouter", LLAMA.model, LLAMA.model, True),
        ("openai", GPT.model, GPT.model, False),
    ]
    assert all(sent["messages"] == BODY["messages"] for _, _, sent in seen)
