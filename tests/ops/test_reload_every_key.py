"""Every config key, changed by a reload, either takes effect at once or is reported as needing a
restart: nothing is silently ignored.

The table below names every leaf key of the config schema (a completeness test fails when a key is
added without a row). A row either says RESTART, or gives the new value and a probe that shows the
new behaviour through the running proxy: requests, the emulator's record of what it received, the
ledger, logs or metrics. The base config is chosen so that no probe would pass before the reload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp.test_utils import TestClient
from pydantic import BaseModel

from proxy.config import Config, Upstream, VirtualModel
from proxy.emulator import Fault
from proxy.http.app import prune_ledger
from proxy.http.appkeys import RELOADER, RUNTIME, STATE
from proxy.money.ledger import LedgerRow
from tests.support import batch_probes as batch
from tests.support.gateway import UPSTREAM_KEY, Emulator, Proxy
from tests.support.timing import Clock, cache_writes_settled, wait_for

ENV = {
    "TEST_OPENROUTER_KEY": UPSTREAM_KEY,
    "TEST_OPENAI_KEY": UPSTREAM_KEY,
    "TEST_ADMIN_KEY": "admin-one",
    "OTHER_ADMIN_KEY": "admin-two",
    "BOT_PROXY_KEY": "client-secret",
    "SCRAPE_KEY": "scraper-secret",
}
MISTRAL = "mistralai/mistral-7b-instruct"
EMBEDDER, HAIKU = "openai/text-embedding-3-small", "anthropic/claude-3-haiku"
HELLO = [{"role": "user", "content": "hello there"}]
RESTART = "restart"


def base_config(emulator_url: str, tmp: Path) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "upstreams": {
            "openrouter": {
                "base_url": f"{emulator_url}/api/v1",
                "kind": "openrouter",
                "api_key_env": "TEST_OPENROUTER_KEY",
                "timeout_s": 2,
                "connect_timeout_s": 5,
                "headers": {"X-Title": "Base"},
                "credits_poll_s": 0,
            },
            "openai": {"base_url": f"{emulator_url}/v1", "kind": "openai", "api_key_env": "TEST_OPENAI_KEY"},
        },
        "models": {
            "cheap": {"chain": [MISTRAL, {"model": "gpt-4o-mini", "upstream": "openai"}]},
            "quality": {"chain": ["anthropic/claude-sonnet-4.5"]},
        },
        "retry": {
            "attempts_per_model": 2,
            "backoff_s": 0.01,
            "backoff_max_s": 5,
            "max_retry_after_s": 2,
            "cooldown": {"failures": 5, "window_s": 60, "cooldown_s": 30},
        },
        "allow_direct_models": True,
        "direct_upstream": "openrouter",
        "max_body_bytes": 1_048_576,
        "watch_config": False,
        "shutdown_timeout_s": 5,
        "logging": {"level": "INFO", "access_log": True},
        "budget": {"timezone": "UTC", "on_exhausted": "reject"},
        "pricing": {"savings_baseline": "openai/gpt-4o-mini"},
        "ledger": {"path": str(tmp / "ledger.sqlite3"), "retention_days": 400, "synchronous": "NORMAL"},
        "cache": {
            "enabled": False,
            "ttl_s": 3600,
            "max_entries": 100,
            "max_entry_bytes": 1_048_576,
            "path": str(tmp / "cache.sqlite3"),
        },
        "rate_limits": {"warn_below": 0.1},
        "admin": {"key_env": "TEST_ADMIN_KEY"},
    }


@dataclass
class Live:
    """What a probe works with: the running proxy, its emulator, an HTTP client, a settable clock."""

    proxy: Proxy
    emulator: Emulator
    http: TestClient
    tmp: Path
    clock: Clock
    caplog: pytest.LogCaptureFixture

    async def chat(
        self, model: str = "cheap", headers: dict[str, str] | None = None, **extra: Any
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        body = {"model": model, "messages": HELLO, **extra}
        response = await self.http.post("/v1/chat/completions", json=body, headers=headers or {})
        return response.status, dict(response.headers), await response.json()

    def recorded(self) -> list[Any]:
        return list(self.emulator.state.requests)

    async def metrics(self) -> str:
        return await (await self.http.get("/metrics")).text()


Probe = Callable[[Live], Awaitable[None]]


@dataclass
class Case:
    key: str  # dotted path; `upstreams.openrouter.X` stands for `upstreams.*.X`
    value: Any
    probe: Probe | str  # RESTART, or a check of the new behaviour
    start: dict[str, Any] = field(default_factory=dict)  # changes to the base config before start-up
    before: Probe | None = None  # traffic before the reload that the probe builds on
    realtime: str = ""  # why the probe needs the real clock (the case is then marked `realtime`)
    also: dict[str, Any] = field(default_factory=dict)  # other keys the same edit changes (a valid config needs them)
    remove: tuple[str, ...] = ()  # keys the same edit removes


def route(headers: dict[str, str]) -> str:
    return headers.get("x-proxy-route", "")


async def ok(live: Live, model: str = "cheap", **extra: Any) -> dict[str, str]:
    status, headers, body = await live.chat(model, **extra)
    assert status == 200, body
    return headers


# --- probes -----------------------------------------------------------------------------


async def served_on_openai_paths(live: Live) -> None:
    live.emulator.state.requests.clear()
    await ok(live)
    assert [r.path for r in live.recorded()] == ["/v1/chat/completions"]


async def provider_field_dropped(live: Live) -> None:
    live.emulator.state.requests.clear()
    await ok(live, provider={"order": ["DeepInfra"]})
    assert "provider" not in live.recorded()[0].body


async def upstream_key_missing(live: Live) -> None:
    headers = await ok(live)
    assert f"{MISTRAL}=skipped:no_api_key" in route(headers)


async def short_timeout(live: Live) -> None:
    live.emulator.state.faults.set(MISTRAL, Fault(latency_s=0.5, times=2))
    headers = await ok(live)
    assert f"{MISTRAL}=timeout" in route(headers)


async def new_connect_timeout(live: Live) -> None:
    client = live.proxy.app[RUNTIME].current.clients["openrouter"]
    # The client is rebuilt with the new timeouts (aiohttp keeps them on the session).
    assert client._session.timeout.sock_connect == 0.5


async def extra_header_sent(live: Live) -> None:
    live.emulator.state.requests.clear()
    await ok(live)
    assert live.recorded()[0].headers.get("X-Extra") == "yes"


async def credits_polled(live: Live) -> None:
    async def polled() -> bool:
        return 'orproxy_upstream_credits_remaining_usd{upstream="openrouter"}' in await live.metrics()

    await wait_for(polled, message="the credit balance was never polled")


async def new_virtual_model(live: Live) -> None:
    headers = await ok(live, "extra")
    assert headers["x-proxy-model"] == "google/gemini-2.5-flash"


async def described(live: Live) -> None:
    listed = await (await live.http.get("/v1/models")).json()
    assert next(m for m in listed["data"] if m["id"] == "cheap")["description"] == "reloaded"


async def new_chain(live: Live) -> None:
    assert (await ok(live))["x-proxy-model"] == "google/gemini-2.5-flash"


async def routed_to_quality(live: Live) -> None:
    headers = await ok(live)
    assert headers["x-proxy-model"] == "anthropic/claude-sonnet-4.5" and route(headers).startswith("cheap>quality:")


async def serves_embeddings_only(live: Live) -> None:
    response = await live.http.post("/v1/embeddings", json={"model": "cheap", "input": "lamp"})
    assert response.status == 200 and response.headers["x-proxy-model"] == "openai/text-embedding-3-small"
    status, _, body = await live.chat()
    assert status == 400 and body["error"]["code"] == "model_kind_mismatch"


async def cache_control_added(live: Live) -> None:
    live.emulator.state.requests.clear()
    await ok(live)
    assert live.recorded()[0].body["cache_control"] == {"type": "ephemeral"}


async def three_attempts(live: Live) -> None:
    live.emulator.state.faults.set(MISTRAL, Fault(status=503, times=2))
    headers = await ok(live)
    assert f"{MISTRAL}=http_503,http_503,ok" in route(headers)


async def slow_backoff(live: Live) -> None:
    live.emulator.state.faults.set(MISTRAL, Fault(status=503, times=1))
    started = time.monotonic()
    headers = await ok(live)
    assert f"{MISTRAL}=http_503,ok" in route(headers)
    assert time.monotonic() - started >= 0.4  # equal jitter: never less than half of backoff_s


async def capped_backoff(live: Live) -> None:
    live.emulator.state.faults.set(MISTRAL, Fault(status=503, times=1))
    started = time.monotonic()
    headers = await ok(live)
    assert f"{MISTRAL}=http_503,ok" in route(headers)
    assert time.monotonic() - started < 0.5  # backoff_s is 2, capped at 0.02


async def no_waiting_on_retry_after(live: Live) -> None:
    live.emulator.state.faults.set(MISTRAL, Fault(status=429, retry_after=1, times=1))
    headers = await ok(live)
    assert f"{MISTRAL}=http_429 gpt-4o-mini@openai=ok" in route(headers)


async def opens_after_one_failure(live: Live) -> None:
    live.emulator.state.faults.set(MISTRAL, Fault(status=503, times=1))
    await ok(live)
    assert f"{MISTRAL}=skipped:cooldown" in route(await ok(live))


async def one_failure_each(live: Live) -> None:
    live.emulator.state.faults.set(MISTRAL, Fault(status=503, times=1))
    assert f"{MISTRAL}=http_503,ok" in route(await ok(live))


async def failures_fall_out_of_a_short_window(live: Live) -> None:
    await asyncio.sleep(0.1)  # past the 0.05 s window on the executor's clock (the real one)
    await one_failure_each(live)  # the second failure, but the first has left the 0.05 s window
    assert "skipped" not in route(await ok(live))


async def never_cools_down(live: Live) -> None:
    live.emulator.state.faults.set(MISTRAL, Fault(status=503, times=1))
    await ok(live)
    assert "skipped" not in route(await ok(live))


async def direct_slugs_refused(live: Live) -> None:
    status, _, body = await live.chat("meta-llama/llama-3.1-8b-instruct")
    assert status == 404 and body["error"]["code"] == "model_not_found"


async def direct_slugs_to_openai(live: Live) -> None:
    live.emulator.state.requests.clear()
    await ok(live, "openai/gpt-4o-mini")
    assert [r.path for r in live.recorded()] == ["/v1/chat/completions"]


async def small_bodies_only(live: Live) -> None:
    status, _, body = await live.chat(messages=[{"role": "user", "content": "x" * 5000}])
    assert status == 413 and body["error"]["code"] == "request_too_large"


async def debug_logging(live: Live) -> None:
    assert logging.getLogger("orproxy").level == logging.DEBUG


async def no_access_log(live: Live) -> None:
    live.caplog.clear()
    with live.caplog.at_level(logging.INFO, logger="orproxy.access"):
        await ok(live)
    assert [r for r in live.caplog.records if r.name == "orproxy.access"] == []


def budget_refusal(window: str) -> Probe:
    async def probe(live: Live) -> None:
        status, _, body = await live.chat()
        assert status == 429 and body["error"]["code"] == "budget_exceeded"
        assert f"the {window} budget" in body["error"]["message"]

    return probe


async def spend_a_little(live: Live) -> None:
    await ok(live, "quality")


async def stepped_down(live: Live) -> None:
    headers = await ok(live, "quality")
    assert headers["x-proxy-model"] == MISTRAL and "quality->cheap" in headers["x-proxy-downgrade"]


async def cheapest_instead_of_refusal(live: Live) -> None:
    headers = await ok(live, "quality", max_tokens=2000)
    assert "budget exhausted: cheapest" in headers["x-proxy-downgrade"]


async def tokyo_days(live: Live) -> None:
    counters = live.proxy.app[STATE].counters
    assert counters.calendar.tz.key == "Asia/Tokyo"
    spent = await live.proxy.ledger.spend_between(counters.calendar.day_start)
    assert counters.scope("").day == pytest.approx(spent) and spent > 0


async def keys_required(live: Live) -> None:
    status, _, body = await live.chat()
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    status, _, _ = await live.chat(headers={"Authorization": "Bearer client-secret"})
    assert status == 200


async def sonnet_baseline(live: Live) -> None:
    await ok(live)
    await live.proxy.ledger.flush()
    row = (await live.proxy.ledger.rows())[-1]
    expected = row.prompt_tokens * 3e-6 + row.completion_tokens * 15e-6  # claude-sonnet-4.5's catalogue price
    assert row.baseline_cost_usd == pytest.approx(expected, rel=1e-9)


async def explain_cheap(live: Live) -> dict[str, Any]:
    response = await live.http.post("/v1/route/explain", json={"model": "cheap", "messages": HELLO})
    assert response.status == 200
    return await response.json()


async def overridden_price(live: Live) -> None:
    worst = (await explain_cheap(live))["chain"][0]["worst_case_usd"]
    assert worst > 1.0  # $1,000 per million tokens on a 4,096-token completion cap


async def pinned_catalogue(live: Live) -> None:
    decision = await explain_cheap(live)
    prompt = decision["features"]["prompt_tokens_estimate"]
    # The pinned file: $0.5 a token either way, and a 32-token completion cap.
    assert decision["chain"][0]["worst_case_usd"] == pytest.approx(0.5 * prompt + 0.5 * 32)
    assert "pinned" in live.proxy.app[RELOADER].status.catalogue


async def shorter_retention(live: Live) -> None:
    assert await prune_ledger(live.proxy.ledger, live.proxy.app[RUNTIME]) == 1


async def seed_old_row(live: Live) -> None:
    old = LedgerRow(
        ts=live.clock() - 5 * 86_400, request_id="old", key_name=None, requested_model="cheap", virtual_model="cheap",
        model=MISTRAL, upstream="openrouter", provider=None, prompt_tokens=1, completion_tokens=1, cost_usd=0.0,
        cost_source="upstream", baseline_cost_usd=0.0, latency_s=0.1, ttft_s=None, status=200, attempts=1,
        streamed=False,
    )  # fmt: skip
    await live.proxy.ledger.record(old)


async def cached_twice(live: Live) -> dict[str, str]:
    await ok(live, temperature=0)
    await wait_for_entries(live, 1)
    return await ok(live, temperature=0)


async def wait_for_entries(live: Live, count: int) -> None:
    slot = live.proxy.app[RUNTIME].current.cache
    assert slot is not None
    await wait_for(
        lambda: slot.entries >= count, message=lambda: f"the cache holds {slot.entries} entries, not {count}"
    )


async def cache_on(live: Live) -> None:
    assert (await cached_twice(live))["x-proxy-cache"] == "hit"


async def short_ttl(live: Live) -> None:
    await ok(live, temperature=0)
    await wait_for_entries(live, 1)
    live.clock.advance(2)
    assert (await ok(live, temperature=0))["x-proxy-cache"] == "miss"


async def one_entry(live: Live) -> None:
    await ok(live, temperature=0)
    await wait_for_entries(live, 1)
    await ok(live, temperature=0, messages=[{"role": "user", "content": "another question"}])
    await cache_writes_settled()
    assert live.proxy.app[RUNTIME].current.cache.entries == 1  # type: ignore[union-attr]
    assert (await ok(live, temperature=0))["x-proxy-cache"] == "miss"  # the first was evicted


async def small_entries_only(live: Live) -> None:
    long = " ".join(["supercalifragilisticexpialidocious" * 3] * 16)  # the emulator echoes 16 words
    await ok(live, temperature=0, messages=[{"role": "user", "content": long}])
    await cache_writes_settled()
    headers = await ok(live, temperature=0, messages=[{"role": "user", "content": long}])
    assert headers["x-proxy-cache"] == "miss"


async def early_warning(live: Live) -> None:
    reset_ms = int((live.clock() + 60) * 1000)
    live.emulator.state.faults.set(MISTRAL, Fault(rate_limit=(100, 50, reset_ms), times=1))
    with live.caplog.at_level(logging.WARNING, logger="orproxy"):
        await ok(live)
    assert any("running low" in r.getMessage() for r in live.caplog.records)


async def other_admin_key(live: Live) -> None:
    old = await live.http.get("/admin/status", headers={"Authorization": "Bearer admin-one"})
    new = await live.http.get("/admin/status", headers={"Authorization": "Bearer admin-two"})
    assert (old.status, new.status) == (401, 200)


async def blocks_capped_at_a_minute(live: Live) -> None:
    live.emulator.state.faults.set(MISTRAL, Fault(status=429, retry_after=1e9, times=1))
    await ok(live)
    response = await live.http.get("/admin/status", headers={"Authorization": "Bearer admin-one"})
    [block] = (await response.json())["blocks"]
    assert block["model"] == MISTRAL and 0 < block["seconds_left"] <= 60


async def raw_connection(live: Live) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = live.proxy.server
    return await asyncio.open_connection(server.host, server.port)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing the connection, which it must do within `seconds`."""
    return await asyncio.wait_for(reader.read(), seconds)


