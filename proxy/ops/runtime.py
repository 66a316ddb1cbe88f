"""Everything derived from one config, built once and swapped as a whole.

A request acquires `RuntimeRef.current` once and keeps that snapshot to its
end, so a config swap never changes a request halfway through.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from proxy.config import Config
from proxy.core.breakers import CircuitBreakers
from proxy.core.keys import KeyRing
from proxy.core.ratelimits import RateLimits
from proxy.core.routing import Block, Router
from proxy.upstream.client import UpstreamClient
from proxy.upstream.executor import Executor

log = logging.getLogger("orproxy")


@dataclass(slots=True, eq=False)
class Runtime:
    config: Config
    router: Router
    executor: Executor
    clients: Mapping[str, UpstreamClient]
    keyless: dict[str, Block]  # upstream name -> why it cannot be called (no key)
    models_body: bytes  # GET /v1/models, rendered once
    keys: KeyRing
    users: int = 0  # requests in flight on this snapshot
    retiring: tuple[UpstreamClient, ...] | None = None  # set when swapped out: the clients only it used

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


class RuntimeRef:
    """The current runtime, swapped whole on reload. Requests hold the snapshot they started on
    (acquire/release); a swapped-out runtime closes the clients no newer one reuses once its last
    request is done, so a reload never cuts a stream off."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
        self._closing: set[asyncio.Task[None]] = set()

    def acquire(self) -> Runtime:
        runtime = self.current
        runtime.users += 1
        return runtime

    def release(self, runtime: Runtime) -> None:
        runtime.users -= 1
        if runtime.users == 0 and runtime.retiring is not None:
            self._close(runtime)

    def swap(self, new: Runtime) -> Runtime:
        old = self.current
        kept = {id(client) for client in new.clients.values()}
        old.retiring = tuple(c for c in old.clients.values() if id(c) not in kept)
        self.current = new
        if old.users == 0:
            self._close(old)
        return old

    def _close(self, runtime: Runtime) -> None:
        clients, runtime.retiring = runtime.retiring or (), ()
        if clients:
            task = asyncio.get_running_loop().create_task(_close_all(clients))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self.current.close()


async def _close_all(clients: tuple[UpstreamClient, ...]) -> None:
    for client in clients:
        await client.close()


def build_runtime(
    config: Config,
    env: Mapping[str, str],
    breakers: CircuitBreakers,
    ratelimits: RateLimits,
    previous: Runtime | None = None,
) -> Runtime:
    """Must run inside the event loop: each new upstream client opens its connection pool.
    Clients of `previous` whose upstream settings and key are unchanged are reused as they are."""
    clients: dict[str, UpstreamClient] = {}
    keyless: dict[str, Block] = {}
    for name, upstream in config.upstreams.items():
        key = env.get(upstream.api_key_env, "").strip() or None
        reusable = previous.clients.get(name) if previous else None
        if (
            reusable is not None
            and previous
            and previous.config.upstreams.get(name) == upstream
            and reusable.api_key == key
            and previous.config.rate_limits == config.rate_limits
        ):
            clients[name] = reusable
        else:
            observe = functools.partial(ratelimits.observe_response, warn_below=config.rate_limits.warn_below)
            clients[name] = UpstreamClient(name, upstream, key, observe=observe)
        if key is None:
            keyless[name] = Block("no_api_key", None, f"set {upstream.api_key_env}")
    return Runtime(
        config,
        Router(config),
        Executor(clients, config.retry, breakers),
        clients,
        keyless,
        render_models(config),
        KeyRing(config.keys, env),
    )


def warn_missing_keys(runtime: Runtime) -> None:
    """Said once at start-up: the proxy runs, but these upstreams cannot be called."""
    for name in runtime.keyless:
        env_name = runtime.config.upstreams[name].api_key_env
        log.warning(
            "upstream %r has no API key: the environment variable %s is not set; "
            "requests routed to it will be skipped (or answered 401 when nothing else can serve them)",
            name,
            env_name,
        )


def render_models(config: Config) -> bytes:
    """OpenAI's list format: the virtual models first, then the real models their chains use."""
    created = int(time.time())
    data: list[dict] = []
    real: dict[str, str] = {}
    for name, model in config.models.items():
        entry = {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "openrouter-proxy",
            "virtual": True,
            "description": model.description,
        }
        if model.chain is not None:
            entry["chain"] = [m.model if m.upstream == "openrouter" else f"{m.model}@{m.upstream}" for m in model.chain]
            for member in model.chain:
                real.setdefault(member.model, member.upstream)
        else:
            entry["route"] = [
                {"when": rule.when.model_dump(exclude_none=True, mode="json"), "to": rule.to}
                for rule in model.route or ()
            ]
        data.append(entry)
    for slug, upstream in real.items():
        data.append(
            {
                "id": slug,
                "object": "model",
                "created": created,
                "owned_by": slug.split("/", 1)[0] if "/" in slug else upstream,
                "virtual": False,
                "upstream": upstream,
            }
        )
    return orjson.dumps({"object": "list", "data": data})
