"""The emulator's Messages wire, without a socket: how it reads a Messages request (its prompt
count never above the proxy's upper bound, tool choices, tool results), and its error bodies in
Anthropic's shape with OpenRouter's `error_type`."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.apis.messages import measure_prompt
from proxy.emulator import load_default_catalogue
from proxy.emulator.completions import index_catalogue
from proxy.emulator.messages_wire import ERROR_TYPES, chat_view, error_body, plan, prompt_tokens

MODELS = index_catalogue(load_default_catalogue())
SONNET = MODELS["anthropic/claude-sonnet-4.5"]
TOOL = {
    "name": "lookup",
    "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo" * 3_000}}
ASK = [{"role": "user", "content": "Look it up."}]

BLOCK = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=80)),
    st.just(IMAGE),
    st.builds(
        lambda t: {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": t}, IMAGE]},
        st.text(max_size=40),
    ),
)
CONTENT = st.one_of(st.text(max_size=120), st.lists(BLOCK, min_size=1, max_size=4))


@settings(max_examples=150, deadline=None)
@given(system=st.text(max_size=100), contents=st.lists(CONTENT, min_size=1, max_size=5), tools=st.booleans())
def test_the_emulators_count_never_exceeds_the_proxys_upper_bound(system, contents, tools):
    """What the proxy reserves for is at least what the emulator bills: images inside tool results
    included, whatever the size of their data."""
    body = {"model": "m", "system": system, "messages": [{"role": "user", "content": c} for c in contents]}
    if tools:
        body["tools"] = [TOOL]
    assert prompt_tokens(body) <= measure_prompt(body).bound


@pytest.mark.parametrize(
    ("choice", "answer"),
    [
        (None, "tool_calls"),  # auto: the emulator calls the first tool when there is one
        ({"type": "auto"}, "tool_calls"),
        ({"type": "any"}, "tool_calls"),
        ({"type": "tool", "name": "lookup"}, "tool_calls"),
        ({"type": "none"}, "stop"),
    ],
)
def test_tool_choice(choice, answer):
    body = {"model": SONNET.id, "messages": ASK, "tools": [TOOL], "max_tokens": 100}
    if choice is not None:
        body["tool_choice"] = choice
    reply, _ = plan(body, SONNET, "toolu_1")
    assert reply.finish_reason == answer
    if answer == "tool_calls":
        assert reply.tool_call is not None and orjson.loads(reply.tool_call.arguments) == {"q": "emulated"}


def test_a_turn_of_tool_results_is_answered_in_words():
    turn = [
        *ASK,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "forty-two"}]},
    ]
    body = {"model": SONNET.id, "system": [{"type": "text", "text": "Be brief."}], "messages": turn, "tools": [TOOL]}
    view = chat_view(body)
    assert [m["role"] for m in view["messages"]] == ["system", "user", "assistant", "tool"]
    assert view["messages"][0]["content"] == "Be brief."
    reply, _ = plan(body, SONNET, "toolu_2")
    assert (reply.finish_reason, reply.content) == ("stop", f"[{SONNET.id}] The tool said: forty-two")
    assert reply.prompt_tokens == prompt_tokens(body)  # counted from the Messages body, not the chat view


@pytest.mark.parametrize("status", sorted(ERROR_TYPES))
def test_error_bodies_are_anthropics_envelope_with_openrouters_error_type(status, anthropic_schemas):
    body = orjson.loads(error_body(status, "Something went wrong"))
    kind, error_type = ERROR_TYPES[status]
    assert body == {
        "type": "error",
        "error": {"type": kind, "message": "Something went wrong", "error_type": error_type},
        "request_id": None,
    }
    if kind != "request_too_large":  # Anthropic's errors page lists it; the SDK's schema does not
        anthropic_schemas.validate("ErrorResponse", body)
