"""What the tests share besides fixtures: paths, the test key, OpenAI's schemas, the config
every proxy fixture starts from, and handles on a running emulator and proxy."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

from proxy.config import Config
from proxy.core.budget import SpendBook
from proxy.emulator import EMULATOR_STATE
from proxy.http.appkeys import ACCOUNTANT, RUNTIME
from proxy.http.serving import ProxyRunner
from proxy.money.ledger_api import LedgerStore

ROOT = Path(__file__).resolve().parent.parent.parent
SPEC = ROOT.parent / "shared" / "spec" / "openai-chat-schemas.json"
API_SPEC = ROOT / "tests" / "schemas" / "openai-api-schemas.json"  # extracted here: tests/schemas/extract_openai.py
UPSTREAM_KEY = "sk-or-test-upstream-secret-0123456789"
# One TLS context for every SDK client the tests build. The proxy is plain HTTP, yet each client
# would load the CA bundle into a context of its own: about 40 ms a client, seconds a run.
_TLS = ssl.create_default_context()


class ProxyTestServer(TestServer):
    """aiohttp's TestServer on the runner `orproxy serve` uses (connection limits, protocol errors
    in OpenAI's JSON), cancelling handlers on disconnect like `orproxy serve`."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return ProxyRunner(self.app, **kwargs)


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


def proxy_config_text(emulator_url: str, body: str = "", retry: str | None = None) -> str:
    """A config whose upstreams are the emulator: OpenRouter's paths and an OpenAI-style second upstream."""
    retry = (
        retry
        or "retry: {attempts_per_model: 2, backoff_s: 0.01, max_retry_after_s: 2, "
        "cooldown: {failures: 3, window_s: 60, cooldown_s: 30}}"
    )
    models = (
        body
        or """
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
    )
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

    @property
    def book(self) -> SpendBook:
        """The budget of the config snapshot now serving."""
        return self.app[RUNTIME].current.policy.book

    @property
    def ledger(self) -> LedgerStore:
        ledger = self.app[ACCOUNTANT].ledger
        assert ledger is not None, "the ledger is not open"
        return ledger

    def client(self, **kwargs: Any) -> AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("api_key", "client-key-unused")
        kwargs.setdefault("http_client", DefaultAsyncHttpxClient(verify=_TLS))  # the SDK's own defaults
        return AsyncOpenAI(base_url=f"{self.url}/v1", **kwargs)


ProxyFactory = Callable[..., Awaitable[Proxy]]
