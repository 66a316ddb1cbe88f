"""Client keys: the KeyRing alone, then end to end through the official SDK."""

from __future__ import annotations

import hashlib

import openai
import pytest

from proxy.config import ProxyKey
from proxy.core.errors import Forbidden, Unauthorized
from proxy.core.keys import OPEN, KeyRing
from tests.support.gateway import UPSTREAM_KEY
from tests.support.money import CHAIN_MODEL, HELLO, MODELS

BOT_SECRET = "bot-secret-0123"
OPS_SECRET = "ops-secret-4567"
OPS_SHA = hashlib.sha256(OPS_SECRET.encode()).hexdigest()
KEYS = (
    ProxyKey(name="bot", key_env="BOT_KEY", daily_usd=0.001, models=("cheap", "balanced")),
    ProxyKey(name="ops", key_sha256=OPS_SHA.upper()),
    ProxyKey(name="ghost", key_env="UNSET_KEY"),
)
ENV = {"BOT_KEY": BOT_SECRET, "TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY}
KEYS_YAML = f"""
keys:
  - {{name: bot, key_env: BOT_KEY, daily_usd: 0.001, models: [cheap, balanced]}}
  - {{name: ops, key_sha256: "{OPS_SHA}"}}
"""


@pytest.mark.parametrize(
    "authorization, name",
    [
        (f"Bearer {BOT_SECRET}", "bot"),
        (f"Bearer {OPS_SECRET}", "ops"),
        (f"Bearer  {OPS_SECRET} ", "ops"),
        (f"bearer {BOT_SECRET}", "bot"),  # the scheme is case-insensitive (RFC 7235)
    ],
)
def test_a_known_key_is_recognised(authorization, name):
    assert KeyRing(KEYS, ENV).authenticate(authorization).name == name


@pytest.mark.parametrize(
    "authorization, code",
    [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("Bearer ", "missing_api_key"),
        (BOT_SECRET, "missing_api_key"),  # no Bearer scheme
        ("Bearer wrong", "invalid_api_key"),
        (f"Bearer {BOT_SECRET}x", "invalid_api_key"),
        (f"Bearer {OPS_SHA}", "invalid_api_key"),  # the digest itself is not the key
        ("Bearer ", "missing_api_key"),
    ],
)
def test_a_missing_or_wrong_key_is_refused(authorization, code):
    with pytest.raises(Unauthorized) as refused:
        KeyRing(KEYS, ENV).authenticate(authorization)
    assert refused.value.code == code and refused.value.status == 401


def test_a_key_whose_env_variable_is_unset_cannot_be_used_by_sending_nothing():
    ring = KeyRing(KEYS, {})
    with pytest.raises(Unauthorized):
        ring.authenticate("Bearer ")
    with pytest.raises(Unauthorized):
        ring.authenticate("Bearer x")
    assert ring.authenticate(f"Bearer {OPS_SECRET}").name == "ops"


def test_without_keys_the_proxy_is_open():
    assert KeyRing((), ENV).authenticate(None) is OPEN
    OPEN.check_model("anything")


def test_model_lists():
    ring = KeyRing(KEYS, ENV)
    bot = ring.authenticate(f"Bearer {BOT_SECRET}")
    bot.check_model("cheap")
    with pytest.raises(Forbidden) as refused:
        bot.check_model("quality")
    assert "'bot'" in refused.value.message and "cheap" in refused.value.message
    ring.authenticate(f"Bearer {OPS_SECRET}").check_model("quality")  # no list: every model


@pytest.fixture
async def keyed_proxy(make_proxy):
    return await make_proxy(MODELS, extra=KEYS_YAML, env=ENV)


async def test_missing_key_is_401(keyed_proxy, aiohttp_client):
    http = await aiohttp_client(keyed_proxy.server)
    response = await http.post("/v1/chat/completions", json={"model": "cheap", "messages": HELLO})
    assert response.status == 401
    body = await response.json()
    assert body["error"]["code"] == "missing_api_key" and body["error"]["type"] == "authentication_error"


async def test_wrong_key_is_401(keyed_proxy):
    with pytest.raises(openai.AuthenticationError) as refused:
        await keyed_proxy.client(api_key="not-a-key").chat.completions.create(model="cheap", messages=HELLO)
    assert refused.value.code == "invalid_api_key"


async def test_keys_from_env_and_from_sha256_both_work(keyed_proxy):
    for secret in (BOT_SECRET, OPS_SECRET):
        completion = await keyed_proxy.client(api_key=secret).chat.completions.create(
            model="cheap", messages=HELLO, max_tokens=50
        )
        assert completion.model == CHAIN_MODEL["cheap"]
    rows = await keyed_proxy.ledger.rows()
    assert [r.key_name for r in rows] == ["bot", "ops"]


async def test_a_model_outside_the_keys_list_is_403(keyed_proxy, emulator):
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await keyed_proxy.client(api_key=BOT_SECRET).chat.completions.create(model="quality", messages=HELLO)
    assert refused.value.code == "model_not_allowed"
    assert "quality" in refused.value.message
    assert emulator.state.requests == []
    completion = await keyed_proxy.client(api_key=OPS_SECRET).chat.completions.create(model="quality", messages=HELLO)
    assert completion.model == CHAIN_MODEL["quality"]


async def test_a_key_over_its_own_budget_is_refused_while_another_goes_on(keyed_proxy):
    bot, ops = keyed_proxy.client(api_key=BOT_SECRET), keyed_proxy.client(api_key=OPS_SECRET)
    long_prompt = [{"role": "user", "content": "lorem ipsum dolor sit amet " * 40}]
    answered = 0
    for _ in range(30):
        try:
            await bot.chat.completions.create(model="balanced", messages=long_prompt, max_tokens=100)
        except openai.RateLimitError as exc:
            refused = exc
            break
        answered += 1
    else:
        raise AssertionError("the bot key was never refused")
    assert answered >= 1
    assert refused.code == "budget_exceeded" and refused.type == "insufficient_quota"
    assert "the daily budget of key 'bot'" in refused.message and "of $0.001" in refused.message
    assert int(refused.response.headers["retry-after"]) >= 1
    for model in ("balanced", "quality"):
        completion = await ops.chat.completions.create(model=model, messages=long_prompt, max_tokens=100)
        assert completion.model == CHAIN_MODEL[model]
    book = keyed_proxy.book
    spent = {(scope, window): (amount, limit) for scope, window, amount, limit in book.snapshot()}
    assert spent[("bot", "daily")][0] <= 0.001 and spent[("bot", "daily")][1] == 0.001
    assert spent[("ops", "daily")][0] > 0
