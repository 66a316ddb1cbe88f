"""Figures end to end: cached prompt tokens on both kinds of upstream, absurd upstream costs,
a savings baseline nobody can price, and what the response cache saved, in every place it shows."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from proxy.core.bounds import MAX_ROW_USD
from proxy.http.appkeys import METRICS, RELOADER
from tests.support.audit import billed_nano, booked_nano, report_json, settled
from tests.support.gateway import ROOT, UPSTREAM_KEY, proxy_config_text
from tests.support.money import MODELS
from tests.support.timing import cache_writes_settled

SYSTEM = {"role": "system", "content": "You are the lighthouse keeper's logbook. " * 12}  # ~130 tokens: cached
CACHING = (
    MODELS + "  oa: {chain: [{model: gpt-4o-mini, upstream: openai}]}\n  haiku: {chain: [anthropic/claude-3-haiku]}\n"
)


@pytest.mark.parametrize(
    "model, upstream, writes",
    [("oa", "openai", False), ("haiku", "openrouter", True)],  # haiku has a cache-write price, gpt-4o-mini not
)
async def test_cached_prompt_tokens_are_recorded_and_priced(make_proxy, emulator, model, upstream, writes):
    proxy = await make_proxy(CACHING)
    client = proxy.client()
    for question in ("Any ships tonight?", "Is the lamp lit?", "How high are the waves?"):
        messages = [SYSTEM, {"role": "user", "content": question}]
        await client.chat.completions.create(model=model, messages=messages, stream=model == "oa")
    rows = await settled(proxy)
    assert [r.upstream for r in rows] == [upstream] * 3
    bills = list(emulator.state.bills.values())
    assert [(r.cached_tokens, r.cache_write_tokens) for r in rows] == [
        (b.cached_tokens, b.cache_write_tokens) for b in bills
    ]
    assert rows[0].cached_tokens == 0 and rows[1].cached_tokens == rows[2].cached_tokens > 100
    assert (rows[0].cache_write_tokens > 100) is writes
    assert booked_nano(rows) == billed_nano(emulator)  # cached reads at the catalogue's input_cache_read
    full_price = rows[1].prompt_tokens * emulator.state.models[bills[1].model].prompt_price
    assert rows[1].cost_usd < full_price  # the cached part is not billed at full price


def absurd_upstream() -> web.Application:
    """An upstream whose `usage.cost` for one model is $9.2e9, past SQLite's integer in nano-dollars."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        cost = 9.2e9 if body["model"] == "odd/model" else 0.000123
        answer = {
            "id": f"gen-{body['messages'][0]['content']}",
            "object": "chat.completion",
            "created": 1,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "total_tokens": 6,
                "cost": cost,
            },
        }
        raw = orjson.dumps(answer)
        if cost > 1:  # and 10^15 prompt tokens
            raw = raw.replace(b'"prompt_tokens":5', b'"prompt_tokens":1' + b"0" * 15)
        await asyncio.sleep(0.01)  # the requests finish together: their rows share a batch
        return web.Response(body=raw, content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/v1/chat/completions", chat)
    return app


async def test_an_absurd_cost_is_clamped_flagged_logged_and_costs_no_other_row_its_place(
    make_proxy, aiohttp_server, caplog
):
    upstream = await aiohttp_server(absurd_upstream())
    body = "models:\n  odd: {chain: [odd/model]}\n  fine: {chain: [fine/model]}\n"
    proxy = await make_proxy(config_text=proxy_config_text(str(upstream.make_url("")).rstrip("/"), body))
    client = proxy.client()
    caplog.set_level(logging.WARNING, logger="orproxy")
    commits = proxy.ledger.commits
    names = ["odd" if i == 3 else "fine" for i in range(8)]
    await asyncio.gather(
        *(
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": f"r{i}"}])
            for i, name in enumerate(names)
        )
    )
    rows = await settled(proxy)
    assert len(rows) == 8 and proxy.ledger.commits - commits < 8  # batched, and every row written
    (odd,) = [r for r in rows if r.model == "odd/model"]
    assert (odd.cost_usd, odd.flags) == (MAX_ROW_USD, "clamped:prompt_tokens,cost_usd")
    assert odd.prompt_tokens == 100_000_000
    assert {(r.cost_usd, r.flags) for r in rows if r is not odd} == {(0.000123, None)}
    warnings = [r.getMessage() for r in caplog.records if "clamped" in r.getMessage()]
    assert len(warnings) == 1 and odd.request_id in warnings[0]


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_a_misspelt_savings_baseline_is_refused_with_the_closest_slugs(make_proxy, emulator, tmp_path):
    good = proxy_config_text(emulator.url, MODELS + "  odd: {chain: [nobody/knows-this]}\n")
    good += "pricing: {savings_baseline: openai/gpt-4o-mini}\n"
    bad = good.replace("openai/gpt-4o-mini}", "openai/gpt-4o-mni}")
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if "gpt-4o-mni" in text)
    path = tmp_path / "config.yaml"
    path.write_text(bad)
    for command in (["check", str(path)], ["serve", "--config", str(path), "--port", "0"]):
        code, _out, err = await run_cli(*command)
        assert code == 1, (command, err)
        assert f"{path}:{line}: pricing.savings_baseline: 'openai/gpt-4o-mni' is neither in the price catalogue" in err
        assert "did you mean 'openai/gpt-4o-mini'" in err
    path.write_text(good)
    code, out, err = await run_cli("check", str(path))
    assert code == 0 and "OK" in out
    assert "models.odd.chain[0]: 'nobody/knows-this' (upstream openrouter) is not in the catalogue" in err
    # A reload refuses it too, and the running config keeps serving.
    proxy = await make_proxy(config_text=good, config_path=path)
    path.write_text(bad)
    status = await proxy.app[RELOADER].reload("test")
    assert status.last_result == "failure" and "did you mean 'openai/gpt-4o-mini'" in status.last_errors[0]
    assert f"{path}:{line}:" in status.last_errors[0]


