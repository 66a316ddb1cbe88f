"""The model catalogue: refresh from the emulator (and offline), the `orproxy models` view, and the
warnings `orproxy check` prints about chains."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from pathlib import Path

import pytest

from proxy.cli.ops import register
from proxy.config import parse_config
from proxy.core.pricing import Catalogue
from proxy.emulator import create_emulator_app
from proxy.money.catalogue import (
    CatalogueFetchError,
    CatalogueSource,
    catalogue_warnings,
    fetch_catalogue,
    load_catalogue_source,
    packaged_snapshot,
    write_cache,
)
from proxy.money.models_view import build_models_view

CONFIG = """
upstreams:
  openrouter: {base_url: "%(url)s"}
  openai: {base_url: "https://api.openai.com/v1"}
models:
  cheap:
    chain:
      - mistralai/mistral-7b-instruct
      - meta-llama/llama-3.1-8b-instruct
      - {model: gpt-4o-mini, upstream: openai}
  quality: {chain: [anthropic/claude-sonnet-4.5, typo/not-a-model]}
  auto:
    route:
      - {to: cheap}
"""


def config_for(url: str = "https://openrouter.ai/api/v1", extra: str = ""):
    return parse_config(CONFIG % {"url": url} + extra)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="orproxy")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.run(args)


def write_config(tmp_path: Path, url: str, extra: str = "") -> str:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG % {"url": url} + extra)
    return str(path)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ refresh


async def test_refresh_fetches_the_emulators_catalogue_into_the_cache(aiohttp_server, tmp_path, capsys):
    snapshot = packaged_snapshot()
    server = await aiohttp_server(create_emulator_app(catalogue={"data": snapshot["data"][:5]}))
    base = str(server.make_url("/api/v1"))
    cache = tmp_path / "cache" / "models.json"

    code = await asyncio.to_thread(
        run_cli,
        ["models", "refresh", "--config", write_config(tmp_path, base), "--cache", str(cache), "--timeout", "5"],
    )

    assert code == 0
    assert f"fetched 5 models from {base}/models into {cache}" in capsys.readouterr().out
    stored = json.loads(cache.read_text())
    assert stored["source"] == f"{base}/models" and stored["fetched_at"]
    assert stored["top_weekly"] == [m["id"] for m in snapshot["data"][:5]]
    source = load_catalogue_source(None, cache)
    assert source.origin == "cache" and source.top_weekly == tuple(stored["top_weekly"])
    assert set(source.catalogue.prices) == {m["id"] for m in snapshot["data"][:5]}


async def test_fetch_reports_a_non_json_or_failing_upstream(aiohttp_server):
    server = await aiohttp_server(create_emulator_app())
    with pytest.raises(CatalogueFetchError, match=r"could not reach .*/nowhere/models: HTTP 404"):
        await fetch_catalogue(str(server.make_url("/nowhere")), timeout_s=5)


def test_refresh_offline_says_so_and_keeps_the_snapshot(tmp_path, capsys):
    port = unused_port()
    cache = tmp_path / "models.json"
    code = run_cli(
        [
            "models",
            "refresh",
            "--config",
            write_config(tmp_path, f"http://127.0.0.1:{port}/api/v1"),
            "--cache",
            str(cache),
            "--timeout",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"could not reach http://127.0.0.1:{port}/api/v1/models: " in err
    assert "the packaged snapshot (proxy/data/openrouter-models.json) from 2026-11-20 stays in use" in err
    assert not cache.exists()


@pytest.mark.realtime  # the client's 0.3 s timeout runs out against a real socket that never answers
async def test_fetch_gives_up_after_the_timeout():
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/api/v1"
        with pytest.raises(CatalogueFetchError, match=r"no answer within 0.3 s \(raise --timeout\?\)"):
            await fetch_catalogue(url, timeout_s=0.3)


def test_a_failed_refresh_keeps_the_previous_cache(tmp_path, capsys):
    cache = tmp_path / "models.json"
    write_cache(cache, {"fetched_at": "2026-11-21T08:00:00+00:00", "top_weekly": None, "data": []})
    code = run_cli(
        [
            "models",
            "refresh",
            "--config",
            write_config(tmp_path, f"http://127.0.0.1:{unused_port()}"),
            "--cache",
            str(cache),
            "--timeout",
            "2",
        ]
    )
    assert code == 1
    assert f"the refreshed cache ({cache}) from 2026-11-21T08:00:00+00:00 stays in use" in capsys.readouterr().err
    assert json.loads(cache.read_text())["fetched_at"] == "2026-11-21T08:00:00+00:00"


# ------------------------------------------------------------------ where prices come from


def test_source_order_pinned_config_then_cache_then_snapshot(tmp_path):
    assert load_catalogue_source(None, tmp_path / "absent.json").origin == "snapshot"
    cache = tmp_path / "cache.json"
    write_cache(cache, {"fetched_at": "2026-11-22T00:00:00+00:00", "data": []})
    assert load_catalogue_source(None, cache).origin == "cache"
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps({"snapshot_date": "2026-01-01", "data": []}))
    source = load_catalogue_source(config_for(extra=f"pricing: {{catalogue: {pinned}}}\n"), cache)
    assert (source.origin, source.date) == ("config", "2026-01-01")
    assert "is not used" in source.notes[0]


def test_an_unreadable_cache_falls_back_to_the_snapshot_with_a_note(tmp_path):
    cache = tmp_path / "cache.json"
    for broken in ("{not json", '{"data": [{"name": "no id"}]}'):
        cache.write_text(broken)
        source = load_catalogue_source(None, cache)
        assert source.origin == "snapshot"
        assert "run `orproxy models refresh` or delete it" in source.notes[0]


# ------------------------------------------------------------------ the view


def snapshot_source(top_weekly: tuple[str, ...] | None = None) -> CatalogueSource:
    return CatalogueSource(Catalogue.parse(packaged_snapshot()), "snapshot", "packaged", "2026-11-20", top_weekly)


def test_view_prices_per_million_usage_and_missing_models():
    view = build_models_view(config_for(), snapshot_source())
    rows = {row.id: row for row in view.rows}
    mistral = rows["mistralai/mistral-7b-instruct"]
    # The snapshot says "0.000000028" USD per token: 0.028 USD per million tokens.
    assert mistral.prompt_usd_per_mtok == pytest.approx(0.028)
    assert mistral.completion_usd_per_mtok == pytest.approx(0.054)
    assert mistral.context_length == 32768 and mistral.used_by == ("cheap[0]",)
    assert rows["gpt-4o-mini"].used_by == ("cheap[2]",)
    assert rows["openai/gpt-4o"].used_by == ()
    missing = rows["typo/not-a-model"]
    assert (missing.listed, missing.prompt_usd_per_mtok, missing.used_by) == (False, None, ("quality[1]",))
    assert view.rows[-1] is missing
    assert any("missing from the catalogue: typo/not-a-model" in note for note in view.notes)


def test_view_shows_override_prices():
    config = config_for(
        extra="pricing:\n  overrides:\n    mistralai/mistral-7b-instruct: "
        "{prompt_usd_per_mtok: 1.5, completion_usd_per_mtok: 2}\n"
    )
    row = next(r for r in build_models_view(config, snapshot_source()).rows if r.id == "mistralai/mistral-7b-instruct")
    assert (row.prompt_usd_per_mtok, row.completion_usd_per_mtok, row.price_source) == (1.5, 2.0, "override")


def test_top_weekly_order_when_known_else_a_note_and_catalogue_order():
    ranked = ("openai/gpt-4o", "anthropic/claude-sonnet-4.5", "google/gemini-2.5-flash")
    view = build_models_view(config_for(), snapshot_source(ranked), top_weekly=True)
    assert view.order == "top-weekly"
    assert tuple(row.id for row in view.rows[:3]) == ranked
    assert view.rows[3].id == "mistralai/mistral-7b-instruct"  # unranked: catalogue order after the ranked
    assert view.rows[-1].id == "typo/not-a-model"  # unlisted: last

    plain = build_models_view(config_for(), snapshot_source(), top_weekly=True)
    assert plain.order == "catalogue"
    assert plain.rows[0].id == "mistralai/mistral-7b-instruct"
    assert any("top-weekly ordering is unavailable" in note for note in plain.notes)


def test_models_command_json(tmp_path, capsys):
    code = run_cli(
        [
            "models",
            "--json",
            "--config",
            write_config(tmp_path, "https://openrouter.ai/api/v1"),
            "--cache",
            str(tmp_path / "absent.json"),
        ]
    )
    payload = json.loads(capsys.readouterr().out)
    assert code == 0
    assert payload["source"].startswith("the packaged snapshot") and "2026-11-20" in payload["source"]
    sonnet = next(r for r in payload["rows"] if r["id"] == "anthropic/claude-sonnet-4.5")
    assert (sonnet["prompt_usd_per_mtok"], sonnet["completion_usd_per_mtok"], sonnet["used_by"]) == (
        pytest.approx(3.0),
        pytest.approx(15.0),
        ["quality[0]"],
    )


def test_models_command_table_is_wide_when_piped(tmp_path, capsys):
    assert (
        run_cli(
            [
                "models",
                "--config",
                write_config(tmp_path, "https://openrouter.ai/api/v1"),
                "--cache",
                str(tmp_path / "absent.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "anthropic/claude-sonnet-4.5" in out and "quality[0]" in out and "per MILLION tokens" in out
    assert "typo/not-a-model (missing from the catalogue)" in out


# ------------------------------------------------------------------ warnings for `orproxy check`


WARN_CONFIG = """
upstreams: {openrouter: {base_url: "https://openrouter.ai/api/v1"}}
models:
  cheap: {chain: [mistralai/mistral-7b-instruct, meta-llama/llama-3.1-8b-instruct, openai/gpt-4o]}
  balanced: {chain: [google/gemini-2.5-flash, deepseek/deepseek-v3.2, anthropic/claude-3-haiku]}
  gone: {chain: [anthropic/claude-3.5-haiku]}
  typo: {chain: [openai/gpt-4o-mimi]}
  priced: {chain: [private/finetune]}
  variable: {chain: [openrouter/auto]}
