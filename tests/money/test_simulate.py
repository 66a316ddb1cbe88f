"""`orproxy simulate`: mix figures checked by hand arithmetic, mix validation, and the ledger replay
through another config (with a real ledger file)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import pytest

from proxy.cli.ops import register
from proxy.config import parse_config
from proxy.core.pricing import Catalogue, PriceBook
from proxy.core.routing import Router
from proxy.money.catalogue import packaged_snapshot
from proxy.money.ledger import Ledger, LedgerRow
from proxy.money.simulate import SimulationError, parse_mix, replay_rows, simulate_mix

# Snapshot prices, USD per token (= USD per million / 1e6):
#   mistralai/mistral-7b-instruct  0.028/M prompt, 0.054/M completion
#   google/gemini-2.5-flash        0.30/M,  2.50/M
#   anthropic/claude-sonnet-4.5    3.00/M, 15.00/M
#   openai/gpt-4o-mini             0.15/M,  0.60/M
#   meta-llama/llama-3.1-8b        0.02/M,  0.03/M
#   deepseek/deepseek-v3.2         0.27/M,  0.40/M
CURRENT = """
upstreams: {openrouter: {base_url: "https://openrouter.ai/api/v1"}}
models:
  cheap: {chain: [mistralai/mistral-7b-instruct, meta-llama/llama-3.1-8b-instruct]}
  balanced: {chain: [google/gemini-2.5-flash, deepseek/deepseek-v3.2]}
  quality: {chain: [anthropic/claude-sonnet-4.5, openai/gpt-4o-mini]}
  legacy: {chain: [openai/gpt-4o]}
  auto:
    route:
      - {when: {task: complex_analysis}, to: quality}
      - {when: {prompt_tokens_over: 4000}, to: balanced}
      - {to: cheap}
ledger: {path: "%(ledger)s"}
"""

OTHER = """
upstreams: {openrouter: {base_url: "https://openrouter.ai/api/v1"}}
models:
  cheap: {chain: [meta-llama/llama-3.1-8b-instruct]}
  balanced: {chain: [deepseek/deepseek-v3.2]}
  quality: {chain: [openai/gpt-4o-mini]}
  auto:
    route:
      - {when: {prompt_tokens_over: 4000}, to: balanced}
      - {to: cheap}
pricing:
  overrides:
    openai/gpt-4o-mini: {prompt_usd_per_mtok: 1.0, completion_usd_per_mtok: 2.0}
