"""`JsonBody`: the upstream body built from the JSON of each value is, byte for byte, what one
serialisation of the whole body gives."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from proxy.core.apis import CHAT
from proxy.core.body import JsonBody

BODIES: dict[str, dict[str, Any]] = {
    "small": {"model": "cheap", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32},
    "model last": {"messages": [{"role": "user", "content": "hi"}], "stream": True, "model": "cheap"},
    "no model": {"messages": [{"role": "user", "content": "hi"}]},
    "escapes and unicode": {
        "model": "m",
        "messages": [{"role": "user", "content": 'quote " backslash \\ newline \n nul \u0000 «ünï» 😀'}],
        "temperature": 0.5,
        "stop": None,
        "metadata": {"task": "Code", "nested": [[], {}, [1, 2.5e-3, True]]},
    },
    "tools": {
        "model": "m",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "messages": [{"role": "user", "content": "x" * 10_000}],
    },
}


@pytest.mark.parametrize("measured", [(), ("messages",), ("messages", "tools", "model")])
@pytest.mark.parametrize("name", list(BODIES))
def test_the_upstream_body_is_one_serialisation_of_the_body_with_its_model(name: str, measured: tuple[str]) -> None:
    body = JsonBody(BODIES[name])
    for key in measured:
        if key in body:
            assert body.json(key) == json.dumps(body[key], separators=(",", ":"), ensure_ascii=False).encode()
    sent = body.with_model("mistralai/mistral-7b-instruct")
    assert sent == orjson.dumps({**BODIES[name], "model": "mistralai/mistral-7b-instruct"})
    assert CHAT.prepare(body, "mistralai/mistral-7b-instruct", "openrouter") == sent
    assert json.loads(sent) == {**BODIES[name], "model": "mistralai/mistral-7b-instruct"}


def test_fields_an_upstream_does_not_take_are_still_dropped() -> None:
    body = JsonBody({**BODIES["small"], "models": ["a", "b"], "provider": {"order": ["x"]}})
    body.json("messages")
    sent = json.loads(CHAT.prepare(body, "gpt-4o", "openai"))
    assert sent == {**BODIES["small"], "model": "gpt-4o"}