async def slow_headers_cut_off(live: Live) -> None:
    reader, writer = await raw_connection(live)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    assert await closed_within(reader, 2) == b""  # the base config would wait 10 s
    writer.close()


async def slow_body_is_408(live: Live) -> None:
    reader, writer = await raw_connection(live)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    answer = await closed_within(reader, 2)
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer
    writer.close()


async def idle_connection_closed(live: Live) -> None:
    reader, writer = await raw_connection(live)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await closed_within(reader, 2)).startswith(b"HTTP/1.1 200")  # then closed when idle
    writer.close()


async def idle_connection_evicted(live: Live) -> None:
    idle_reader, idle_writer = await raw_connection(live)
    await asyncio.sleep(0.05)  # accepted
    await ok(live)  # a new connection: the idle one makes room
    assert await closed_within(idle_reader, 2) == b""
    idle_writer.close()


async def second_connection_refused(live: Live) -> None:
    _, first_writer = await raw_connection(live)
    await asyncio.sleep(0.05)
    reader, writer = await raw_connection(live)
    answer = await closed_within(reader, 2)
    assert answer.startswith(b"HTTP/1.1 429") and b'"code":"too_many_connections"' in answer
    first_writer.close()
    writer.close()


async def scraped_with_its_own_key(live: Live) -> None:
    response = await live.http.get("/metrics", headers={"Authorization": "Bearer scraper-secret"})
    assert response.status == 200
    response = await live.http.get("/metrics")
    assert response.status == 401


