"""`orproxy serve --demo`: the whole path against the built-in OpenRouter emulator.

No key and no network: every upstream in the config is pointed at an emulator
started in-process, and the first model of `quality` fails with a 503, so the
first request shows a fallback in its `x-proxy-route` header and in the log.
The rest of the environment is kept (client keys, the admin key): only the
upstream key variables are set to the emulator's key. Emulated spend goes to a
ledger of its own beside the real one (`orproxy report --demo` reads it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web

from proxy.config import Config
from proxy.emulator import EMULATOR_STATE, Fault, create_emulator_app
from proxy.money.ledger_api import on_file

log = logging.getLogger("orproxy.demo")
DEMO_KEY = "demo-key-not-secret"


async def start_demo(config: Config, env: Mapping[str, str]) -> tuple[Config, dict[str, str]]:
    """Start the emulator on a free local port; return the config pointed at it, and `env` with the
    upstream keys set to the emulator's (everything else in it kept)."""
    app = create_emulator_app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    upstreams = {}
    demo_env = dict(env)
    for name, upstream in config.upstreams.items():
        kind = upstream.kind_for(name)
        prefix = "/api/v1" if kind == "openrouter" else "/v1"
        upstreams[name] = upstream.model_copy(update={"base_url": f"http://127.0.0.1:{port}{prefix}", "kind": kind})
        demo_env[upstream.api_key_env] = DEMO_KEY
    failing = _first_model_of(config, "quality")
    if failing:
        app[EMULATOR_STATE].faults.set(failing, Fault(status=503, message="demo: provider overloaded"))
    log.warning(
        "DEMO MODE: upstreams point at the built-in emulator on 127.0.0.1:%d; %s",
        port,
        f"'{failing}' always answers 503, so `quality` falls back" if failing else "no fault injected",
    )
    # Emulated spend must never count against the real budget: the demo keeps its own ledger and cache.
    # A PostgreSQL ledger is real spend too: the demo's is always a SQLite file of its own.
    config = on_file(config, demo_path(config.ledger.path))
    cache = config.cache.model_copy(update={"path": demo_path(config.cache.path)})
    return config.model_copy(update={"upstreams": upstreams, "cache": cache}), demo_env


def demo_path(path: str) -> str:
    """Where the demo keeps what it writes instead of `path`: beside it, prefixed `demo-`."""
    parent, _, name = path.rpartition("/")
    return f"{parent}/demo-{name}" if parent else f"demo-{name}"


def _first_model_of(config: Config, name: str) -> str | None:
    model = config.models.get(name)
    if model is None or not model.chain:
        return None
    return model.chain[0].model
