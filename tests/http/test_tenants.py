"""One tenant cannot open a breaker for another: two client keys through a real proxy and emulator.

The emulator is made to choke on one tenant's input only (`Fault.when_prompt_contains`), as a
provider does on a malformed image or a prompt it cannot take, while it serves everyone else.
"""

from __future__ import annotations

import pytest

from proxy.emulator import Fault
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text

MISTRAL, LLAMA = "mistralai/mistral-7b-instruct", "meta-llama/llama-3.1-8b-instruct"
MODELS = f"""
models:
  cheap: {{chain: [{MISTRAL}, {LLAMA}]}}
  solo:  {{chain: [{MISTRAL}]}}
keys:
  - {{name: noisy, key_env: NOISY_KEY}}
  - {{name: calm, key_env: CALM_KEY}}
"""
RETRY = "retry: {attempts_per_model: 2, backoff_s: 0.01, cooldown: {failures: 3, window_s: 60, cooldown_s: 30}}"
ENV = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "NOISY_KEY": "noisy", "CALM_KEY": "calm"}
POISON = [{"role": "user", "content": "POISON: an input this provider chokes on"}]
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def tenants(make_proxy, emulator, aiohttp_client):
    proxy = await make_proxy(config_text=proxy_config_text(emulator.url, MODELS, RETRY), env=ENV)
    http = await aiohttp_client(proxy.server)

    async def ask(key: str, model: str, messages: list) -> tuple[int, dict[str, str]]:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": messages},
            headers={"Authorization": f"Bearer {key}"},
        )
        await response.read()
        return response.status, dict(response.headers)

    return ask


def choke_on_poison(emulator, *models: str, message: str = "Provider returned error") -> None:
    for model in models:
        emulator.state.faults.set(model, Fault(status=500, message=message, when_prompt_contains="POISON"))


async def test_requests_that_fail_on_every_member_open_no_breaker(tenants, emulator):
    choke_on_poison(emulator, MISTRAL, LLAMA)
    for _ in range(10):
        status, headers = await tenants("noisy", "cheap", POISON)
        assert status == 502 and f"{MISTRAL}=http_500,http_500 {LLAMA}=http_500,http_500" in headers["x-proxy-route"]
    for key in ("calm", "noisy"):  # nobody lost the member, the noisy tenant included
        status, headers = await tenants(key, "cheap", HELLO)
        assert status == 200 and headers["x-proxy-route"] == f"cheap: {MISTRAL}=ok"


async def test_an_upstream_error_that_names_the_input_opens_no_breaker(tenants, emulator):
    choke_on_poison(emulator, MISTRAL, message="Invalid input: messages[0].content could not be processed")
    for _ in range(10):
        status, headers = await tenants("noisy", "solo", POISON)
        assert status == 502 and headers["x-proxy-attempts"] == "2"
    status, headers = await tenants("calm", "solo", HELLO)
    assert status == 200 and headers["x-proxy-route"] == f"solo: {MISTRAL}=ok"


async def test_a_breaker_one_tenant_opened_skips_the_member_for_that_tenant_only(tenants, emulator):
    # The case: a single-member chain, a generic 5xx, one key's requests. Their failures
    # open a breaker (three distinct requests), but only for that key.
    choke_on_poison(emulator, MISTRAL)
    for _ in range(3):
        assert (await tenants("noisy", "solo", POISON))[0] == 502
    status, headers = await tenants("noisy", "solo", HELLO)
    assert status == 503 and f"{MISTRAL}=skipped:cooldown" in headers["x-proxy-route"]
    for _ in range(5):
        status, headers = await tenants("calm", "solo", HELLO)
        assert status == 200 and headers["x-proxy-route"] == f"solo: {MISTRAL}=ok"


async def test_a_member_failing_for_two_tenants_is_skipped_for_everyone(tenants, emulator):
    """The control: a real outage still opens the breaker for everyone."""
    emulator.state.faults.set(MISTRAL, Fault(status=503))
    for key in ("noisy", "calm", "noisy"):
        status, headers = await tenants(key, "cheap", HELLO)
        assert status == 200 and f"{MISTRAL}=http_503,http_503 {LLAMA}=ok" in headers["x-proxy-route"]
    for key in ("noisy", "calm"):
        status, headers = await tenants(key, "cheap", HELLO)
        assert status == 200 and f"{MISTRAL}=skipped:cooldown" in headers["x-proxy-route"]


async def test_one_request_retried_on_a_member_counts_once(tenants, emulator):
    emulator.state.faults.set(MISTRAL, Fault(status=503))
    for _ in range(2):  # four failures on the member, from two requests: under the three it takes
        status, headers = await tenants("calm", "cheap", HELLO)
        assert status == 200
    status, headers = await tenants("calm", "cheap", HELLO)
    assert f"{MISTRAL}=http_503,http_503 {LLAMA}=ok" in headers["x-proxy-route"]  # tried: still closed
