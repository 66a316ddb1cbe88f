"""A big chat request (a long prompt, tools) through the proxy: the upstream receives the client's
body with only `model` rewritten, whichever way the proxy builds it (`JsonBody` reuses the JSON
the prompt was measured by), and the prompt bound routing rules see is the documented one."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from proxy.core.features import prompt_token_bound
from proxy.http.body import KEEP_JSON_BYTES

MISTRAL, LLAMA, HAIKU = "mistralai/mistral-7b-instruct", "meta-llama/llama-3.1-8b-instruct", "anthropic/claude-3-haiku"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"tool_{n:02d}",
            "description": f'Look up record kind {n}; «ünïcode», "quotes", a \\ and a \n newline.',
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
        },
    }
    for n in range(20)
]
LONG = "The lighthouse keeper logged the weather and counted the ships. 😀 " * 300  # ~20 kB


def body(model: str, size: str, **extra: Any) -> dict[str, Any]:
    """Messages first, as the OpenAI SDK sends them."""
    content = LONG if size == "big" else "hi"
    messages = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": content}]
    return {"messages": messages, "model": model, "tools": TOOLS, "max_tokens": 16, "temperature": 0.5, **extra}


async def post(proxy, sent: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    raw = orjson.dumps(sent)
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/v1/chat/completions", data=raw, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


@pytest.mark.parametrize("size", ["big", "small"])
@pytest.mark.parametrize(
    ("model", "member", "extra", "dropped", "added"),
    [
        ("cheap", MISTRAL, {}, (), {}),  # the common case
        ("cheap", MISTRAL, {"models": ["x"], "provider": {"order": ["y"]}}, ("models",), {}),
        ("haiku", HAIKU, {}, (), {"cache_control": {"type": "ephemeral"}}),  # prompt_cache: auto adds it
        ("oa", "gpt-4o-mini", {"provider": {"order": ["y"]}, "stream": False}, ("provider",), {}),
    ],
)
async def test_the_upstream_gets_the_clients_body_with_its_model(
    make_proxy, emulator, size, model, member, extra, dropped, added
):
    proxy = await make_proxy(MODELS.replace("BOUND", "1000000"))
    sent = body(model, size, **extra)
    assert (len(orjson.dumps(sent)) >= KEEP_JSON_BYTES) == (size == "big")
    status, _, answer = await post(proxy, sent)
    assert status == 200, answer
    (seen,) = emulator.state.requests
    expected = {k: v for k, v in sent.items() if k not in dropped} | {"model": member} | added
    assert seen.body == expected
    assert list(seen.body) == list(expected)  # the client's order of fields, `model` in its place


@pytest.mark.parametrize("size", ["big", "small"])
@pytest.mark.parametrize(("over", "chosen"), [(-1, LLAMA), (0, MISTRAL)])
async def test_routing_rules_see_the_documented_prompt_bound(make_proxy, size, over, chosen):
    sent = body("auto", size)
    bound = prompt_token_bound(sent["messages"], sent["tools"])  # the rule on a plain dict
    proxy = await make_proxy(MODELS.replace("BOUND", str(bound + over)))
    status, headers, answer = await post(proxy, sent)
    assert status == 200, answer
    assert headers["x-proxy-model"] == chosen


MODELS = f"""
models:
  cheap: {{chain: [{MISTRAL}]}}
  long: {{chain: [{LLAMA}]}}
  haiku: {{chain: [{HAIKU}], prompt_cache: auto}}
  oa: {{chain: [{{model: gpt-4o-mini, upstream: openai}}]}}
  auto:
    route:
      - {{when: {{prompt_tokens_over: BOUND}}, to: long}}
      - {{to: cheap}}
"""
