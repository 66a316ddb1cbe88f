"""Reports: `orproxy report` (run for real) and GET /admin/spend add up to what the upstream billed."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.support.gateway import ROOT, UPSTREAM_KEY, proxy_config_text
from tests.support.money import usage_cost
from tests.support.timing import Clock

ADMIN_KEY = "admin-secret-890"
ENV = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "TEST_ADMIN_KEY": ADMIN_KEY}
EXTRA = "admin: {key_env: TEST_ADMIN_KEY}\npricing: {savings_baseline: openai/gpt-4o-mini}\n"
NANO = 1e-9
BASELINE_PRICES = (0.00000015, 0.0000006)  # openai/gpt-4o-mini, per token


async def run_report(config: Path, ledger: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "report",
        "--config",
        str(config),
        "--ledger",
        str(ledger),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(15):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


class Billed:
    """What the SDK was told each request cost, per real and per virtual model."""

    def __init__(self) -> None:
        self.total = 0.0
        self.requests = 0
        self.prompt = self.completion = 0
        self.by_model: dict[str, float] = defaultdict(float)
        self.by_virtual: dict[str, float] = defaultdict(float)

    def add(self, model: str, virtual: str, usage) -> None:
        cost = usage_cost(usage)
        self.total += cost
        self.requests += 1
        self.prompt += usage.prompt_tokens
        self.completion += usage.completion_tokens
        self.by_model[model] += cost
        self.by_virtual[virtual] += cost

    @property
    def baseline(self) -> float:
        return self.prompt * BASELINE_PRICES[0] + self.completion * BASELINE_PRICES[1]


async def send_mix(client) -> Billed:
    billed = Billed()
    cases = [  # (model, streamed, extra headers, the virtual model the ledger should name)
        ("cheap", False, None, "cheap"),
        ("cheap", True, None, "cheap"),
        ("balanced", True, None, "balanced"),
        ("balanced", False, None, "balanced"),
        ("quality", False, None, "quality"),
        ("quality", True, None, "quality"),
        ("auto", True, {"X-Task-Type": "code_generation"}, "code"),
        ("auto", False, None, "cheap"),
        ("anthropic/claude-3-haiku", False, None, "(none)"),
    ]
    for i, (model, streamed, headers, virtual) in enumerate(cases):
        messages = [{"role": "user", "content": f"Request {i}: explain item {i} of the list in a sentence or two."}]
        if streamed:
            stream = await client.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=headers,
            )
            chunks = [chunk async for chunk in stream]
            final = [c for c in chunks if c.usage is not None]
            assert len(final) == 1
            billed.add(chunks[0].model, virtual, final[0].usage)
        else:
            completion = await client.chat.completions.create(model=model, messages=messages, extra_headers=headers)
            billed.add(completion.model, virtual, completion.usage)
    return billed


def assert_report_matches(report: dict, billed: Billed, by: str) -> None:
    total = report["total"]
    tolerance = billed.requests * NANO / 2 + 1e-15  # each row is rounded to whole nano-dollars
    assert total["requests"] == billed.requests
    assert total["cost_usd"] == pytest.approx(billed.total, abs=tolerance)
    assert total["prompt_tokens"] == billed.prompt and total["completion_tokens"] == billed.completion
    assert total["baseline_cost_usd"] == pytest.approx(billed.baseline, abs=tolerance)
    assert total["savings_usd"] == pytest.approx(billed.baseline - billed.total, abs=2 * tolerance)
    expected = billed.by_model if by == "model" else billed.by_virtual
    groups = {row["group"]: row["cost_usd"] for row in report["rows"]}
    assert groups.keys() == expected.keys()
    for group, cost in expected.items():
        assert groups[group] == pytest.approx(cost, abs=tolerance), group
    assert sum(row["requests"] for row in report["rows"]) == billed.requests


@pytest.fixture
async def served(make_proxy, emulator, tmp_path):
    """A proxy that has served a mix of requests, its config on disk and its ledger file."""
    ledger = tmp_path / "report.sqlite3"
    proxy = await make_proxy(extra=EXTRA, env=ENV, ledger_path=ledger)
    billed = await send_mix(proxy.client())
    config = tmp_path / "config.yaml"
    config.write_text(proxy_config_text(emulator.url) + EXTRA)
    return proxy, billed, config, ledger


@pytest.mark.parametrize("by", ["model", "virtual"])
async def test_cli_report_totals_equal_what_the_upstream_billed(served, by):
    _, billed, config, ledger = served
    code, out, err = await run_report(config, ledger, "--period", "day", "--by", by, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["period"], report["by"]) == ("day", by)
    assert_report_matches(report, billed, by)


async def test_cli_report_month_and_table(served):
    _, billed, config, ledger = served
    code, out, err = await run_report(config, ledger, "--period", "month", "--json")
    assert code == 0, err
    assert_report_matches(json.loads(out), billed, "model")
    code, out, err = await run_report(config, ledger, "--by", "virtual")
    assert code == 0, err
    assert "Spend by virtual" in out and "quality" in out and "saved" in out
    assert f"{billed.total:.6f}" in out


async def test_cli_report_without_a_ledger_says_so(served, tmp_path):
    _, _, config, _ = served
    code, _, err = await run_report(config, tmp_path / "nothing-here.sqlite3", "--json")
    assert code == 1 and "no ledger" in err


async def test_admin_spend_equals_what_the_upstream_billed(served, aiohttp_client):
    proxy, billed, _, _ = served
    http = await aiohttp_client(proxy.server)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for by in ("model", "virtual"):
        response = await http.get(f"/admin/spend?period=day&by={by}", headers=auth)
        assert response.status == 200
        report = await response.json()
        assert_report_matches(report, billed, by)
    budget = {(b["scope"], b["window"]): b["spent_usd"] for b in report["budget"]}
    assert budget[("global", "daily")] == pytest.approx(billed.total, rel=1e-9)
    response = await http.get("/admin/spend?period=month&by=key", headers=auth)
    report = await response.json()
    assert [row["group"] for row in report["rows"]] == ["(none)"]
    assert report["total"]["cost_usd"] == pytest.approx(billed.total, abs=billed.requests * NANO)


@pytest.mark.parametrize(
    "headers, query, status",
    [
        ({}, "period=day", 401),
        ({"Authorization": "Bearer wrong"}, "period=day", 401),
        ({"Authorization": f"Bearer {ADMIN_KEY}"}, "period=year", 400),
        ({"Authorization": f"Bearer {ADMIN_KEY}"}, "by=colour", 400),
    ],
)
async def test_admin_refuses_bad_keys_and_parameters(make_proxy, aiohttp_client, headers, query, status):
    proxy = await make_proxy(extra=EXTRA, env=ENV)
    http = await aiohttp_client(proxy.server)
    response = await http.get(f"/admin/spend?{query}", headers=headers)
    assert response.status == status
    assert (await response.json())["error"]["message"]


async def test_admin_routes_are_off_without_the_admin_key(make_proxy, aiohttp_client):
    env = {k: v for k, v in ENV.items() if k != "TEST_ADMIN_KEY"}
    proxy = await make_proxy(extra=EXTRA, env=env)
    http = await aiohttp_client(proxy.server)
    response = await http.get("/admin/spend", headers={"Authorization": "Bearer "})
    assert response.status == 404


async def test_admin_budget_figures_roll_over_at_midnight_without_traffic(make_proxy, aiohttp_client):
    clock = Clock()
    proxy = await make_proxy(extra=EXTRA + "budget: {daily_usd: 1.0}\n", env=ENV, clock=clock)
    await proxy.client().chat.completions.create(model="cheap", messages=[{"role": "user", "content": "hi"}])
    http = await aiohttp_client(proxy.server)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}

    async def daily_spent() -> float:
        report = await (await http.get("/admin/spend", headers=auth)).json()
        return next(b["spent_usd"] for b in report["budget"] if (b["scope"], b["window"]) == ("global", "daily"))

    assert await daily_spent() > 0
    clock.now = proxy.book.calendar.day_end + 1  # the next day, no request since
    assert await daily_spent() == 0.0
