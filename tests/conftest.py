"""Shared fixtures: a real emulator, a real proxy in front of it, the official SDK as client."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai import AsyncOpenAI

from proxy.http.app import create_app
from proxy.config import Config, parse_config
from proxy.emulator import EMULATOR_STATE, create_emulator_app

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT.parent / "shared" / "spec" / "openai-chat-schemas.json"
UPSTREAM_KEY = "sk-or-test-upstream-secret-0123456789"


class Schemas:
    """OpenAI's own JSON schemas; validation errors name the failing field."""

    def __init__(self, path: Path) -> None:
        self._defs = json.loads(path.read_text())["$defs"]
        self._validators: dict[str, jsonschema.protocols.Validator] = {}

    def validate(self, name: str, instance: Any) -> None:
        validator = self._validators.get(name)
        if validator is None:
            schema = {"$defs": self._defs, "$ref": f"#/$defs/{name}"}
            validator = self._validators[name] = jsonschema.Draft202012Validator(schema)
        validator.validate(instance)


@pytest.fixture(scope="session")
def schemas() -> Schemas:
    if not SPEC.exists():
        pytest.fail(f"OpenAI schemas not found at {SPEC}; the tests need ../shared/spec beside the repo")
    return Schemas(SPEC)


@dataclass
class Emulator:
    server: TestServer
    app: web.Application

    @property
    def state(self):
        return self.app[EMULATOR_STATE]

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def emulator(aiohttp_server) -> Emulator:
    app = create_emulator_app(api_key=UPSTREAM_KEY)
    server = await aiohttp_server(app)
    return Emulator(server, app)


def proxy_config_text(emulator_url: str, body: str = "", retry: str | None = None) -> str:
    """A config whose upstreams are the emulator: OpenRouter's paths and an OpenAI-style second upstream."""
    retry = retry or "retry: {attempts_per_model: 2, backoff_s: 0.01, max_retry_after_s: 2, " \
                     "cooldown: {failures: 3, window_s: 60, cooldown_s: 30}}"
    models = body or """
models:
  cheap:
    chain:
      - mistralai/mistral-7b-instruct
      - meta-llama/llama-3.1-8b-instruct
      - {model: gpt-4o-mini, upstream: openai}
  balanced: {chain: [google/gemini-2.5-flash, deepseek/deepseek-v3.2, anthropic/claude-3-haiku]}
  quality:  {chain: [anthropic/claude-sonnet-4.5, openai/gpt-4o-mini]}
  code:     {chain: [x-ai/grok-code-fast-1, deepseek/deepseek-v3.2]}
  auto:
    route:
      - {when: {task: code_generation}, to: code}
      - {when: {task: complex_analysis}, to: quality}
      - {when: {prompt_tokens_over: 4000}, to: balanced}
      - {to: cheap}
"""
    return f"""
upstreams:
  openrouter:
    base_url: {emulator_url}/api/v1
    kind: openrouter
    api_key_env: TEST_OPENROUTER_KEY
    timeout_s: 2
    headers: {{HTTP-Referer: https://example.com, X-Title: Example App}}
  openai:
    base_url: {emulator_url}/v1
    api_key_env: TEST_OPENAI_KEY
    timeout_s: 2
{models}
{retry}
logging: {{level: INFO, access_log: true}}
"""


@dataclass
class Proxy:
    server: TestServer
    app: web.Application
    config: Config

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def client(self, **kwargs: Any) -> AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("api_key", "client-key-unused")
        return AsyncOpenAI(base_url=f"{self.url}/v1", **kwargs)


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(aiohttp_server, emulator, tmp_path) -> ProxyFactory:
    async def make(body: str = "", *, retry: str | None = None, env: dict[str, str] | None = None,
                   config_text: str | None = None, extra: str = "", ledger_path: Path | None = None,
                   clock: Callable[[], float] | None = None, config_path: Path | None = None) -> Proxy:
        """A proxy in front of the emulator; with `config_path`, the text is written there and
        the proxy reloads from it (SIGHUP, POST /admin/reload, file watch)."""
        text = config_text or proxy_config_text(emulator.url, body, retry) + extra
        if config_path is not None:
            config_path.write_text(text)
        config = parse_config(text, "test-config.yaml")
        env = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY} if env is None else env
        app = create_app(config, env=env, ledger_path=ledger_path or tmp_path / "ledger.sqlite3",
                         cache_path=tmp_path / "cache.sqlite3", config_path=config_path,
                         **({"clock": clock} if clock else {}))
        server = await aiohttp_server(app)  # TestServer cancels handlers on disconnect, like `orproxy serve`
        return Proxy(server, app, config)

    return make


@pytest.fixture
async def proxy(make_proxy) -> Proxy:
    return await make_proxy()
