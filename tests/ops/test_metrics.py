"""GET /metrics: a valid exposition (prometheus_client's parser and promtool agree),
values that match the traffic the emulator saw, and labels that stay bounded."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.emulator import Fault
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text
from tests.support.timing import Clock, wait_for

HELLO = [{"role": "user", "content": "Say hello in five words."}]
SONNET, MINI, MISTRAL = "anthropic/claude-sonnet-4.5", "openai/gpt-4o-mini", "mistralai/mistral-7b-instruct"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def promtool() -> str:
    """promtool's path; in CI (CI=true) its absence is a failure, elsewhere a skip that says how to get it."""
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(
            "promtool is not installed, and CI must run this test: .ci/run installs Debian's "
            "`prometheus` package when it is missing; check that step"
        )
    pytest.skip("promtool is not installed (apt-get install prometheus); CI runs this test")


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def scrape(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")  # Prometheus' text format
        return await response.text()


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def series_count(text: str) -> int:
    return sum(len(family.samples) for family in text_string_to_metric_families(text))


def duplicates(text: str) -> list[str]:
    """Samples sharing a name and label set: Prometheus would drop all but one."""
    seen = Counter(
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )
    return [f"{name}{dict(labels)}" for (name, labels), count in seen.items() if count > 1]


def total(found: Samples, name: str, **where: str) -> float:
    return sum(
        value
        for (sample, labels), value in found.items()
        if sample == name and all(dict(labels).get(k) == v for k, v in where.items())
    )


async def credits_caught_up(url: str, emulator) -> Samples:
    """The samples once the credit gauges show what the emulator has billed so far (the poller runs
    in the background, every `credits_poll_s` of real time)."""
    balance = key("orproxy_upstream_credits_remaining_usd", upstream="openrouter")
    used = key("orproxy_upstream_usage_daily_usd", upstream="openrouter")

    async def current() -> Samples | None:
        found = samples(await scrape(url))
        usage = emulator.state.key_usage
        balance_seen = found.get(balance) == pytest.approx(100.0 - usage, rel=1e-9)
        usage_seen = found.get(used) == pytest.approx(usage, rel=1e-9)
        return found if balance_seen and usage_seen else None

    return await wait_for(current, message="the credit gauges never caught up with the emulator's usage")


def with_credit_polling(emulator_url: str, seconds: float, extra: str = "") -> str:
    text = proxy_config_text(emulator_url)
    marker = "    api_key_env: TEST_OPENROUTER_KEY\n"
    assert marker in text
    return text.replace(marker, f"{marker}    credits_poll_s: {seconds}\n", 1) + extra


# ------------------------------------------------------------------ the exposition


async def test_exposition_parses_and_promtool_reports_nothing(make_proxy, emulator):
    tool = promtool()
    proxy = await make_proxy(config_text=with_credit_polling(emulator.url, 0.1, "budget: {daily_usd: 5}\n"))
    client = proxy.client()
    emulator.state.faults.set(MISTRAL, Fault(rate_limit=(100, 7, 4_000_000_000_000)))
    emulator.state.faults.set(SONNET, Fault(status=503))
    await client.chat.completions.create(model="cheap", messages=HELLO)
    await client.chat.completions.create(model="quality", messages=HELLO)
    async for _ in await client.chat.completions.create(model="balanced", messages=HELLO, stream=True):
        pass

    async def polled() -> str | None:  # the poller's first round, at start-up
        text = await scrape(proxy.url)
        return text if 'orproxy_upstream_credits_remaining_usd{upstream="openrouter"}' in text else None

    text = await wait_for(polled, message="no credit poll")

    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    for name, kind in {
        "orproxy_requests": "counter",
        "orproxy_cost_usd": "counter",
        "orproxy_baseline_cost_usd": "counter",
        "orproxy_tokens": "counter",
        "orproxy_attempts": "counter",
        "orproxy_fallbacks": "counter",
        "orproxy_request_duration_seconds": "histogram",
        "orproxy_upstream_duration_seconds": "histogram",
        "orproxy_time_to_first_token_seconds": "histogram",
        "orproxy_overhead_seconds": "histogram",
        "orproxy_in_flight_requests": "gauge",
        "orproxy_budget_spent_usd": "gauge",
        "orproxy_budget_limit_usd": "gauge",
        "orproxy_budget_downgrade_step": "gauge",
        "orproxy_model_cooldown": "gauge",
        "orproxy_ratelimit_remaining": "gauge",
        "orproxy_ratelimit_limit": "gauge",
        "orproxy_ratelimit_reset_timestamp_seconds": "gauge",
        "orproxy_upstream_credits_remaining_usd": "gauge",
    }.items():
        assert families.get(name) == kind, f"{name} should be a {kind}, the exposition has {families.get(name)}"
    for counter in ("orproxy_requests_total", "orproxy_cost_usd_total", "orproxy_tokens_total"):
        assert f"\n{counter}{{" in text  # counters carry _total in the exposition
    assert duplicates(text) == []

    checked = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, ""), (
        f"promtool check metrics complained:\n{checked.stdout}{checked.stderr}"
    )