def _catalogue_file(tmp: Path) -> str:
    path = tmp / "pinned-models.json"
    entry = {
        "id": MISTRAL,
        "pricing": {"prompt": "0.5", "completion": "0.5"},
        "top_provider": {"max_completion_tokens": 32},
    }
    baseline = {"id": "openai/gpt-4o-mini", "pricing": {"prompt": "0.00000015", "completion": "0.0000006"}}
    path.write_bytes(orjson.dumps({"data": [entry, baseline]}))  # the savings baseline must be priced
    return str(path)


CASES = [
    Case("listen.host", "0.0.0.0", RESTART),
    Case("listen.port", 9999, RESTART),
    Case("upstreams.openrouter.base_url", "{emulator}/v1", served_on_openai_paths),
    Case("upstreams.openrouter.kind", "openai", provider_field_dropped),
    Case("upstreams.openrouter.api_key_env", "NOT_SET_ANYWHERE", upstream_key_missing),
    Case("upstreams.openrouter.timeout_s", 0.2, short_timeout, realtime="a timeout on the emulator's real latency"),
    Case("upstreams.openrouter.connect_timeout_s", 0.5, new_connect_timeout),
    Case("upstreams.openrouter.headers", {"X-Title": "Base", "X-Extra": "yes"}, extra_header_sent),
    Case(
        "upstreams.openrouter.credits_poll_s",
        0.05,
        credits_polled,
        realtime="the credit poller sleeps on the real clock (up to 1 s before it sees the new interval)",
    ),
    Case(
        "models",
        {
            "cheap": {"chain": [MISTRAL]},
            "quality": {"chain": [MISTRAL]},
            "extra": {"chain": ["google/gemini-2.5-flash"]},
        },
        new_virtual_model,
    ),
    Case("models.cheap.description", "reloaded", described),
    Case("models.cheap.chain", ["google/gemini-2.5-flash"], new_chain),
    Case("models.cheap.route", [{"to": "quality"}], routed_to_quality, remove=("models.cheap.chain",)),
    Case("models.cheap.kind", "embeddings", serves_embeddings_only, also={"models.cheap.chain": [EMBEDDER]}),
    Case("models.cheap.prompt_cache", "auto", cache_control_added, also={"models.cheap.chain": [HAIKU]}),
    Case("retry.attempts_per_model", 3, three_attempts),
    Case("retry.backoff_s", 0.8, slow_backoff, realtime="the executor's backoff sleep is real and timed"),
    Case(
        "retry.backoff_max_s",
        0.02,
        capped_backoff,
        start={"retry.backoff_s": 2},
        realtime="the executor's backoff sleep is real and timed",
    ),
    Case("retry.max_retry_after_s", 0, no_waiting_on_retry_after),
    Case("retry.max_block_s", 60, blocks_capped_at_a_minute),
    Case("retry.cooldown.failures", 1, opens_after_one_failure),
    Case(
        "retry.cooldown.window_s",
        0.05,
        failures_fall_out_of_a_short_window,
        start={"retry.cooldown.failures": 2},
        before=one_failure_each,
        realtime="the executor stamps failures with the real clock, not the injected one",
    ),
    Case("retry.cooldown.cooldown_s", 0, never_cools_down, start={"retry.cooldown.failures": 1}),
    Case("allow_direct_models", False, direct_slugs_refused),
    Case("direct_upstream", "openai", direct_slugs_to_openai),
    Case("max_body_bytes", 2048, small_bodies_only),
    Case("watch_config", True, RESTART),
    Case("shutdown_timeout_s", 1, RESTART),
    Case("logging.level", "DEBUG", debug_logging),
    Case("logging.access_log", False, no_access_log),
    Case("budget.daily_usd", 1e-9, budget_refusal("daily")),
    Case("budget.monthly_usd", 1e-9, budget_refusal("monthly")),
    Case(
        "budget.downgrade",
        [{"at": 1e-9, "map": {"quality": "cheap"}}],
        stepped_down,
        start={"budget.daily_usd": 10},
        before=spend_a_little,
    ),
    Case("budget.on_exhausted", "cheapest", cheapest_instead_of_refusal, start={"budget.daily_usd": 0.005}),
    Case("budget.timezone", "Asia/Tokyo", tokyo_days, before=spend_a_little),
    Case("keys", [{"name": "bot", "key_env": "BOT_PROXY_KEY"}], keys_required),
    Case("pricing.savings_baseline", "anthropic/claude-sonnet-4.5", sonnet_baseline),
    Case(
        "pricing.overrides", {MISTRAL: {"prompt_usd_per_mtok": 1000, "completion_usd_per_mtok": 1000}}, overridden_price
    ),
    Case("pricing.catalogue", "{catalogue}", pinned_catalogue),
    Case("ledger.path", "{tmp}/other-ledger.sqlite3", RESTART),
    Case("ledger.retention_days", 1, shorter_retention, before=seed_old_row),
    Case("ledger.synchronous", "FULL", RESTART),
    Case("ledger.commit_delay_ms", 5, RESTART),
    # Changing the ledger's engine or database needs a restart; the reload does not connect to it.
    Case("ledger.backend", "postgres", RESTART, also={"ledger.dsn": "postgresql://postgres@127.0.0.1:5432/test"}),
    Case("ledger.dsn", "postgresql://postgres@127.0.0.1:5432/test", RESTART, also={"ledger.backend": "postgres"}),
    Case("ledger.dsn_env", "ORPROXY_LEDGER_DSN", RESTART, also={"ledger.backend": "postgres"}),
    Case("cache.enabled", True, cache_on),
    Case("cache.ttl_s", 1, short_ttl, start={"cache.enabled": True}),
    Case("cache.max_entries", 1, one_entry, start={"cache.enabled": True}),
    Case("cache.max_entry_bytes", 1024, small_entries_only, start={"cache.enabled": True}),
    Case("cache.path", "{tmp}/other-cache.sqlite3", RESTART, start={"cache.enabled": True}),
    Case("state.backend", "redis", RESTART, also={"state.url": "redis://127.0.0.1:6379/0"}),
    Case("state.url", "redis://127.0.0.1:6379/1", RESTART),
    Case("state.url_env", "REDIS_URL", RESTART),
    Case("state.prefix", "other:", RESTART),
    Case("state.on_state_error", "local", RESTART),
    Case("state.timeout_ms", 1000, RESTART),
    Case("rate_limits.warn_below", 0.9, early_warning),
    Case("admin.key_env", "OTHER_ADMIN_KEY", other_admin_key),
    Case("server.header_timeout_s", 0.2, slow_headers_cut_off, realtime="a deadline on a real socket"),
    Case("server.body_timeout_s", 0.2, slow_body_is_408, realtime="a deadline on a real socket"),
    Case("server.keepalive_timeout_s", 0.2, idle_connection_closed, realtime="a deadline on a real socket"),
    Case("server.max_connections", 1, idle_connection_evicted),
    Case("server.max_connections_per_client", 1, second_connection_refused),
    Case(
        "metrics.key_env",
        "SCRAPE_KEY",
        scraped_with_its_own_key,
        start={"keys": [{"name": "bot", "key_env": "BOT_PROXY_KEY"}]},
    ),
    Case("batches.concurrency", 1, batch.one_line_at_a_time, realtime="batch lines held 0.1 s at the emulator"),
    Case(
        "batches.budget_share",
        1e-9,
        batch.paused_by_the_share,
        start={"budget.daily_usd": 10},
        before=batch.spend_a_batch,
    ),
    Case(
        "batches.prefer",
        "cheapest",
        batch.cheapest_member_first,
        start={"models.cheap": {"chain": [{"model": "gpt-4o-mini", "upstream": "openai"}, MISTRAL]}},
    ),
    Case("batches.upstream", "openrouter", batch.sent_to_openrouter_batches),
    Case("batches.busy_in_flight", 1, batch.waits_for_live_traffic, realtime="an interactive request held 0.4 s"),
    Case(
        "batches.poll_s",
        0.05,
        batch.slow_openrouter_batch,
        start={"batches.upstream": "openrouter"},
        realtime="an OpenRouter batch that takes 0.3 s",
    ),
    Case("batches.max_lines", 2, batch.two_lines_at_most),
    Case("batches.max_file_bytes", 2048, batch.small_files_only),
]


def leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf key of the schema; a mapping of sub-models (upstreams) is walked through one entry."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= leaf_keys(annotation, path + ".")
        elif name == "upstreams":
            keys |= leaf_keys(Upstream, path + ".openrouter.")
        elif name == "models":  # the mapping as a whole (a model added), and each key of one model
            keys |= {path} | leaf_keys(VirtualModel, path + ".cheap.")
        else:
            keys.add(path)
    return keys


def test_the_table_covers_every_key_of_the_schema() -> None:
    assert {case.key for case in CASES} == leaf_keys(Config)


def set_key(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def fill(value: Any, emulator: Emulator, tmp: Path) -> Any:
    if isinstance(value, str) and "{" in value:
        return value.format(emulator=emulator.url, tmp=tmp, catalogue=_catalogue_file(tmp))
    return value


def params(cases: list[Case]) -> list[Any]:
    return [pytest.param(case, id=case.key, marks=[pytest.mark.realtime] if case.realtime else []) for case in cases]


@pytest.mark.parametrize("case", params(CASES))
async def test_a_reloaded_key_applies_or_asks_for_a_restart(
    case: Case, make_proxy, emulator, tmp_path, aiohttp_client, caplog
) -> None:
    config = base_config(emulator.url, tmp_path)
    for key, value in case.start.items():
        set_key(config, key, value)
    path = tmp_path / "config.yaml"
    clock = Clock()
    proxy = await make_proxy(config_text=yaml.safe_dump(config), env=ENV, config_path=path, clock=clock)
    live = Live(proxy, emulator, await aiohttp_client(proxy.server), tmp_path, clock, caplog)
    if case.before is not None:
        await case.before(live)

    set_key(config, case.key, fill(case.value, emulator, tmp_path))
    for key, value in case.also.items():
        set_key(config, key, value)
    for key in case.remove:
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        del node[last]
    path.write_text(yaml.safe_dump(config))
    status = await proxy.app[RELOADER].reload("test")
    assert status.last_errors == []

    def named(keys: list[str]) -> bool:
        return any(k == case.key or k.startswith(case.key + ".") for k in keys)

    if case.probe == RESTART:
        assert status.last_result == "restart_required"
        assert named(status.restart_required), status.restart_required
        assert not named(status.last_applied)
        return
    assert status.last_result == "success", status.restart_required
    assert named(status.last_applied), status.last_applied
    assert not isinstance(case.probe, str)
    try:
        await case.probe(live)
    finally:
        logging.getLogger("orproxy").setLevel(logging.NOTSET)
