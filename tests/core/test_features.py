"""Request features of big requests (many tools, long prompts): the figures are what the documented
rule gives, counted from one C serialisation (orjson) each, never from `str()` of a structure."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.core.body import JsonBody
from proxy.core.features import (
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    TOOL_OVERHEAD_TOKENS,
    extract_features,
    prompt_size,
)


def tool(number: int, description: str = "") -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": f"tool_{number:02d}",
            "description": description or f'Look up record kind {number}; «ünïcode» and "quotes" \n too.',
            "parameters": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "fields": {"type": "array", "items": {"type": "string"}},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                },
                "required": ["id"],
            },
        },
    }


def json_bytes(value: Any) -> int:
    """The documented measure, by another serialiser: UTF-8 bytes of compact JSON."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


LONG = "The keeper logged the weather and counted the ships. " * 1_000  # ~53 kB
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}

CASES = {
    "20 tools, short prompt": ([{"role": "user", "content": "hi"}], [tool(n) for n in range(20)], 0),
    "20 tools, 50 kB prompt": (
        [{"role": "system", "content": "Be careful."}, {"role": "user", "content": LONG}],
        [tool(n) for n in range(20)],
        0,
    ),
    "200 tools with long descriptions": (
        [{"role": "user", "content": "pick one"}],
        [tool(n, "d" * 2_000) for n in range(200)],
        0,
    ),
    "tools and an image part (its URL not counted)": (
        [{"role": "user", "content": [{"type": "text", "text": LONG}, IMAGE]}],
        [tool(n) for n in range(20)],
        1,
    ),
}


@pytest.mark.parametrize("read", [dict, JsonBody], ids=["dict", "JsonBody"])
@pytest.mark.parametrize("name", list(CASES))
def test_big_tool_lists_and_prompts_are_measured_by_the_documented_rule(name: str, read: type[dict]) -> None:
    """`JsonBody` (a body as the proxy reads it) measures by the JSON it keeps for the upstream body."""
    messages, tools, images = CASES[name]
    features = extract_features(read({"model": "auto", "messages": messages, "tools": tools}), {})
    without_images = [
        {**m, "content": [p for p in m["content"] if p.get("type") != "image_url"]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
    text = json_bytes(without_images) + json_bytes(tools)
    expected_bound = (
        text + MESSAGE_OVERHEAD_TOKENS * len(messages) + TOOL_OVERHEAD_TOKENS * len(tools) + IMAGE_TOKENS * images
    )
    assert features.prompt_tokens == expected_bound
    assert features.has_tools and features.has_images == bool(images)
    assert prompt_size(messages, tools).bound == expected_bound


def test_the_last_user_text_of_a_big_prompt_is_the_text_itself() -> None:
    features = extract_features({"model": "auto", "messages": [{"role": "user", "content": LONG}]}, {})
    assert features.last_user_text is LONG  # no copy of 50 kB


@pytest.mark.parametrize("key", ["tools", "functions"])
def test_a_read_body_measures_as_a_plain_one(key: str) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": LONG}], key: [tool(n) for n in range(3)]}
    read = JsonBody(body)
    assert extract_features(read, {}) == extract_features(body, {})
    assert read.json("messages") == json.dumps(body["messages"], separators=(",", ":")).encode()