# ------------------------------------------------------------------ values after known traffic


@pytest.mark.realtime  # the credit poller sleeps on the real clock between polls
async def test_values_match_the_traffic(make_proxy, emulator):
    clock = Clock()  # the budget's windows, read at a time the test knows
    proxy = await make_proxy(
        config_text=with_credit_polling(emulator.url, 0.05, "budget: {daily_usd: 5}\n"), clock=clock
    )
    client = proxy.client()
    billed = 0.0
    tokens: Counter[tuple[str, str]] = Counter()

    def book(model: str, usage) -> None:
        nonlocal billed
        billed += usage.model_extra["cost"]
        tokens[(model, "prompt")] += usage.prompt_tokens
        tokens[(model, "completion")] += usage.completion_tokens

    for _ in range(3):
        reply = await client.chat.completions.create(model="cheap", messages=HELLO)
        book(MISTRAL, reply.usage)
    for _ in range(2):
        stream = await client.chat.completions.create(
            model="cheap", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.usage is not None:
                book(MISTRAL, chunk.usage)

    # The primary of `quality` fails: 2 attempts, fallback; the third request to fail on it opens its
    # breaker (failures of 3 distinct requests within 60 s), then it is skipped without a call.
    emulator.state.faults.set(SONNET, Fault(status=503))
    for _ in range(4):
        reply = await client.chat.completions.create(model="quality", messages=HELLO)
        assert reply.model == MINI
        book(MINI, reply.usage)

    found = await credits_caught_up(proxy.url, emulator)

    assert billed > 0 and billed == pytest.approx(emulator.state.key_usage, rel=1e-9)
    assert total(found, "orproxy_cost_usd_total") == pytest.approx(billed, rel=1e-9)
    assert found[key("orproxy_cost_usd_total", virtual_model="cheap", model=MISTRAL, key="none", api="chat")] > 0
    for (model, kind), count in tokens.items():
        assert found[key("orproxy_tokens_total", model=model, kind=kind, api="chat")] == count
    assert found[key("orproxy_requests_total", virtual_model="cheap", model=MISTRAL, status="200", api="chat")] == 5
    assert found[key("orproxy_requests_total", virtual_model="quality", model=MINI, status="200", api="chat")] == 4
    assert found[key("orproxy_request_duration_seconds_count", virtual_model="cheap", api="chat")] == 5
    assert found[key("orproxy_time_to_first_token_seconds_count", model=MISTRAL)] == 2
    assert total(found, "orproxy_time_to_first_token_seconds_count") == 2  # only streams have a first token
    assert total(found, "orproxy_baseline_cost_usd_total") > 0

    assert found[key("orproxy_attempts_total", model=SONNET, outcome="http_503")] == 6
    assert found[key("orproxy_attempts_total", model=MINI, outcome="ok")] == 4
    assert found[key("orproxy_attempts_total", model=MISTRAL, outcome="ok")] == 5
    assert found[key("orproxy_upstream_duration_seconds_count", model=SONNET)] == 6
    assert found[key("orproxy_fallbacks_total", virtual_model="quality", from_model=SONNET, reason="http_503")] == 3
    assert total(found, "orproxy_fallbacks_total") == 3
    assert found[key("orproxy_model_cooldown", model=SONNET)] == 1
    assert total(found, "orproxy_model_cooldown") == 1

    assert found[key("orproxy_budget_spent_usd", window="daily", key="all")] == pytest.approx(billed, rel=1e-9)
    assert found[key("orproxy_budget_limit_usd", window="daily", key="all")] == 5
    assert found[key("orproxy_budget_downgrade_step")] == -1
    day_end = found[key("orproxy_budget_window_end_timestamp_seconds", window="daily")]
    assert 0 < day_end - clock() <= 25 * 3600  # the budget's midnight (a DST day has 25 hours)
    assert found[key("orproxy_budget_window_end_timestamp_seconds", window="monthly")] >= day_end
    assert found[key("orproxy_upstream_credits_remaining_usd", upstream="openrouter")] == pytest.approx(
        100.0 - emulator.state.key_usage, rel=1e-9
    )
    assert found[key("orproxy_upstream_usage_daily_usd", upstream="openrouter")] == pytest.approx(
        emulator.state.key_usage, rel=1e-9
    )
    assert found[key("orproxy_in_flight_requests")] == 0


@pytest.mark.realtime  # the request is held in flight by the emulator's real latency
async def test_in_flight_counts_a_slow_request_while_it_runs(proxy, emulator):
    emulator.state.faults.set(MISTRAL, Fault(latency_s=0.6, times=1))
    request = asyncio.create_task(proxy.client().chat.completions.create(model="cheap", messages=HELLO))
    in_flight = []
    try:
        for _ in range(50):
            in_flight.append(samples(await scrape(proxy.url))[key("orproxy_in_flight_requests")])
            if in_flight[-1] == 1:
                break
            await asyncio.sleep(0.02)
        assert in_flight[-1] == 1, f"in-flight never reached 1 during a 0.6 s request: {in_flight}"
    finally:
        await asyncio.wait_for(request, 5)
    assert samples(await scrape(proxy.url))[key("orproxy_in_flight_requests")] == 0


# ------------------------------------------------------------------ cardinality

CARDINALITY_KEYS = """
keys:
  - {name: app, key_env: APP_KEY}
metrics: {key_env: SCRAPER_KEY}
"""
SCRAPER = "scraper-secret"
KEYED_ENV = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "APP_KEY": "app-secret"}
KEYED_ENV["SCRAPER_KEY"] = SCRAPER
DIRECT_SLUGS = (
    "meta-llama/llama-3.3-70b-instruct",
    "qwen/qwen-2.5-coder-32b-instruct",
    "google/gemini-2.5-pro",
    "anthropic/claude-3.5-haiku",
    "openai/gpt-4o",
)


