"""A newcomer's first hour, as they would live it: the README's demo commands run as written against
a real `orproxy serve --demo` process, and the commands and messages they meet on the way."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from proxy.cli.main import example_config_text
from proxy.config import Upstream, load_config, parse_config
from proxy.core.budget import Refusal
from tests.support.gateway import ROOT, proxy_config_text
from tests.support.procs import free_port
from tests.support.timing import wait_for

README = ROOT / "README.md"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_PROXY_KEY", "ADMIN_KEY"))}
ORPROXY = f'orproxy() {{ {shlex.quote(sys.executable)} -m proxy "$@"; }}\n'  # the installed command


def orproxy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**CLEAN_ENV, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )


def demo_blocks() -> list[str]:
    """The sh blocks of the README's demo section, in order."""
    text = README.read_text()
    section = text[text.index("<!-- newcomer-demo") : text.index("<!-- /newcomer-demo -->")]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def commands_with_expectations(block: str) -> list[tuple[str, list[str]]]:
    """Each command (with its continuation lines) and the `# ` lines after it: what it prints."""
    steps: list[tuple[str, list[str]]] = []
    lines = block.splitlines()
    index = 0
    while index < len(lines):
        command = lines[index]
        while command.endswith("\\"):
            index += 1
            command = command[:-1] + lines[index]
        index += 1
        expected = []
        while index < len(lines) and lines[index].startswith("# "):
            expected.append(lines[index][2:])
            index += 1
        steps.append((command, expected))
    return steps


def as_run_here(command: str, port: int) -> str:
    command = command.replace(".venv/bin/orproxy", "orproxy").replace("localhost:8080", f"localhost:{port}")
    return re.sub(r"(orproxy serve [^#\n]*?--demo)", rf"\1 --port {port}", command)


def newcomer_checkout(folder: Path) -> Path:
    """The shipped config.yaml, with `keys:` and its selfbot line uncommented, as the README says."""
    text = (ROOT / "config.yaml").read_text()
    text = re.sub(r"^# keys:", "keys:", text, flags=re.M)
    text = re.sub(r"^#(   - \{name: selfbot)", r"\1", text, flags=re.M)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(text)
    return folder


