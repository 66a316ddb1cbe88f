"""Upstream rate limits: header parsing as plain tables, then steering end to end
(a member known to be exhausted is skipped without a call until its reset)."""

from __future__ import annotations

import logging
import math
import time

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.ratelimits import MAX_READINGS, RateLimits, Reading, _duration, _epoch
from proxy.core.routing import Target
from proxy.emulator import Fault
from tests.support.gateway import proxy_config_text
from tests.support.timing import Clock

NOW = 1_700_000_000.0
HELLO = [{"role": "user", "content": "Say hello in five words."}]
MISTRAL = Target("mistralai/mistral-7b-instruct", "openrouter")


# ------------------------------------------------------------------ pure tables


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1700000005000", NOW + 5),  # OpenRouter: epoch milliseconds
        ("1700000004", NOW + 4),  # epoch seconds
        ("1700000004.5", NOW + 4.5),
        ("30", NOW + 30),  # a small number is a delay in seconds
        ("0", NOW),
        ("", None),
        (None, None),
        ("soon", None),
    ],
)
def test_epoch_resets(value, expected):
    assert _epoch(value, NOW) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("1s", 1.0),
        ("6m0s", 360.0),  # OpenAI's usual request-window reset
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("59.9s", 59.9),
        ("2m", 120.0),
        ("0.5", 0.5),  # a bare number means seconds
        ("", None),
        (None, None),
        ("later", None),
    ],
)
def test_openai_duration_resets(value, seconds):
    assert _duration(value, NOW) == (pytest.approx(NOW + seconds) if seconds is not None else None)


def _headers(**pairs: str) -> CIMultiDict[str]:
    """Response headers as aiohttp hands them over: case-insensitive."""
    return CIMultiDict({name.replace("_", "-"): value for name, value in pairs.items()})


@pytest.mark.parametrize(
    "status, headers, readings, blocked_until",
    [
        # OpenRouter on a 429: limit, remaining 0, reset in epoch ms -> skipped until the reset
        (
            429,
            _headers(X_RateLimit_Limit="20", X_RateLimit_Remaining="0", X_RateLimit_Reset="1700000005000"),
            {"requests": Reading(20, 0, NOW + 5)},
            NOW + 5,
        ),
        # OpenRouter on a success with room left: recorded, not blocked
        (
            200,
            _headers(X_RateLimit_Limit="200", X_RateLimit_Remaining="150", X_RateLimit_Reset="1700000060000"),
            {"requests": Reading(200, 150, NOW + 60)},
            None,
        ),
        # lower-case names (HTTP/2) are the same headers
        (
            200,
            _headers(**{"x_ratelimit_limit": "20", "x_ratelimit_remaining": "0", "x_ratelimit_reset": "1700000002"}),
            {"requests": Reading(20, 0, NOW + 2)},
            NOW + 2,
        ),
        # remaining 0 but the reset already passed: nothing to wait for
        (
            200,
            _headers(X_RateLimit_Limit="20", X_RateLimit_Remaining="0", X_RateLimit_Reset="1699999999000"),
            {"requests": Reading(20, 0, NOW - 1)},
            None,
        ),
        # OpenAI style, every response: both scopes, resets as durations
        (
            200,
            _headers(
                x_ratelimit_limit_requests="500",
                x_ratelimit_remaining_requests="499",
                x_ratelimit_reset_requests="120ms",
                x_ratelimit_limit_tokens="30000",
                x_ratelimit_remaining_tokens="0",
                x_ratelimit_reset_tokens="6m0s",
            ),
            {"requests": Reading(500, 499, NOW + 0.12), "tokens": Reading(30000, 0, NOW + 360)},
            NOW + 360,
        ),
        # a 429 with only Retry-After: blocked for that long, no reading
        (429, _headers(Retry_After="7"), {}, NOW + 7),
        # Retry-After wins over a shorter reset on the same 429
        (
            429,
            _headers(
                Retry_After="9", X_RateLimit_Limit="20", X_RateLimit_Remaining="0", X_RateLimit_Reset="1700000003000"
            ),
            {"requests": Reading(20, 0, NOW + 3)},
            NOW + 9,
        ),
        # garbage is ignored, never raised
        (200, _headers(X_RateLimit_Limit="many", X_RateLimit_Remaining="some"), {}, None),
        (200, _headers(x_ratelimit_remaining_requests="3"), {"requests": Reading(None, 3, None)}, None),
        # a plain success says nothing
        (200, _headers(Content_Type="application/json"), {}, None),
    ],
)
def test_headers_to_readings_and_blocks(status, headers, readings, blocked_until):
    limits = RateLimits(clock=lambda: NOW)
    limits.observe_response(MISTRAL.upstream, MISTRAL.model, status, headers)
    assert {scope: reading for (target, scope), reading in limits.readings().items()} == {
        scope: Reading(r.limit, r.remaining, pytest.approx(r.reset_at) if r.reset_at else None)
        for scope, r in readings.items()
    }
    block = limits.active(NOW).get(MISTRAL)
    if blocked_until is None:
        assert block is None
    else:
        assert block is not None and block.reason == "rate_limited"
        assert block.until == pytest.approx(blocked_until)


