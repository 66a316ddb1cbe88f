"""The HTTP surface: errors in OpenAI's shape, /v1/models, /healthz."""

from __future__ import annotations

import openai
import pytest

HELLO = [{"role": "user", "content": "hi"}]


async def test_unknown_model_is_404_with_the_valid_names(proxy):
    with pytest.raises(openai.NotFoundError) as caught:
        await proxy.client().chat.completions.create(model="gpt-7-ultra", messages=HELLO)
    body = caught.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
    for name in ("cheap", "balanced", "quality", "code", "auto"):
        assert name in body["message"]


@pytest.mark.parametrize(
    "payload, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": "cheap"}', "messages"),
        (b'{"model": "cheap", "messages": []}', "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "cheap", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    ],
)
async def test_bad_requests_are_400_in_openai_shape(proxy, aiohttp_client, schemas, payload, param):
    http = await aiohttp_client(proxy.server)
    response = await http.post("/v1/chat/completions", data=payload, headers={"Content-Type": "application/json"})
    assert response.status == 400
    body = await response.json()
    schemas.validate("ErrorResponse", body)
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param


async def test_body_over_the_limit_is_413(make_proxy, emulator, aiohttp_client):
    proxy = await make_proxy(config_text=None)
    limit = proxy.config.max_body_bytes
    http = await aiohttp_client(proxy.server)
    big = b'{"model": "cheap", "messages": [{"role": "user", "content": "' + b"x" * limit + b'"}]}'
    response = await http.post("/v1/chat/completions", data=big, headers={"Content-Type": "application/json"})
    assert response.status == 413
    body = await response.json()
    assert body["error"]["code"] == "request_too_large"
    assert "max_body_bytes" in body["error"]["message"]


async def test_sdk_raises_the_right_class_for_413(make_proxy, emulator):
    from tests.support.gateway import proxy_config_text

    proxy = await make_proxy(config_text=proxy_config_text(emulator.url) + "max_body_bytes: 2048\n")
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client().chat.completions.create(model="cheap", messages=[{"role": "user", "content": "x" * 4096}])
    assert caught.value.status_code == 413


async def test_models_lists_virtual_and_real_models(proxy, schemas):
    page = await proxy.client().models.list()
    ids = [m.id for m in page.data]
    assert ids[:5] == ["cheap", "balanced", "quality", "code", "auto"]
    assert "mistralai/mistral-7b-instruct" in ids and "gpt-4o-mini" in ids
    schemas.validate("ListModelsResponse", {"object": "list", "data": [m.model_dump() for m in page.data]})
    cheap = page.data[0].model_dump()
    assert cheap["chain"] == ["mistralai/mistral-7b-instruct", "meta-llama/llama-3.1-8b-instruct", "gpt-4o-mini@openai"]


async def test_healthz_and_unknown_routes(proxy, aiohttp_client):
    http = await aiohttp_client(proxy.server)
    response = await http.get("/healthz")
    assert response.status == 200 and (await response.json())["status"] == "ok"
    response = await http.get("/v1/nothing-here")
    assert response.status == 404
    assert "POST /v1/chat/completions" in (await response.json())["error"]["message"]
    response = await http.get("/v1/chat/completions")
    assert response.status == 405
    assert (await response.json())["error"]["type"] == "invalid_request_error"