async def test_what_the_cache_saved_is_reported_everywhere(make_proxy, emulator, aiohttp_client, tmp_path):
    config = tmp_path / "config.yaml"
    ledger = tmp_path / "ledger.sqlite3"
    text = proxy_config_text(emulator.url, MODELS) + "admin: {key_env: ADMIN}\n"
    config.write_text(text)
    env = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "ADMIN": "admin-secret"}
    proxy = await make_proxy(config_text=text, env=env, ledger_path=ledger)
    client = proxy.client()
    question = [{"role": "user", "content": "What does the lighthouse keeper log at dawn?"}]
    first = await client.chat.completions.create(model="balanced", messages=question, temperature=0)
    await cache_writes_settled()
    for _ in range(3):
        await client.chat.completions.create(model="balanced", messages=question, temperature=0)
    rows = await settled(proxy)
    (bill,) = emulator.state.bills.values()
    assert bill.id == first.id and [r.cached for r in rows] == [False, True, True, True]
    saved = 3 * bill.cost
    report = await report_json(config, ledger, "--period", "month", "--by", "virtual")
    assert report["total"]["cache_hits"] == 3 and report["total"]["cache_saved_usd"] == pytest.approx(saved, abs=1e-9)
    http = await aiohttp_client(proxy.server)
    admin = await (await http.get("/admin/spend?period=month", headers={"Authorization": "Bearer admin-secret"})).json()
    assert admin["total"]["cache_saved_usd"] == pytest.approx(saved, abs=1e-9)
    metrics = proxy.app[METRICS].registry
    assert metrics.get_sample_value(
        "orproxy_cache_saved_usd_total", {"virtual_model": "balanced", "key": "none"}
    ) == pytest.approx(saved, rel=1e-12)
    assert (Path(ROOT) / "grafana" / "dashboards" / "cost.json").read_text().count("orproxy_cache_saved_usd_total") == 1