def test_a_block_lifts_at_the_reset():
    limits = RateLimits()
    limits.observe(
        MISTRAL,
        _headers(X_RateLimit_Limit="20", X_RateLimit_Remaining="0", X_RateLimit_Reset="1700000005000"),
        200,
        NOW,
    )
    assert MISTRAL in limits.active(NOW + 4.9)
    assert MISTRAL not in limits.active(NOW + 5)
    assert limits.active(NOW + 5) == {}


def test_running_low_is_logged_once_per_descent(caplog):
    limits = RateLimits()
    caplog.set_level(logging.WARNING, logger="orproxy")

    def seen(remaining: str) -> None:
        limits.observe(
            MISTRAL,
            _headers(
                x_ratelimit_limit_requests="100",
                x_ratelimit_remaining_requests=remaining,
                x_ratelimit_reset_requests="1s",
            ),
            200,
            NOW,
            warn_below=0.1,
        )

    for remaining in ("50", "9", "8", "7", "60", "5"):
        seen(remaining)
    warnings = [r.getMessage() for r in caplog.records if "running low" in r.getMessage()]
    assert warnings == [
        "rate limit of mistralai/mistral-7b-instruct on openrouter is running low: 9 of 100 requests left",
        "rate limit of mistralai/mistral-7b-instruct on openrouter is running low: 5 of 100 requests left",
    ]


def test_readings_stay_bounded_when_clients_cycle_through_slugs():
    limits = RateLimits()
    for number in range(MAX_READINGS * 3):
        limits.observe(
            Target(f"vendor/model-{number}", "openrouter"),
            _headers(X_RateLimit_Limit="10", X_RateLimit_Remaining="5"),
            200,
            NOW,
        )
    readings = limits.readings()
    assert len(readings) == MAX_READINGS
    assert (Target(f"vendor/model-{MAX_READINGS * 3 - 1}", "openrouter"), "requests") in readings  # newest kept


# ------------------------------------------------------------------ end to end


def _route(response) -> str:
    return response.headers["x-proxy-route"]


def _calls(emulator, model: str) -> int:
    return sum(1 for r in emulator.state.requests if r.model == model)


@pytest.mark.parametrize("status", [None, 429], ids=["success_says_remaining_0", "429_says_remaining_0"])
async def test_an_exhausted_member_is_skipped_until_its_reset(make_proxy, emulator, status):
    # max_retry_after_s below the reset: a 429 moves on at once rather than waiting on the same member
    clock = Clock()
    proxy = await make_proxy(
        retry="retry: {attempts_per_model: 2, backoff_s: 0.01, max_retry_after_s: 0.5}", clock=clock
    )
    client = proxy.client()
    reset = clock() + 30  # far beyond max_retry_after_s on the executor's real clock too
    emulator.state.faults.set(MISTRAL.model, Fault(status=status, rate_limit=(10, 0, int(reset * 1000)), times=1))

    first = await client.chat.completions.with_raw_response.create(model="cheap", messages=HELLO)
    expected = (
        "mistralai/mistral-7b-instruct=ok"
        if status is None
        else "mistralai/mistral-7b-instruct=http_429 meta-llama/llama-3.1-8b-instruct=ok"
    )
    assert _route(first) == f"cheap: {expected}"
    assert _calls(emulator, MISTRAL.model) == 1

    skipped = await client.chat.completions.with_raw_response.create(model="cheap", messages=HELLO)
    assert (
        _route(skipped)
        == "cheap: meta-llama/llama-3.1-8b-instruct=ok mistralai/mistral-7b-instruct=skipped:rate_limited"
    )
    assert skipped.headers["x-proxy-model"] == "meta-llama/llama-3.1-8b-instruct"
    assert _calls(emulator, MISTRAL.model) == 1, "an exhausted member must be skipped without a call"

    metrics = await _metrics(proxy)
    labels = {"upstream": "openrouter", "scope": "requests", "model": MISTRAL.model}
    assert metrics[("orproxy_ratelimit_remaining", labels_key(labels))] == 0
    assert metrics[("orproxy_ratelimit_limit", labels_key(labels))] == 10
    assert metrics[("orproxy_ratelimit_reset_timestamp_seconds", labels_key(labels))] == pytest.approx(reset, abs=0.01)

    clock.advance(reset - clock() + 0.05)
    again = await client.chat.completions.with_raw_response.create(model="cheap", messages=HELLO)
    assert _route(again) == "cheap: mistralai/mistral-7b-instruct=ok"
    assert _calls(emulator, MISTRAL.model) == 2
    # past its reset the window is full again: the gauge says so rather than a stale 0
    metrics = await _metrics(proxy)
    assert metrics[("orproxy_ratelimit_remaining", labels_key(labels))] == 10


