"""One config snapshot: everything derived from a config, built in one place and swapped whole.

A request acquires `RuntimeRef.current` once and keeps that snapshot to its
end, so a config swap never changes a request halfway through. The snapshot
holds the pure `Policy` (router, prices, budget, keys, labels) and the IO built
for that config (upstream clients, the executor, the cache view); the
long-lived state it reads (`SharedState`) is passed in, never copied or patched.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.cache.policy import CachePolicy
from proxy.cache.response_cache import ResponseCache
from proxy.config import Config
from proxy.core.apis import APIS, Api
from proxy.core.models import model_index, render_models
from proxy.core.policy import Policy
from proxy.core.pricing import Catalogue
from proxy.core.routing import Block
from proxy.state.backend import SharedState
from proxy.upstream.client import UpstreamClient
from proxy.upstream.executor import Executor

log = logging.getLogger("orproxy")


@dataclass(slots=True, eq=False)
class Runtime:
    policy: Policy
    executor: Executor
    clients: Mapping[str, UpstreamClient]
    keyless: dict[str, Block]  # upstream name -> why it cannot be called (no key)
    models_body: bytes  # GET /v1/models, rendered once
    admin_key: str | None  # the value of admin.key_env; None: admin routes are off
    cache: ResponseCache | None  # None: the cache is off in this config
    catalogue_source: str  # where prices come from, for status and logs
    metrics_key: str | None = None  # the value of metrics.key_env: a scraper's key for GET /metrics
    models_by_key: Mapping[str, bytes] = field(default_factory=dict)  # GET /v1/models for keys with a model list
    models_index: Mapping[str, bytes] = field(default_factory=dict)  # GET /v1/models/{id}, by id
    # Per API (by name): the upstreams a request may not go to, keyless or not speaking that API.
    static_blocks: Mapping[str, Mapping[str, Block]] = field(default_factory=dict)
    users: int = 0  # requests in flight on this snapshot
    retiring: tuple[UpstreamClient, ...] | None = None  # set when swapped out: the clients only it used

    @property
    def config(self) -> Config:
        return self.policy.config

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


class RuntimeRef:
    """The current runtime, swapped whole on reload. Requests hold the snapshot they started on
    (acquire/release); a swapped-out runtime closes the clients no newer one reuses once its last
    request is done, so a reload never cuts a stream off."""

    def __init__(self) -> None:
        self._current: Runtime | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def start(self, runtime: Runtime) -> None:
        """The first snapshot, built once the event loop runs (upstream clients need it)."""
        self._current = runtime

    def peek(self) -> Runtime | None:
        """The current snapshot, or None before start-up (a Prometheus registry asks early)."""
        return self._current

    @property
    def current(self) -> Runtime:
        if self._current is None:
            raise RuntimeError("the proxy has not started: no config snapshot yet")
        return self._current

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
        self._current = new
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
        if self._current is not None:
            await self._current.close()


async def _close_all(clients: tuple[UpstreamClient, ...]) -> None:
    for client in clients:
        await client.close()


def cache_policy(config: Config) -> CachePolicy:
    cfg = config.cache
    return CachePolicy(cfg.enabled, cfg.ttl_s, cfg.max_entries, cfg.max_entry_bytes)


def build_runtime(
    config: Config,
    env: Mapping[str, str],
    catalogue: Catalogue,
    state: SharedState,
    *,
    cache: ResponseCache | None = None,
    catalogue_source: str = "",
    previous: Runtime | None = None,
) -> Runtime:
    """Must run inside the event loop: each new upstream client opens its connection pool.
    Clients of `previous` whose upstream settings, key and observer settings are unchanged are
    reused as they are. `cache` is the cache view for this config (None when it is off)."""
    clients: dict[str, UpstreamClient] = {}
    keyless: dict[str, Block] = {}
    for name, upstream in config.upstreams.items():
        key = env.get(upstream.api_key_env, "").strip() or None
        reusable = previous.clients.get(name) if previous else None
        if (
            reusable is not None
            and previous is not None
            and previous.config.upstreams.get(name) == upstream
            and reusable.api_key == key
            and previous.config.rate_limits == config.rate_limits
            and previous.config.retry.max_block_s == config.retry.max_block_s
        ):
            clients[name] = reusable
        else:
            observe = functools.partial(
                state.ratelimits.observe_response,
                warn_below=config.rate_limits.warn_below,
                max_block_s=config.retry.max_block_s,
            )
            clients[name] = UpstreamClient(name, upstream, key, observe=observe)
        if key is None:
            keyless[name] = Block("no_api_key", None, f"set {upstream.api_key_env}")
    admin_key = _secret(env, config.admin.key_env)
    created = int(time.time())
    return Runtime(
        policy=Policy.build(config, catalogue, env, state.counters),
        executor=Executor(clients, config.retry, state.breakers, wall=state.clock),
        clients=clients,
        keyless=keyless,
        models_body=render_models(config, created),
        admin_key=admin_key,
        cache=cache if config.cache.enabled else None,
        catalogue_source=catalogue_source,
        metrics_key=_secret(env, config.metrics.key_env),
        models_by_key={
            key.name: render_models(config, created, frozenset(key.models)) for key in config.keys if key.models
        },
        models_index=model_index(config, created),
        static_blocks={api.name: _static_blocks(api, clients, keyless) for api in APIS},
    )


def _static_blocks(api: Api, clients: Mapping[str, UpstreamClient], keyless: Mapping[str, Block]) -> dict[str, Block]:
    blocks = dict(keyless)
    for name, client in clients.items():
        if client.kind not in api.kinds:
            why = f"a {client.kind} upstream does not serve {api.name}"
            blocks.setdefault(name, Block("unsupported_api", None, why))
    return blocks


def _secret(env: Mapping[str, str], name: str | None) -> str | None:
    return (env.get(name, "").strip() or None) if name else None


def snapshot_warnings(runtime: Runtime) -> list[str]:
    """What the operator should know about a snapshot that works: missing upstream or admin keys.
    Logged at start-up, and reported by every reload."""
    config = runtime.config
    warnings = [
        f"upstream {name!r} has no API key: the environment variable {config.upstreams[name].api_key_env} is not "
        "set; requests routed to it will be skipped (or answered 401 when nothing else can serve them)"
        for name in runtime.keyless
    ]
    if config.admin.key_env and runtime.admin_key is None:
        warnings.append(f"admin routes are off: the environment variable {config.admin.key_env} is not set")
    if config.keys and config.metrics.key_env and runtime.metrics_key is None:
        warnings.append(f"metrics.key_env names {config.metrics.key_env}, which is not set")
    if config.keys and runtime.admin_key is None and runtime.metrics_key is None:
        warnings.append(
            "GET /metrics is closed: client keys are configured, so it needs the admin key or metrics.key_env, "
            "and neither is set"
        )
    return warnings
