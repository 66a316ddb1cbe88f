"""retry.max_block_s caps what an upstream may impose (Retry-After, rate-limit resets); the blocks show
in GET /admin/status and are lifted by a reload or POST /admin/unblock."""

from __future__ import annotations

import pytest

from proxy.emulator import Fault
from proxy.http.appkeys import RELOADER
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text
from tests.support.timing import Clock

MISTRAL, LLAMA = "mistralai/mistral-7b-instruct", "meta-llama/llama-3.1-8b-instruct"
MODELS = f"models:\n  cheap: {{chain: [{MISTRAL}, {LLAMA}]}}\n  solo: {{chain: [{MISTRAL}]}}\n"
RETRY = "retry: {attempts_per_model: 2, backoff_s: 0.01, max_retry_after_s: 2, max_block_s: 60}"
EXTRA = "admin: {key_env: ADMIN_KEY}\nwatch_config: false\n"
ENV = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "ADMIN_KEY": "admin"}
ADMIN = {"Authorization": "Bearer admin"}
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def live(make_proxy, emulator, aiohttp_client, tmp_path):
    clock = Clock()
    text = proxy_config_text(emulator.url, MODELS, RETRY) + EXTRA
    proxy = await make_proxy(config_text=text, env=ENV, clock=clock, config_path=tmp_path / "config.yaml")
    return proxy, await aiohttp_client(proxy.server), clock


async def chat(http, model: str = "cheap"):
    response = await http.post("/v1/chat/completions", json={"model": model, "messages": HELLO})
    return response.status, response.headers, await response.json()


async def blocks(http) -> list[dict]:
    response = await http.get("/admin/status", headers=ADMIN)
    assert response.status == 200
    return (await response.json())["blocks"]


async def test_a_retry_after_of_1e9_blocks_for_max_block_s_at_most(live, emulator):
    _, http, clock = live
    emulator.state.faults.set(MISTRAL, Fault(status=429, retry_after=1e9, times=1))
    status, headers, _ = await chat(http)
    assert status == 200 and f"{MISTRAL}=http_429 {LLAMA}=ok" in headers["x-proxy-route"]
    [block] = await blocks(http)
    assert (block["model"], block["source"], block["reason"]) == (MISTRAL, "rate_limit", "rate_limited")
    assert 0 < block["seconds_left"] <= 60 and "retry.max_block_s" in block["detail"]
    status, headers, _ = await chat(http)
    assert f"{MISTRAL}=skipped:rate_limited" in headers["x-proxy-route"]
    clock.advance(61)
    assert await blocks(http) == []
    status, headers, _ = await chat(http)
    assert headers["x-proxy-route"] == f"cheap: {MISTRAL}=ok"


async def test_the_client_is_told_to_come_back_within_max_block_s(live, emulator):
    _, http, _ = live
    emulator.state.faults.set(MISTRAL, Fault(status=429, retry_after=1e9))
    status, headers, body = await chat(http, "solo")
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert int(headers["Retry-After"]) <= 60
    for name in ("x-request-id", "x-proxy-attempts", "x-proxy-route"):
        assert headers[name]
    assert headers["x-proxy-attempts"] == "1" and f"{MISTRAL}=http_429" in headers["x-proxy-route"]


async def test_a_reload_lifts_the_blocks(live, emulator):
    proxy, http, _ = live
    emulator.state.faults.set(MISTRAL, Fault(status=429, retry_after=30, times=1))
    await chat(http)
    assert [b["model"] for b in await blocks(http)] == [MISTRAL]
    status = await proxy.app[RELOADER].reload("test")
    assert status.last_result == "success"
    assert await blocks(http) == []
    _, headers, _ = await chat(http)
    assert headers["x-proxy-route"] == f"cheap: {MISTRAL}=ok"


async def test_admin_unblock_lifts_blocks_and_open_breakers(live, emulator):
    _, http, _ = live
    emulator.state.faults.set(MISTRAL, Fault(status=503))
    for _ in range(3):  # three distinct requests fail on it: its breaker opens
        await chat(http)
    emulator.state.faults.set(LLAMA, Fault(status=429, retry_after=30, times=1))
    emulator.state.faults.clear(MISTRAL)
    await chat(http)  # mistral skipped (cooldown), llama 429s: blocked too; nothing answers
    shown = {(b["model"], b["source"]) for b in await blocks(http)}
    assert shown == {(MISTRAL, "breaker"), (LLAMA, "rate_limit")}

    response = await http.post(f"/admin/unblock?model={MISTRAL}", headers=ADMIN)
    assert response.status == 200
    assert (await response.json())["unblocked"] == [{"model": MISTRAL, "upstream": "openrouter", "source": "breaker"}]
    assert {b["model"] for b in await blocks(http)} == {LLAMA}
    response = await http.post("/admin/unblock", headers=ADMIN)
    assert [u["model"] for u in (await response.json())["unblocked"]] == [LLAMA]
    assert await blocks(http) == []
    _, headers, _ = await chat(http)
    assert headers["x-proxy-route"] == f"cheap: {MISTRAL}=ok"


async def test_unblock_needs_the_admin_key(live):
    _, http, _ = live
    response = await http.post("/admin/unblock")
    assert response.status == 401 and (await response.json())["error"]["type"] == "authentication_error"
