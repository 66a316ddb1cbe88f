"""Model kinds against the catalogue: `orproxy check` (and serve, and reloads) refuse a chain member
of the other kind than its virtual model, where the catalogue knows the member's kind; a refresh
fetches OpenRouter's embedding models, which its /models leaves out."""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from proxy.config import parse_config
from proxy.core.pricing import Catalogue
from proxy.emulator import create_emulator_app
from proxy.emulator.completions import is_embedding_model
from proxy.http.appkeys import RELOADER
from proxy.money.catalogue import CatalogueSource, fetch_catalogue, kind_errors, model_kinds, packaged_snapshot
from tests.support.gateway import ROOT, proxy_config_text

GOOD = """
models:
  cheap: {chain: [mistralai/mistral-7b-instruct]}
  embed: {kind: embeddings, chain: [openai/text-embedding-3-small, some/unlisted-embedder]}
"""


async def orproxy(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


def line_of(text: str, needle: str) -> int:
    return next(number for number, line in enumerate(text.splitlines(), 1) if needle in line)


async def test_check_and_reload_refuse_a_member_of_the_other_kind(make_proxy, emulator, tmp_path):
    good = proxy_config_text(emulator.url, GOOD)
    bad = good.replace(
        "cheap: {chain: [mistralai/mistral-7b-instruct]}", "cheap: {chain: [openai/text-embedding-3-large]}"
    ).replace("some/unlisted-embedder", "openai/gpt-4o-mini")
    path = tmp_path / "config.yaml"
    path.write_text(bad)
    code, _out, err = await orproxy("check", str(path))
    assert code == 1, err
    assert (
        f"{path}:{line_of(bad, 'cheap:')}: models.cheap.chain[0]: 'openai/text-embedding-3-large' is an embeddings "
        "model in the price catalogue" in err
    )
    assert "but models.cheap has kind chat: put it in a virtual model with `kind: embeddings`" in err
    assert (
        f"{path}:{line_of(bad, 'embed:')}: models.embed.chain[1]: 'openai/gpt-4o-mini' is a chat model in the "
        "price catalogue" in err
    )
    path.write_text(good)
    code, out, err = await orproxy("check", str(path))
    assert code == 0 and "OK (2 virtual models" in out, err  # an unlisted member's kind is unknown: not refused

    proxy = await make_proxy(config_text=good, config_path=path)
    path.write_text(bad)
    status = await proxy.app[RELOADER].reload("test")
    assert status.last_result == "failure" and "'openai/gpt-4o-mini' is a chat model" in " ".join(status.last_errors)
    assert (await proxy.client().embeddings.create(model="embed", input="still served")).data


def test_kinds_come_from_the_output_modalities_and_are_unknown_without_them():
    kinds = model_kinds(Catalogue.parse(packaged_snapshot()))
    assert kinds["openai/text-embedding-3-small"] == kinds["qwen/qwen3-embedding-8b"] == "embeddings"
    assert kinds["anthropic/claude-sonnet-4.5"] == kinds["gpt-4o-mini"] == "chat"
    bare = Catalogue.parse(
        {"data": [{"id": "openai/text-embedding-3-small", "pricing": {"prompt": "0", "completion": "0"}}]}
    )
    config = parse_config(proxy_config_text("http://x", "models:\n  cheap: {chain: [openai/text-embedding-3-small]}\n"))
    assert model_kinds(bare) == {} and kind_errors(config, CatalogueSource(bare, "config", "f", None)) == []


async def test_a_refresh_adds_openrouters_embedding_models(aiohttp_server):
    snapshot = packaged_snapshot()
    server = await aiohttp_server(create_emulator_app(catalogue=snapshot))
    document = await fetch_catalogue(str(server.make_url("/api/v1")), timeout_s=5)
    kinds = model_kinds(Catalogue.parse(document))
    assert {model for model, kind in kinds.items() if kind == "embeddings"} == {
        m["id"] for m in snapshot["data"] if is_embedding_model(m)
    }
    assert document["embeddings_source"].endswith("/api/v1/embeddings/models")
    assert sorted(m["id"] for m in document["data"]) == sorted(m["id"] for m in snapshot["data"])  # each once
    assert "openai/text-embedding-3-small" not in document["top_weekly"]  # a ranking of text models


async def test_a_refresh_from_an_upstream_without_embeddings_keeps_its_models(aiohttp_server):
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "a/b", "pricing": {"prompt": "0", "completion": "0"}}]})

    app = web.Application()
    app.router.add_get("/api/v1/models", models)  # and no /embeddings/models: a 404
    server = await aiohttp_server(app)
    document = await fetch_catalogue(str(server.make_url("/api/v1")), timeout_s=5)
    assert [m["id"] for m in document["data"]] == ["a/b"] and document["embeddings_source"] is None
