"""Explain says what the proxy then really does: same rules, same chain, same skips, same downgrade."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from proxy.emulator import Fault
from tests.support.gateway import ROOT

HELLO = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


async def explain_then_send(proxy, http, body: dict, headers: dict | None = None):
    response = await http.post("/v1/route/explain", json=body, headers=headers or {})
    assert response.status == 200, await response.text()
    decision = await response.json()
    raw = await proxy.client().chat.completions.with_raw_response.create(extra_headers=headers or {}, **body)
    return decision, raw


@pytest.mark.parametrize(
    "body, headers, expected_rule, expected_model",
    [
        (
            {"model": "auto", "messages": HELLO},
            {"X-Task-Type": "code_generation"},
            "models.auto.route[0]",
            "x-ai/grok-code-fast-1",
        ),
        (
            {"model": "auto", "messages": HELLO, "metadata": {"task": "complex_analysis"}},
            {},
            "models.auto.route[1]",
            "anthropic/claude-sonnet-4.5",
        ),
        (
            {"model": "auto", "messages": [{"role": "user", "content": "word " * 5000}]},
            {},
            "models.auto.route[2]",
            "google/gemini-2.5-flash",
        ),
        (
            {"model": "auto", "messages": HELLO, "tools": [WEATHER_TOOL]},
            {},
            "models.auto.route[3]",
            "mistralai/mistral-7b-instruct",
        ),
        ({"model": "quality", "messages": HELLO, "max_tokens": 100}, {}, None, "anthropic/claude-sonnet-4.5"),
    ],
)
async def test_explain_matches_the_real_route(
    proxy, aiohttp_client, emulator, body, headers, expected_rule, expected_model
):
    http = await aiohttp_client(proxy.server)
    decision, raw = await explain_then_send(proxy, http, body, headers)
    assert [r["rule"] for r in decision["rules"]][:1] == ([expected_rule] if expected_rule else [])
    assert decision["chain"][0]["model"] == expected_model == raw.headers["x-proxy-model"]
    assert raw.headers["x-proxy-route"].split(": ")[0] == decision["route"].split(": ")[0]
    assert decision["estimated_worst_case_usd"] > 0
    assert len(emulator.state.requests) == 1  # explain itself sent nothing upstream


async def test_explain_shows_cooldown_skips_the_proxy_then_applies(proxy, aiohttp_client, emulator):
    emulator.state.faults.set("mistralai/mistral-7b-instruct", Fault(status=503))
    client = proxy.client()
    for _ in range(3):  # the breaker opens on failures of three distinct requests
        await client.chat.completions.create(model="cheap", messages=HELLO)
    http = await aiohttp_client(proxy.server)
    decision, raw = await explain_then_send(proxy, http, {"model": "cheap", "messages": HELLO})
    assert [(s["model"], s["reason"]) for s in decision["skipped"]] == [("mistralai/mistral-7b-instruct", "cooldown")]
    assert decision["chain"][0]["model"] == "meta-llama/llama-3.1-8b-instruct" == raw.headers["x-proxy-model"]
    assert "mistralai/mistral-7b-instruct=skipped:cooldown" in raw.headers["x-proxy-route"]


async def test_explain_shows_the_budget_downgrade_the_proxy_then_applies(make_proxy, aiohttp_client, emulator):
    proxy = await make_proxy(extra="budget: {daily_usd: 1.0, downgrade: [{at: 0.000001, map: {quality: cheap}}]}\n")
    http = await aiohttp_client(proxy.server)
    first, raw = await explain_then_send(proxy, http, {"model": "quality", "messages": HELLO})
    assert first["budget"]["downgrade_step"] is None and raw.headers["x-proxy-model"] == "anthropic/claude-sonnet-4.5"
    decision, raw = await explain_then_send(proxy, http, {"model": "quality", "messages": HELLO})
    assert decision["budget"]["downgrade_step"]["index"] == 0
    assert decision["budget"]["rewrites"] == [{"from": "quality", "to": "cheap"}]
    assert decision["chain"][0]["model"] == "mistralai/mistral-7b-instruct" == raw.headers["x-proxy-model"]
    assert raw.headers["x-proxy-downgrade"].startswith("quality->cheap")


async def test_explain_errors_are_openai_shaped(proxy, aiohttp_client):
    http = await aiohttp_client(proxy.server)
    response = await http.post("/v1/route/explain", json={"model": "nope", "messages": HELLO})
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "model_not_found"
    response = await http.post("/v1/route/explain", data=b"{")
    assert response.status == 400


def test_cli_explain_agrees_with_the_config(tmp_path):
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "x " * 20000}]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "explain",
            "--config",
            str(ROOT / "config.yaml"),
            "--model",
            "auto",
            "--messages-file",
            str(messages),
            "--max-tokens",
            "100",
            "--ledger",
            str(tmp_path / "none.sqlite3"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's package, whatever the venv installed
    )
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["rules"] == [{"virtual_model": "auto", "rule": "models.auto.route[2]"}]
    assert [m["model"] for m in decision["chain"]] == [
        "google/gemini-2.5-flash",
        "deepseek/deepseek-v3.2",
        "anthropic/claude-3-haiku",
    ]
    # Worst case by hand: ~10,000 prompt tokens and 100 completion tokens on the dearest member.
    prompt = decision["features"]["prompt_tokens_estimate"]
    flash = prompt * 0.0000003 + 100 * 0.0000025
    haiku = prompt * 0.00000025 + 100 * 0.00000125
    assert decision["estimated_worst_case_usd"] == pytest.approx(max(flash, haiku))
