"""Everything derived from one config, built once and swapped as a whole.

A request reads `RuntimeRef.current` once and keeps that snapshot to its end,
so a later config swap never changes a request halfway through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from .config import Config
from .executor import Executor
from .health import CircuitBreakers
from .keys import KeyRing
from .routing import Block, Router
from .upstream import UpstreamClient

log = logging.getLogger("orproxy")


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    router: Router
    executor: Executor
    clients: Mapping[str, UpstreamClient]
    keyless: dict[str, Block]          # upstream name -> why it cannot be called (no key)
    models_body: bytes                 # GET /v1/models, rendered once
    keys: KeyRing

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


class RuntimeRef:
    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime


def build_runtime(config: Config, env: Mapping[str, str], breakers: CircuitBreakers) -> Runtime:
    """Must run inside the event loop: each upstream client opens its connection pool."""
    clients: dict[str, UpstreamClient] = {}
    keyless: dict[str, Block] = {}
    for name, upstream in config.upstreams.items():
        key = env.get(upstream.api_key_env, "").strip() or None
        clients[name] = UpstreamClient(name, upstream, key)
        if key is None:
            keyless[name] = Block("no_api_key", None, f"set {upstream.api_key_env}")
    return Runtime(config, Router(config), Executor(clients, config.retry, breakers), clients, keyless,
                   render_models(config), KeyRing(config.keys, env))


def warn_missing_keys(runtime: Runtime) -> None:
    """Said once at start-up: the proxy runs, but these upstreams cannot be called."""
    for name in runtime.keyless:
        env_name = runtime.config.upstreams[name].api_key_env
        log.warning("upstream %r has no API key: the environment variable %s is not set; "
                    "requests routed to it will be skipped (or answered 401 when nothing else can serve them)",
                    name, env_name)


def render_models(config: Config) -> bytes:
    """OpenAI's list format: the virtual models first, then the real models their chains use."""
    created = int(time.time())
    data: list[dict] = []
    real: dict[str, str] = {}
    for name, model in config.models.items():
        entry = {"id": name, "object": "model", "created": created, "owned_by": "openrouter-proxy",
                 "virtual": True, "description": model.description}
        if model.chain is not None:
            entry["chain"] = [m.model if m.upstream == "openrouter" else f"{m.model}@{m.upstream}" for m in model.chain]
            for member in model.chain:
                real.setdefault(member.model, member.upstream)
        else:
            entry["route"] = [{"when": rule.when.model_dump(exclude_none=True, mode="json"), "to": rule.to}
                              for rule in model.route or ()]
        data.append(entry)
    for slug, upstream in real.items():
        data.append({"id": slug, "object": "model", "created": created,
                     "owned_by": slug.split("/", 1)[0] if "/" in slug else upstream, "virtual": False,
                     "upstream": upstream})
    return orjson.dumps({"object": "list", "data": data})