@pytest.mark.slow
@pytest.mark.realtime  # a real server process started and stopped with signals
async def test_the_readme_demo_works_as_written(tmp_path):
    checkout = newcomer_checkout(tmp_path / "checkout")
    start, tries = demo_blocks()
    port = free_port()
    exports = "".join(line + "\n" for line in start.splitlines() if line.startswith("export "))
    log = tmp_path / "serve.log"
    env = {**CLEAN_ENV, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        # A session of its own: `bash -c` runs orproxy as its child, and stopping the shell alone would
        # leave the server running; the whole group is signalled below.
        server = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            ORPROXY + as_run_here(start, port),
            cwd=checkout,
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:

        def up() -> bool:
            if server.returncode is not None:
                raise AssertionError(log.read_text())
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        await wait_for(up, timeout=30, interval=0.1)
        for command, expected in commands_with_expectations(tries):
            result = subprocess.run(
                ["bash", "-c", ORPROXY + exports + as_run_here(command, port)],
                capture_output=True,
                text=True,
                cwd=checkout,
                env=env,
                timeout=60,
            )
            printed = result.stdout.splitlines()
            for line in expected:
                assert line in printed, f"{command}\nexpected {line!r} in:\n{result.stdout}{result.stderr}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        await server.wait()
    started = log.read_text()
    assert f"data: ledger {checkout / 'data' / 'demo-ledger.sqlite3'}" in started
    assert "upstream 'openrouter': " in started and "kind openrouter" in started
    assert "Traceback" not in started

    # The next morning, from another folder: the real ledger is empty, and report says where the demo's is.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = orproxy("report", "--config", str(checkout / "config.yaml"), cwd=elsewhere)
    assert result.returncode == 1
    assert "only the demo has run here" in result.stderr and "orproxy report --demo" in result.stderr
    assert str(checkout / "data" / "demo-ledger.sqlite3") in result.stderr


@pytest.mark.slow
@pytest.mark.realtime  # a real server process
async def test_serve_demo_outside_a_checkout_uses_the_packaged_example(tmp_path):
    port = free_port()
    env = {**CLEAN_ENV, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(port), cwd=tmp_path, env=env,
            stdout=out, stderr=out,
        )  # fmt: skip
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

        async def answered() -> str:
            if server.returncode is not None:
                raise AssertionError(log.read_text())
            try:
                reply = await client.chat.completions.create(
                    model="cheap", messages=[{"role": "user", "content": "hi"}]
                )
            except openai.APIConnectionError:
                return ""
            return reply.model

        assert await wait_for(answered, timeout=30, interval=0.1) == "mistralai/mistral-7b-instruct"
    finally:
        server.terminate()
        await server.wait()
    assert "packaged example" in log.read_text()
    assert (tmp_path / "data" / "demo-ledger.sqlite3").exists()


def test_init_writes_the_example_config(tmp_path):
    assert example_config_text() == (ROOT / "config.yaml").read_text()  # the package ships the checkout's file
    result = orproxy("init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "config.yaml").read_text() == example_config_text()
    assert orproxy("check", "config.yaml", cwd=tmp_path).returncode == 0
    again = orproxy("init", cwd=tmp_path)
    assert again.returncode == 1 and "exists already; pass --force" in again.stderr
    assert orproxy("init", "sub/dir/my.yaml", cwd=tmp_path).returncode == 0
    assert (tmp_path / "sub" / "dir" / "my.yaml").exists()


def test_a_missing_config_is_not_called_invalid(tmp_path):
    for command in (["serve", "--config", "nope.yaml"], ["report", "--config", "nope.yaml"], ["check", "nope.yaml"]):
        result = orproxy(*command, cwd=tmp_path)
        assert result.returncode == 1
        assert "there is no config file at nope.yaml" in result.stderr and "orproxy init nope.yaml" in result.stderr
        assert "invalid" not in result.stderr


def test_relative_data_paths_follow_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "config.yaml").write_text(
        proxy_config_text("http://127.0.0.1:9")
        + "ledger: {path: data/l.sqlite3}\ncache: {path: ../c.sqlite3}\npricing: {catalogue: m.json}\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/config.yaml")
    assert config.ledger.path == str(folder / "data" / "l.sqlite3")
    assert config.cache.path == str(tmp_path / "c.sqlite3")
    assert config.pricing.catalogue == str(folder / "m.json")
    assert parse_config(proxy_config_text("http://x")).ledger.path == "data/ledger.sqlite3"  # text alone: as written


@pytest.mark.parametrize(
    "name, url, kind, expected",
    [
        ("openrouter", "http://127.0.0.1:9000/api/v1", None, ("openrouter", "inferred from its name")),
        ("mirror", "https://openrouter.example.net/api/v1", None, ("openrouter", "inferred from its URL")),
        (
            "mirror",
            "https://llm.internal/v1",
            None,
            ("openai", "inferred: neither its name nor its URL says openrouter"),
        ),
        ("openrouter", "https://api.openai.com/v1", "openai", ("openai", "set in the config")),
    ],
)
def test_the_upstream_kind(name, url, kind, expected):
    assert Upstream(base_url=url, kind=kind).inferred_kind(name) == expected


async def test_an_upstream_named_openrouter_keeps_openrouter_fields(make_proxy, emulator):
    text = proxy_config_text(emulator.url).replace("    kind: openrouter\n", "")  # a local stand-in, no kind
    proxy = await make_proxy(config_text=text)
    await proxy.client().chat.completions.create(
        model="cheap", messages=[{"role": "user", "content": "hi"}], extra_body={"provider": {"order": ["Mistral"]}}
    )
    assert emulator.state.requests[-1].body["provider"] == {"order": ["Mistral"]}


async def test_an_agent_loop_through_the_demo_ends(proxy, schemas):
    """The emulator calls the tool, then answers in words once it has the tool's result."""
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages: list = [{"role": "user", "content": "What time is it?"}]
    client = proxy.client()
    calls = 0
    for _ in range(5):
        reply = await client.chat.completions.create(model="cheap", messages=messages, tools=tools)
        schemas.validate("CreateChatCompletionResponse", reply.model_dump(exclude_unset=True))
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            break
        assert choice.finish_reason == "tool_calls"
        calls += 1
        call = choice.message.tool_calls[0]
        messages += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "It is 10:42."},
        ]
    assert calls == 1 and choice.message.content and "10:42" in choice.message.content


def test_orproxy_emulator_has_the_module_options_and_one_line_on_a_taken_port(tmp_path):
    help_text = orproxy("emulator", "--help", cwd=tmp_path).stdout
    for option in ("--host", "--port", "--catalogue", "--api-key", "--access-log"):
        assert option in help_text
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = orproxy("emulator", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"emulator: cannot listen on 127.0.0.1:{port}: the port is already in use; pick another with --port"
    )


def test_a_taken_port_suggests_another(tmp_path):
    (tmp_path / "config.yaml").write_text(proxy_config_text("http://127.0.0.1:9") + "watch_config: false\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = orproxy("serve", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("the port is already in use; stop what holds it, or pick another with --port")
    )


def test_explain_prints_dollars_without_float_noise(tmp_path):
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    result = orproxy("explain", "--model", "auto", "--task", "code_generation", "--max-tokens", "1000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    amounts = [decision["estimated_worst_case_usd"], *(m["worst_case_usd"] for m in decision["chain"])]
    assert all(len(repr(a).split(".")[-1].split("e")[0]) <= 9 for a in amounts), amounts


@pytest.mark.parametrize(
    "spent, reserved, limit, says",
    [
        (0.000736, 0.0, 0.001, "the daily budget has $0.000264 left, less than this request's worst case"),
        (0.0008, 0.0002, 0.001, "the daily budget is exhausted"),
        (1.5, 0.0, 1.0, "the daily budget is exhausted"),
    ],
)
def test_a_budget_refusal_says_what_is_true(spent, reserved, limit, says):
    refusal = Refusal("", "daily", spent, reserved, limit, resets_at=3600.0)
    message = refusal.message(0.0012, now=0.0)
    assert message.startswith(f"Request refused: {says}.")
