"""With client keys configured, nothing answers without a key: /v1/models lists what the key may
use, and /metrics (which names keys and their spend) needs the admin or the metrics key."""

from __future__ import annotations

import logging

import pytest

from tests.support.gateway import UPSTREAM_KEY, proxy_config_text

KEYS = """
keys:
  - {name: narrow, key_env: NARROW_KEY, models: [cheap, auto]}
  - {name: wide, key_env: WIDE_KEY}
admin: {key_env: ADMIN_KEY}
metrics: {key_env: SCRAPER_KEY}
"""
ENV = {
    "TEST_OPENROUTER_KEY": UPSTREAM_KEY,
    "TEST_OPENAI_KEY": UPSTREAM_KEY,
    "NARROW_KEY": "narrow-secret",
    "WIDE_KEY": "wide-secret",
    "ADMIN_KEY": "admin-secret",
    "SCRAPER_KEY": "scraper-secret",
}


@pytest.fixture
async def http(make_proxy, emulator, aiohttp_client):
    proxy = await make_proxy(config_text=proxy_config_text(emulator.url) + KEYS, env=ENV)
    return await aiohttp_client(proxy.server)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_models_need_a_key_and_list_what_it_may_use(http, schemas):
    response = await http.get("/v1/models")
    assert response.status == 401
    schemas.validate("ErrorResponse", await response.json())
    assert (await http.get("/v1/models", headers=bearer("wrong"))).status == 401

    narrow = await (await http.get("/v1/models", headers=bearer("narrow-secret"))).json()
    schemas.validate("ListModelsResponse", narrow)
    assert [m["id"] for m in narrow["data"]] == ["cheap", "auto"]
    wide = await (await http.get("/v1/models", headers=bearer("wide-secret"))).json()
    ids = [m["id"] for m in wide["data"]]
    assert ids[:5] == ["cheap", "balanced", "quality", "code", "auto"] and "mistralai/mistral-7b-instruct" in ids


@pytest.mark.parametrize(
    "token, status",
    [(None, 401), ("narrow-secret", 401), ("wrong", 401), ("admin-secret", 200), ("scraper-secret", 200)],
)
async def test_metrics_need_the_admin_or_the_metrics_key(http, token, status):
    response = await http.get("/metrics", headers=bearer(token) if token else {})
    assert response.status == status
    if status == 401:
        body = await response.json()
        assert "SCRAPER_KEY" in body["error"]["message"] and "ADMIN_KEY" in body["error"]["message"]
        assert response.headers["x-request-id"] and response.headers["x-proxy-route"]
    else:
        assert "orproxy_requests_total" in await response.text()


async def test_without_client_keys_metrics_and_models_stay_open(proxy, aiohttp_client):
    http = await aiohttp_client(proxy.server)
    assert (await http.get("/metrics")).status == 200
    assert (await http.get("/v1/models")).status == 200


async def test_closed_metrics_are_said_at_start_up(make_proxy, emulator, caplog):
    text = proxy_config_text(emulator.url) + "keys: [{name: app, key_env: NARROW_KEY}]\n"
    with caplog.at_level(logging.WARNING, logger="orproxy"):
        await make_proxy(config_text=text, env=ENV)
    assert any("GET /metrics is closed" in r.getMessage() for r in caplog.records)