@pytest.mark.slow  # 1,000 requests, 64 at a time
async def test_bogus_models_and_unknown_keys_add_no_series(make_proxy, emulator):
    env = {
        "TEST_OPENROUTER_KEY": UPSTREAM_KEY,
        "TEST_OPENAI_KEY": UPSTREAM_KEY,
        "APP_KEY": "app-secret",
        "SCRAPER_KEY": SCRAPER,
    }
    proxy = await make_proxy(env=env, config_text=proxy_config_text(emulator.url) + CARDINALITY_KEYS)
    url = f"{proxy.url}/v1/chat/completions"
    # Real slugs outside every chain, each saying its rate limit: they all share the model label `other`.
    for number, slug in enumerate(DIRECT_SLUGS):
        emulator.state.faults.set(slug, Fault(rate_limit=(100, 50 + number, 4_000_000_000_000)))

    async with aiohttp.ClientSession() as session:
        semaphore = asyncio.Semaphore(64)

        async def ask(model: str, token: str = "app-secret") -> int:
            async with (
                semaphore,
                session.post(
                    url, json={"model": model, "messages": HELLO}, headers={"Authorization": f"Bearer {token}"}
                ) as response,
            ):
                await response.read()
                return response.status

        async def ask_all(requests: Iterable[tuple[str, str]]) -> Counter[int]:
            return Counter(await asyncio.gather(*(ask(model, token) for model, token in requests)))

        # Warm-up: one of each kind creates the bounded series they map to.
        warm = await ask_all(
            [
                ("cheap", "app-secret"),
                ("no-such-model", "app-secret"),
                ("vendor/no-such-model", "app-secret"),
                (DIRECT_SLUGS[0], "app-secret"),
                ("cheap", "wrong-key"),
            ]
        )
        assert warm == Counter({200: 2, 404: 1, 400: 1, 401: 1})
        before = await scrape(proxy.url, SCRAPER)

        bogus = [(f"made-up-model-{n}", "app-secret") for n in range(400)]
        bogus += [(f"vendor{n}/made-up-{n}", "app-secret") for n in range(400)]  # passed upstream, refused
        bogus += [(f"cheap-{n}", f"sk-unknown-{n}") for n in range(100)]  # unknown keys
        bogus += [(DIRECT_SLUGS[n % len(DIRECT_SLUGS)], "app-secret") for n in range(100)]
        outcomes = await ask_all(bogus)
        assert outcomes == Counter({404: 400, 400: 400, 401: 100, 200: 100})
        after = await scrape(proxy.url, SCRAPER)

    assert series_count(after) == series_count(before), "bogus models or unknown keys created series"
    assert duplicates(after) == []
    found = samples(after)
    assert found[key("orproxy_requests_total", virtual_model="unknown", model="none", status="404", api="chat")] == 401
    assert found[key("orproxy_requests_total", virtual_model="direct", model="other", status="200", api="chat")] == 101
    assert {dict(labels)["model"] for name, labels in found if name == "orproxy_ratelimit_remaining"} == {"other"}
    assert found[key("orproxy_ratelimit_remaining", upstream="openrouter", scope="requests", model="other")] == 50
    for name, labels in found:
        assert all(len(value) < 100 for _, value in labels), f"a raw request value leaked into {name}{labels}"


