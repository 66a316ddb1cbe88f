"""Hot reload under load: invalid edits change nothing, valid ones take effect, no request fails."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import yaml

from proxy.http.appkeys import RELOADER
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text
from tests.support.timing import wait_for

HELLO = [{"role": "user", "content": "hi"}]
ADMIN = {"Authorization": "Bearer admin-secret"}
ENV = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "TEST_ADMIN_KEY": "admin-secret"}


def config_with_cheap(emulator_url: str, chain: str, watch: bool = False) -> str:
    models = f"models:\n  cheap: {{chain: [{chain}]}}\n  auto: {{route: [{{to: cheap}}]}}\n"
    return (
        proxy_config_text(emulator_url, models)
        + "admin: {key_env: TEST_ADMIN_KEY}\n"
        + f"watch_config: {'true' if watch else 'false'}\n"
    )


class Load:
    """Clients sending requests back to back while the test edits the config."""

    def __init__(self, client: openai.AsyncOpenAI, workers: int = 8) -> None:
        self.client = client
        self.models: list[str] = []
        self.failures: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run()) for _ in range(workers)]

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = await self.client.chat.completions.create(model="auto", messages=HELLO)
                self.models.append(reply.model)
            except Exception as exc:
                self.failures.append(exc)
            await asyncio.sleep(0)

    async def answers(self, more: int) -> None:
        """Wait until `more` further answers have come back (or a request failed)."""
        target = len(self.models) + more
        await wait_for(lambda: len(self.models) >= target or self.failures, message=f"{more} more answers")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def served_by(proxy) -> str:
    reply = await proxy.client().chat.completions.create(model="cheap", messages=HELLO)
    return reply.model


async def test_invalid_edits_keep_serving_and_valid_ones_apply_under_load(
    make_proxy, emulator, tmp_path, aiohttp_client, caplog
):
    path = tmp_path / "config.yaml"
    proxy = await make_proxy(
        config_text=config_with_cheap(emulator.url, "mistralai/mistral-7b-instruct"), env=ENV, config_path=path
    )
    http = await aiohttp_client(proxy.server)
    load = Load(proxy.client())
    await load.answers(16)  # under way before the first edit
    for broken in (
        "models: [unclosed\n",
        config_with_cheap(emulator.url, "mistralai/mistral-7b-instruct").replace("to: cheap", "to: chep"),
        config_with_cheap(emulator.url, "{model: x/y, upstream: nowhere}"),
    ):
        path.write_text(broken)
        response = await http.post("/admin/reload", headers=ADMIN)
        assert response.status == 422
        error = (await response.json())["error"]
        assert str(path) in error["message"] and error["code"] == "invalid_config"
        await load.answers(8)  # the load keeps being answered after the refused edit
        assert await served_by(proxy) == "mistralai/mistral-7b-instruct"
    status = await (await http.get("/admin/status", headers=ADMIN)).json()
    assert status["reload"]["last_result"] == "failure" and status["reload"]["failures"] == 3
    assert any("chep" in line for line in caplog.text.splitlines() if "refused" in line or "chep" in line)

    path.write_text(config_with_cheap(emulator.url, "meta-llama/llama-3.1-8b-instruct"))
    response = await http.post("/admin/reload", headers=ADMIN)
    assert response.status == 200
    assert await served_by(proxy) == "meta-llama/llama-3.1-8b-instruct"
    await wait_for(  # the load goes on under the new config, and has been more than 50 answers all told
        lambda: (load.models.count("meta-llama/llama-3.1-8b-instruct") >= 16 and len(load.models) > 50) or load.failures
    )
    await load.stop()
    assert load.failures == []
    assert len(load.models) > 50
    # Before the valid edit every answer came from the old chain; after it, from the new one.
    first_new = load.models.index("meta-llama/llama-3.1-8b-instruct")
    assert set(load.models[:first_new]) == {"mistralai/mistral-7b-instruct"}
    assert set(load.models[first_new:]) == {"meta-llama/llama-3.1-8b-instruct"}

    metrics = await (await http.get("/metrics")).text()
    assert 'orproxy_config_reloads_total{result="failure"} 3.0' in metrics
    assert 'orproxy_config_reloads_total{result="success"} 1.0' in metrics
    assert "orproxy_config_last_success_timestamp_seconds" in metrics


@pytest.mark.realtime  # watchfiles notices the edit on its own thread and debounces it on the real clock
async def test_a_file_edit_is_picked_up_by_the_watcher(make_proxy, emulator, tmp_path):
    path = tmp_path / "config.yaml"
    proxy = await make_proxy(
        config_text=config_with_cheap(emulator.url, "mistralai/mistral-7b-instruct", watch=True),
        env=ENV,
        config_path=path,
    )
    edit = config_with_cheap(emulator.url, "google/gemini-2.5-flash", watch=True)
    status = proxy.app[RELOADER].status
    polls = 0

    def reloaded_from_the_file() -> bool:
        nonlocal polls
        if polls % 25 == 0:  # written again now and then: the watcher may not have been watching yet
            path.write_text(edit)
        polls += 1
        return status.successes > 0

    await wait_for(reloaded_from_the_file, timeout=10, interval=0.02)
    assert await served_by(proxy) == "google/gemini-2.5-flash"
    assert proxy.app[RELOADER].status.last_trigger == "file change"


@pytest.mark.realtime  # the emulator's real pauses between chunks keep the stream in flight across the reload
async def test_a_stream_in_flight_finishes_on_the_config_it_started_with(make_proxy, emulator, tmp_path):
    from proxy.emulator import Fault

    path = tmp_path / "config.yaml"
    proxy = await make_proxy(
        config_text=config_with_cheap(emulator.url, "mistralai/mistral-7b-instruct"), env=ENV, config_path=path
    )
    emulator.state.faults.set("mistralai/mistral-7b-instruct", Fault(chunk_delay_s=0.1))
    stream = await proxy.client().chat.completions.create(
        model="cheap", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [await stream.__anext__()]
    # A valid edit that also changes the upstream's settings: the old client must stay open for this stream.
    path.write_text(
        config_with_cheap(emulator.url, "meta-llama/llama-3.1-8b-instruct").replace("timeout_s: 2", "timeout_s: 3")
    )
    status = await proxy.app[RELOADER].reload("test")
    assert status.last_result == "success"
    async for chunk in stream:
        chunks.append(chunk)
    assert {c.model for c in chunks} == {"mistralai/mistral-7b-instruct"}
    assert any(c.usage for c in chunks)
    assert await served_by(proxy) == "meta-llama/llama-3.1-8b-instruct"


async def test_admin_routes_need_the_admin_key(make_proxy, emulator, tmp_path, aiohttp_client):
    proxy = await make_proxy(
        config_text=config_with_cheap(emulator.url, "mistralai/mistral-7b-instruct"),
        env=ENV,
        config_path=tmp_path / "c.yaml",
    )
    http = await aiohttp_client(proxy.server)
    for route in ("/admin/status", "/admin/spend"):
        response = await http.get(route, headers={"Authorization": "Bearer wrong"})
        assert response.status == 401
    assert (await http.post("/admin/reload")).status == 401


def test_published_schema_matches_the_config_model_and_accepts_the_example():
    import jsonschema

    from proxy.config import config_json_schema
    from tests.support.gateway import ROOT

    published = json.loads((ROOT / "config.schema.json").read_text())
    assert published == json.loads(json.dumps(config_json_schema())), "run: orproxy schema > config.schema.json"
    validator = jsonschema.Draft202012Validator(published)
    validator.validate(yaml.safe_load((ROOT / "config.yaml").read_text()))
    broken = yaml.safe_load((ROOT / "config.yaml").read_text())
    broken["retry"]["attempts_per_model"] = 0
    broken["models"]["cheap"]["chian"] = []
    messages = sorted(e.message for e in validator.iter_errors(broken))
    assert any("minimum of 1" in m for m in messages)
    assert any("chian" in m for m in messages)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            "models:\n  cheap: {chain: [a/b]}\n  auto: {route: [{to: cheep}]}\n",
            "models.auto.route[0].to: routes to 'cheep'",
        ),
        ("models:\n  cheap: {chain: [a/b]}\n  auto: {route: [{to: auto}]}\n", "routing loop: auto -> auto"),
        (
            "models: {cheap: {chain: [a/b]}}\n"
            "budget: {downgrade: [{at: 0.8, map: {quality: cheap}}, {at: 0.4, map: {x: y}}]}\n",
            "budget.downgrade: steps must be listed with strictly increasing `at`",
        ),
    ],
)
def test_check_command_reports_broken_configs(tmp_path, edit, expected):
    import subprocess
    import sys

    path = tmp_path / "broken.yaml"
    path.write_text("upstreams: {openrouter: {base_url: https://openrouter.ai/api/v1}}\n" + edit)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert expected in result.stderr, result.stderr