async def test_every_member_exhausted_gives_429_with_the_earliest_reset(proxy, emulator):
    # The real clock, not an injected one: when every member is skipped, the Retry-After is counted
    # from the executor's own wall clock, which create_app does not let a test inject.
    client = proxy.client()
    now = time.time()
    sonnet, mini = "anthropic/claude-sonnet-4.5", "openai/gpt-4o-mini"
    # resets beyond max_retry_after_s (2 s): no waiting, straight to the next member
    emulator.state.faults.set(sonnet, Fault(status=429, rate_limit=(20, 0, int((now + 8) * 1000)), times=1))
    emulator.state.faults.set(mini, Fault(status=429, rate_limit=(20, 0, int((now + 5) * 1000)), times=1))

    with pytest.raises(openai.RateLimitError) as tried:
        await client.chat.completions.create(model="quality", messages=HELLO)
    assert tried.value.response.headers["retry-after"] == "5"
    assert (_calls(emulator, sonnet), _calls(emulator, mini)) == (1, 1)

    # Both are now known to be exhausted: refused without a single upstream call.
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="quality", messages=HELLO)
    elapsed = time.time() - now
    assert refused.value.response.headers["retry-after"] == str(math.ceil(5 - elapsed))
    assert refused.value.body["code"] == "rate_limit_exceeded"
    assert "rate-limited until its reset" in refused.value.body["message"]
    assert (_calls(emulator, sonnet), _calls(emulator, mini)) == (1, 1)


async def test_openai_style_headers_on_every_response_steer_too(make_proxy, emulator, aiohttp_server):
    """An OpenAI-compatible upstream sends x-ratelimit-*-requests/-tokens with reset durations on successes."""
    reset_s = 1.2
    calls = []

    async def completions(request: web.Request) -> web.Response:
        calls.append(await request.json())
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello there, five words."},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11},
        }
        return web.Response(
            body=orjson.dumps(body),
            content_type="application/json",
            headers={
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{int(reset_s * 1000)}ms",
                "x-ratelimit-limit-tokens": "30000",
                "x-ratelimit-remaining-tokens": "29989",
                "x-ratelimit-reset-tokens": "6m0s",
            },
        )

    fake = web.Application()
    fake.router.add_post("/v1/chat/completions", completions)
    openai_like = await aiohttp_server(fake)
    text = proxy_config_text(
        emulator.url,
        """
models:
  solo: {chain: [{model: gpt-4o-mini, upstream: openai}, mistralai/mistral-7b-instruct]}
""",
    ).replace(f"{emulator.url}/v1", f"{str(openai_like.make_url('')).rstrip('/')}/v1")
    clock = Clock()
    proxy = await make_proxy(config_text=text, clock=clock)
    client = proxy.client()

    first = await client.chat.completions.with_raw_response.create(model="solo", messages=HELLO)
    started = clock()
    assert _route(first) == "solo: gpt-4o-mini@openai=ok"
    skipped = await client.chat.completions.with_raw_response.create(model="solo", messages=HELLO)
    assert _route(skipped) == "solo: mistralai/mistral-7b-instruct=ok gpt-4o-mini@openai=skipped:rate_limited"
    assert len(calls) == 1

    metrics = await _metrics(proxy)
    requests = labels_key({"upstream": "openai", "scope": "requests", "model": "gpt-4o-mini"})
    tokens = labels_key({"upstream": "openai", "scope": "tokens", "model": "gpt-4o-mini"})

    def remaining_and_limit(labels):
        return metrics[("orproxy_ratelimit_remaining", labels)], metrics[("orproxy_ratelimit_limit", labels)]

    assert remaining_and_limit(requests) == (0, 500)
    assert remaining_and_limit(tokens) == (29989, 30000)
    assert metrics[("orproxy_ratelimit_reset_timestamp_seconds", tokens)] == pytest.approx(started + 360, abs=2)

    clock.advance(started + reset_s - clock() + 0.1)
    again = await client.chat.completions.with_raw_response.create(model="solo", messages=HELLO)
    assert _route(again) == "solo: gpt-4o-mini@openai=ok"
    assert len(calls) == 2


# ------------------------------------------------------------------ helpers


def labels_key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


async def _metrics(proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/metrics") as response:
        text = await response.text()
    return {
        (sample.name, labels_key(sample.labels)): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