async def test_refused_requests_are_counted_too(make_proxy, emulator):
    env = {
        "TEST_OPENROUTER_KEY": UPSTREAM_KEY,
        "TEST_OPENAI_KEY": UPSTREAM_KEY,
        "APP_KEY": "app-secret",
        "SCRAPER_KEY": SCRAPER,
    }
    proxy = await make_proxy(env=env, config_text=proxy_config_text(emulator.url) + CARDINALITY_KEYS)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "cheap", "messages": HELLO},
            headers={"Authorization": "Bearer wrong-key"},
        ) as response:
            assert response.status == 401
        async with session.post(
            f"{proxy.url}/v1/chat/completions", data=b"{not json", headers={"Authorization": "Bearer app-secret"}
        ) as response:
            assert response.status == 400
    found = samples(await scrape(proxy.url, SCRAPER))
    # A flood of bad keys or broken clients must show on "Requests by status".
    assert total(found, "orproxy_requests_total", status="401") == 1
    assert total(found, "orproxy_requests_total", status="400") == 1


@pytest.mark.realtime  # the credit poller sleeps on the real clock between polls
async def test_credits_keep_updating_after_a_reload_replaces_the_upstream_client(make_proxy, emulator, tmp_path):
    from proxy.http.appkeys import RELOADER

    path = tmp_path / "config.yaml"
    proxy = await make_proxy(config_text=with_credit_polling(emulator.url, 0.05), config_path=path)
    client = proxy.client()
    await client.chat.completions.create(model="cheap", messages=HELLO)
    path.write_text(path.read_text().replace("    timeout_s: 2\n", "    timeout_s: 3\n", 1))  # a new client
    status = await proxy.app[RELOADER].reload("test")
    assert status.last_result == "success"
    await client.chat.completions.create(model="cheap", messages=HELLO)
    found = await credits_caught_up(proxy.url, emulator)
    assert found[key("orproxy_upstream_credits_remaining_usd", upstream="openrouter")] == pytest.approx(
        100.0 - emulator.state.key_usage, rel=1e-9
    )
