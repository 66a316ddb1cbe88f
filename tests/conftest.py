"""Shared fixtures: a real emulator, a real proxy in front of it, the official SDK as client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.emulator import create_emulator_app
from proxy.http.app import create_app
from tests.support.gateway import (
    API_SPEC,
    SPEC,
    UPSTREAM_KEY,
    Emulator,
    Proxy,
    ProxyFactory,
    ProxyTestServer,
    Schemas,
    proxy_config_text,
)
from tests.support.postgres import scratch_schema


@pytest.fixture(scope="session")
def schemas() -> Schemas:
    if not SPEC.exists():
        pytest.fail(f"OpenAI schemas not found at {SPEC}; the tests need ../shared/spec beside the repo")
    return Schemas(SPEC)


@pytest.fixture(scope="session")
def anthropic_schemas() -> Schemas:
    """Anthropic's Messages schemas, extracted from its official SDK (tests/schemas/extract_anthropic.py)."""
    return Schemas(Path(__file__).parent / "schemas" / "anthropic-messages-schemas.json")


@pytest.fixture(scope="session")
def openai_api_schemas() -> Schemas:
    """OpenAI's schemas of its other APIs (embeddings, legacy completions, Responses, models), from
    tests/schemas/openai-api-schemas.json (see extract_openai.py there for the source)."""
    return Schemas(API_SPEC)


@pytest.fixture
async def emulator(aiohttp_server) -> Emulator:
    app = create_emulator_app(api_key=UPSTREAM_KEY)
    server = await aiohttp_server(app)
    return Emulator(server, app)


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger_config(request) -> AsyncIterator[str]:
    """The config's ledger lines: the SQLite file `ledger_path` names, or a PostgreSQL schema of its own.
    Ask for it before `make_proxy`: the schema is dropped after the proxies stop (a proxy's batch
    runner queries its database until it stops; dropping the schema under it can deadlock)."""
    if request.param == "sqlite":
        yield ""
        return
    async with scratch_schema() as (_, dsn):
        yield f"ledger: {{backend: postgres, dsn: '{dsn}'}}\n"


@pytest.fixture
async def make_proxy(emulator, tmp_path) -> AsyncIterator[ProxyFactory]:
    async def make(
        body: str = "",
        *,
        retry: str | None = None,
        env: dict[str, str] | None = None,
        config_text: str | None = None,
        extra: str = "",
        ledger_path: Path | None = None,
        clock: Callable[[], float] | None = None,
        config_path: Path | None = None,
        reconcile_schedule: tuple[float, ...] = (60.0,),
    ) -> Proxy:
        """A proxy in front of the emulator; with `config_path`, the text is written there and
        the proxy reloads from it (SIGHUP, POST /admin/reload, file watch). Estimated costs are
        looked up after a minute unless a test passes a `reconcile_schedule` of its own, so no
        test sees a row change under it by surprise."""
        text = config_text or proxy_config_text(emulator.url, body, retry) + extra
        if config_path is not None:
            config_path.write_text(text)
        config = parse_config(text, "test-config.yaml")
        env = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY} if env is None else env
        app = create_app(
            config,
            env=env,
            ledger_path=ledger_path or tmp_path / "ledger.sqlite3",
            cache_path=tmp_path / "cache.sqlite3",
            config_path=config_path,
            reconcile_schedule=reconcile_schedule,
            **({"clock": clock} if clock else {}),
        )
        server = ProxyTestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Proxy(server, app, config)

    servers: list[ProxyTestServer] = []
    yield make
    while servers:
        await servers.pop().close()


@pytest.fixture
async def proxy(make_proxy) -> Proxy:
    return await make_proxy()