ledger: {path: "%(ledger)s"}
"""


def setup(text: str, ledger: str = "unused.sqlite3") -> tuple[Router, PriceBook]:
    config = parse_config(text % {"ledger": ledger})
    return Router(config), PriceBook(Catalogue.parse(packaged_snapshot()), config.pricing)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="orproxy")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.run(args)


# ------------------------------------------------------------------ the mix, by hand


def test_mix_figures_by_hand():
    router, book = setup(CURRENT)
    result = simulate_mix(
        router,
        book,
        requests_per_day=1000,
        tokens_per_request=1000,
        prompt_share=0.5,
        mix={"cheap": 0.6, "balanced": 0.3, "quality": 0.1},
    )
    # Each request: 1000 tokens x 0.5 prompt share = 500 prompt + 500 completion tokens.
    assert (result.prompt_tokens_per_request, result.completion_tokens_per_request) == (500, 500)
    cheap, balanced, quality = result.lines
    # cheap -> mistral-7b: 500 x $0.028/M + 500 x $0.054/M = $0.000014 + $0.000027 = $0.000041 a request;
    # 600 requests a day (0.6 x 1000): 600 x $0.000041 = $0.0246 a day.
    assert (cheap.model, cheap.requests_per_day) == ("mistralai/mistral-7b-instruct", 600)
    assert cheap.cost_per_request_usd == pytest.approx(0.000041)
    assert cheap.daily_usd == pytest.approx(0.0246)
    # balanced -> gemini-2.5-flash: 500 x $0.30/M + 500 x $2.50/M = $0.00015 + $0.00125 = $0.0014;
    # 300 a day: $0.42.
    assert balanced.daily_usd == pytest.approx(0.42)
    # quality -> claude-sonnet-4.5: 500 x $3/M + 500 x $15/M = $0.0015 + $0.0075 = $0.009; 100 a day: $0.90.
    assert quality.daily_usd == pytest.approx(0.90)
    # Total: 0.0246 + 0.42 + 0.90 = $1.3446 a day; x 30 days = $40.338 a month.
    assert result.daily_usd == pytest.approx(1.3446)
    assert result.monthly_usd == pytest.approx(40.338)
    assert result.days_per_month == 30
    # Baseline gpt-4o-mini alone: 500 x $0.15/M + 500 x $0.60/M = $0.000075 + $0.0003 = $0.000375 a request;
    # x 1000 = $0.375 a day, $11.25 a month.
    assert result.baseline_daily_usd == pytest.approx(0.375)
    assert result.baseline_monthly_usd == pytest.approx(11.25)
    # Savings: 0.375 - 1.3446 = -$0.9696 a day (the mix costs more), -$29.088 a month, -258.56 %.
    assert result.savings_daily_usd == pytest.approx(-0.9696)
    assert result.savings_monthly_usd == pytest.approx(-29.088)
    assert result.savings_pct == pytest.approx(-258.56)
    assert any("primary member" in note and "30 days" in note for note in result.notes)


def test_mix_with_override_prices_per_million_and_a_prompt_share():
    text = (
        CURRENT + "pricing:\n  overrides:\n    mistralai/mistral-7b-instruct: "
        "{prompt_usd_per_mtok: 2.0, completion_usd_per_mtok: 8.0}\n"
    )
    router, book = setup(text)
    result = simulate_mix(
        router,
        book,
        requests_per_day=2000,
        tokens_per_request=4000,
        prompt_share=0.75,
        mix={"cheap": 1.0},
        baseline="openai/gpt-4o",
    )
    # 4000 tokens x 0.75 = 3000 prompt + 1000 completion.
    # cheap (override): 3000 x $2/M + 1000 x $8/M = $0.006 + $0.008 = $0.014 a request; x 2000 = $28 a day.
    assert result.lines[0].price_source == "override"
    assert result.daily_usd == pytest.approx(28.0)
    assert result.monthly_usd == pytest.approx(840.0)
    # gpt-4o: 3000 x $2.5/M + 1000 x $10/M = $0.0075 + $0.01 = $0.0175; x 2000 = $35 a day.
    assert result.baseline_daily_usd == pytest.approx(35.0)
    # Saved: 35 - 28 = $7 a day = 20 % of the baseline.
    assert result.savings_daily_usd == pytest.approx(7.0)
    assert result.savings_pct == pytest.approx(20.0)


def test_auto_is_priced_at_the_catch_all_for_a_request_without_features():
    router, book = setup(CURRENT)
    (line,) = simulate_mix(router, book, requests_per_day=10, tokens_per_request=100, mix={"auto": 1.0}).lines
    assert (line.virtual_model, line.chain_owner, line.model) == ("auto", "cheap", "mistralai/mistral-7b-instruct")


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ("cheap=0.6,balanced=0.3", "add up to 0.9, not 1"),
        ("cheap=0.6,balanced=0.3,quality=0.2", "add up to 1.1, not 1"),
        ("cheap=0.6,premium=0.4", "'premium', not virtual model(s) of the config (known: cheap, balanced"),
        ("cheap=0.6,balanced", "'balanced' is not NAME=SHARE"),
        ("cheap=lots", "the share of 'cheap' is 'lots', not a number"),
        ("cheap=1.5,balanced=-0.5", "must be a number >= 0"),
        ("cheap=0.5,cheap=0.5", "listed twice"),
        ("", "--mix is empty"),
    ],
)
def test_bad_mixes_are_refused(mix, message):
    router, book = setup(CURRENT)
    with pytest.raises(SimulationError) as caught:
        simulate_mix(router, book, requests_per_day=1, tokens_per_request=1, mix=parse_mix(mix))
    assert message in str(caught.value)


def test_shares_within_a_millionth_of_one_are_accepted():
    router, book = setup(CURRENT)
    simulate_mix(
        router,
        book,
        requests_per_day=1,
        tokens_per_request=1,
        mix=parse_mix("cheap=0.3333333,balanced=0.3333333,quality=0.3333333"),
    )


def test_unknown_baseline_is_refused():
    router, book = setup(CURRENT)
    with pytest.raises(SimulationError, match="baseline model 'acme/nothing' is not in the catalogue"):
        simulate_mix(router, book, requests_per_day=1, tokens_per_request=1, mix={"cheap": 1}, baseline="acme/nothing")


def test_cli_mix_json_and_exit_2_on_a_bad_mix(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(CURRENT % {"ledger": tmp_path / "ledger.sqlite3"})
    base = [
        "simulate",
        "--config",
        str(config),
        "--cache",
        str(tmp_path / "absent.json"),
        "--requests-per-day",
        "1000",
        "--tokens-per-request",
        "1000",
    ]
    assert run_cli([*base, "--mix", "cheap=0.6,balanced=0.3,quality=0.1", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["daily_usd"] == pytest.approx(1.3446) and payload["monthly_usd"] == pytest.approx(40.338)

    assert run_cli([*base, "--mix", "cheap=0.6,balanced=0.3"]) == 2
    assert "--mix shares add up to 0.9, not 1" in capsys.readouterr().err

    assert run_cli([*base, "--mix", "cheap=1"]) == 0
    out = capsys.readouterr().out
    # cheap alone: 1000 x $0.000041 = $0.041 a day vs $0.375: saves $0.334 a day, 89.1 %.
    assert "saves $0.3340/day, $10.02/month (89.1% of the baseline) against openai/gpt-4o-mini alone" in out
    assert "primary member; a month is 30 days" in out


# ------------------------------------------------------------------ ledger replay

NOW = time.time()
DAY = 86_400.0


def row(
    request_id: str,
    requested: str,
    prompt: int,
    completion: int,
    cost: float,
    *,
    age_days: float = 1.0,
    cached: bool = False,
) -> LedgerRow:
    return LedgerRow(
        ts=NOW - age_days * DAY,
        request_id=request_id,
        key_name=None,
        requested_model=requested,
        virtual_model=requested,
        model="x/y",
        upstream="openrouter",
        provider=None,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=cost,
        cost_source="cached" if cached else "upstream",
        baseline_cost_usd=0.0,
        latency_s=0.1,
        ttft_s=None,
        status=200,
        attempts=1,
        streamed=False,
        cached=cached,
    )


ROWS = [
    row("r1", "cheap", 1000, 500, 0.0001),
    row("r2", "auto", 5000, 1000, 0.002),  # over 4000 prompt tokens: the other config sends it to balanced
    row("r3", "auto", 100, 100, 0.00001),
    row("r4", "quality", 2000, 1000, 0.021),
    row("r5", "legacy", 10, 10, 0.5),  # no such virtual model in the other config
    row("r6", "cheap", 1000, 1000, 0.0002, cached=False, age_days=40),  # outside a 30-day window
    row("r7", "cheap", 1000, 500, 0.0, cached=True),
]


def check_replay_figures(groups: dict, totals: dict) -> None:
    # cheap, r1: llama-3.1-8b: 1000 x $0.02/M + 500 x $0.03/M = $0.00002 + $0.000015 = $0.000035;
    #        r7 is a cache hit: free under both.
    assert groups["cheap"]["requests"] == 2
    assert groups["cheap"]["actual_usd"] == pytest.approx(0.0001, abs=1e-12)
    assert groups["cheap"]["what_if_usd"] == pytest.approx(0.000035, abs=1e-12)
    # auto, r2 -> balanced (deepseek-v3.2): 5000 x $0.27/M + 1000 x $0.40/M = $0.00135 + $0.0004 = $0.00175;
    #       r3 -> cheap (llama): 100 x $0.02/M + 100 x $0.03/M = $0.000002 + $0.000003 = $0.000005.
    assert groups["auto"]["actual_usd"] == pytest.approx(0.00201, abs=1e-12)
    assert groups["auto"]["what_if_usd"] == pytest.approx(0.001755, abs=1e-12)
    assert set(groups["auto"]["routed_to"]) == {
        "balanced: deepseek/deepseek-v3.2",
        "cheap: meta-llama/llama-3.1-8b-instruct",
    }
    # quality, r4 -> gpt-4o-mini at the override: 2000 x $1/M + 1000 x $2/M = $0.002 + $0.002 = $0.004.
    assert groups["quality"]["what_if_usd"] == pytest.approx(0.004, abs=1e-12)
    assert groups["legacy"]["what_if_usd"] is None
    # Totals over routable rows: actual 0.0001 + 0.00201 + 0.021 = $0.02311;
    # what-if 0.000035 + 0.001755 + 0.004 = $0.00579.
    assert totals["actual_usd"] == pytest.approx(0.02311, abs=1e-12)
    assert totals["what_if_usd"] == pytest.approx(0.00579, abs=1e-12)
    assert (totals["unroutable_requests"], totals["unroutable_actual_usd"]) == (1, pytest.approx(0.5))


def test_replay_rows_by_hand():
    router, book = setup(OTHER)
    rows = [r for r in ROWS if r.request_id != "r6"]
    replay = replay_rows(rows, router, book, start=NOW - 30 * DAY, end=NOW)
    groups = {
        g.requested_model: {
            "requests": g.requests,
            "actual_usd": g.actual_usd,
            "what_if_usd": g.what_if_usd,
            "routed_to": g.routed_to,
        }
        for g in replay.groups
    }
    check_replay_figures(
        groups,
        {
            "actual_usd": replay.actual_usd,
            "what_if_usd": replay.what_if_usd,
            "unroutable_requests": replay.unroutable_requests,
            "unroutable_actual_usd": replay.unroutable_actual_usd,
        },
    )
    assert replay.difference_usd == pytest.approx(0.00579 - 0.02311)
    assert any("only what the ledger records" in note for note in replay.notes)


async def test_cli_replays_a_real_ledger_through_another_config(tmp_path, capsys):
    ledger_path = tmp_path / "ledger.sqlite3"
    ledger = await Ledger.open(ledger_path)
    for item in ROWS:
        await ledger.record(item)
    await ledger.close()
    other = tmp_path / "other.yaml"
    other.write_text(OTHER % {"ledger": ledger_path})

    code = await asyncio.to_thread(
        run_cli,
        [
            "simulate",
            "--from-ledger",
            "--days",
            "30",
            "--config",
            str(other),
            "--cache",
            str(tmp_path / "absent.json"),
            "--json",
        ],
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["requests"] == 6  # r6 is 40 days old
    check_replay_figures({g["requested_model"]: g for g in payload["groups"]}, payload)

    code = await asyncio.to_thread(
        run_cli,
        [
            "simulate",
            "--from-ledger",
            "--config",
            str(other),
            "--ledger",
            str(ledger_path),
            "--cache",
            str(tmp_path / "absent.json"),
        ],
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "actual vs what-if" in out and "balanced: deepseek/deepseek-v3.2" in out and "unroutable" in out


def test_cli_from_ledger_without_a_ledger_says_where_it_looked(tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text(OTHER % {"ledger": tmp_path / "none.sqlite3"})
    assert run_cli(["simulate", "--from-ledger", "--config", str(other)]) == 1
    assert f"no ledger at {tmp_path / 'none.sqlite3'}" in capsys.readouterr().err
    assert not (tmp_path / "none.sqlite3").exists()