pricing:
  overrides:
    private/finetune: {prompt_usd_per_mtok: 1, completion_usd_per_mtok: 1}
"""


def refreshed_catalogue() -> Catalogue:
    """A refresh in which OpenRouter dropped claude-3.5-haiku and added a variable-price router."""
    data = [m for m in packaged_snapshot()["data"] if m["id"] != "anthropic/claude-3.5-haiku"]
    data.append({"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}})
    return Catalogue.parse({"data": data})


def test_catalogue_warnings_name_the_chain_position():
    warnings = catalogue_warnings(parse_config(WARN_CONFIG), refreshed_catalogue())
    by_place = {w.split(":", 1)[0]: w for w in warnings}
    assert set(by_place) == {
        "models.cheap.chain[2]",
        "models.gone.chain[0]",
        "models.typo.chain[0]",
        "models.variable.chain[0]",
    }
    # gpt-4o blended: 2.5 + 10 = 12.5 $/M; mistral: 0.028 + 0.054 = 0.082 $/M; 12.5 / 0.082 = 152.4x
    assert (
        "fallback 'openai/gpt-4o' costs $12.5/M tokens blended (prompt + completion per million) "
        "vs $0.082/M for the primary 'mistralai/mistral-7b-instruct': 152.4x, more than the 3x allowed"
        in by_place["models.cheap.chain[2]"]
    )
    assert "'anthropic/claude-3.5-haiku' was delisted" in by_place["models.gone.chain[0]"]
    assert (
        "'openai/gpt-4o-mimi' (upstream openrouter) is not in the catalogue: check the spelling"
        in by_place["models.typo.chain[0]"]
    )
    assert "no fixed price" in by_place["models.variable.chain[0]"]


@pytest.mark.parametrize(
    ("factor", "flagged"),
    [
        # balanced: gemini-2.5-flash 0.3 + 2.5 = 2.8 $/M; claude-3-haiku 0.25 + 1.25 = 1.5; deepseek 0.67: none dearer
        (3.0, {"models.cheap.chain[2]"}),
        # cheap: llama-3.1-8b 0.02 + 0.03 = 0.05 $/M is cheaper than the primary's 0.082
        (0.5, {"models.cheap.chain[2]", "models.balanced.chain[2]", "models.cheap.chain[1]"}),
        (200.0, set()),
    ],
)
def test_dearer_factor(factor, flagged):
    warnings = catalogue_warnings(parse_config(WARN_CONFIG), Catalogue.parse(packaged_snapshot()), dearer_factor=factor)
    dearer = {w.split(":", 1)[0] for w in warnings if "blended" in w}
    assert dearer == flagged


def test_no_delisted_warnings_against_the_snapshot_itself():
    warnings = catalogue_warnings(parse_config(WARN_CONFIG), Catalogue.parse(packaged_snapshot()))
    assert not any("delisted" in w for w in warnings)
