"""The Messages API's pure parts, as tables: its checks, the features and prompt bound it takes from
Anthropic's blocks, its usage (cached input counted apart), its stream meter over the wire shapes
of OpenRouter and Anthropic, its credentials, its in-stream error and what the upstream is sent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.apis import APIS
from proxy.core.apis.messages import TOOL_SYSTEM_PROMPT_TOKENS, MessagesApi, measure_prompt
from proxy.core.apis.messages_stream import MessagesMeter, messages_usage
from proxy.core.errors import InvalidRequest
from proxy.core.features import IMAGE_TOKENS, MESSAGE_OVERHEAD_TOKENS, TOOL_OVERHEAD_TOKENS
from proxy.core.pricing import Tokens
from proxy.core.record import RequestRecord, Usage, billed_tokens
from proxy.core.sse import SseDecoder

API = MessagesApi()
HELLO = [{"role": "user", "content": "Say hello"}]
STARTED = 100.0
PIXELS = "iVBORw0KGgo" * 5_000  # a base64 image of 55 kB: priced by the allowance, never by its bytes
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXELS}}
TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {}}}


def test_it_is_served_in_anthropic_shape_and_only_by_openrouter_upstreams():
    (api,) = [api for api in APIS if api.name == "messages"]
    assert (api.routes, api.path, api.error_style, api.kinds) == (
        ("/v1/messages",),
        "/messages",
        "anthropic",
        frozenset({"openrouter"}),
    )
    assert api.done is None and not api.cacheable and api.content_key == "content"


# ---------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": HELLO}, "model", "missing_required_parameter"),
        ({"model": "", "messages": HELLO}, "model", "missing_required_parameter"),
        ({"model": "cheap"}, "messages", "missing_required_parameter"),
        ({"model": "cheap", "messages": []}, "messages", "invalid_type"),
        ({"model": "cheap", "messages": "hi"}, "messages", "invalid_type"),
        ({"model": "cheap", "messages": [*HELLO, "hi"]}, "messages.1", "invalid_type"),
        ({"model": "cheap", "messages": HELLO, "max_tokens": 0}, "max_tokens", "invalid_type"),
        ({"model": "cheap", "messages": HELLO, "max_tokens": "100"}, "max_tokens", "invalid_type"),
        ({"model": "cheap", "messages": HELLO, "max_tokens": True}, "max_tokens", "invalid_type"),
        ({"model": "cheap", "messages": HELLO, "system": 7}, "system", "invalid_type"),
        ({"model": "cheap", "messages": HELLO, "stream": "yes"}, "stream", "invalid_type"),
    ],
)
def test_a_body_it_cannot_serve_is_refused_naming_the_parameter(body, param, code):
    with pytest.raises(InvalidRequest) as refused:
        API.check(body)
    assert (refused.value.param, refused.value.code, refused.value.status) == (param, code, 400)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"max_tokens": 1},
        {"system": "Be brief."},
        {"system": [{"type": "text", "text": "Be brief."}]},
        {"stream": True},
    ],
)
def test_a_well_formed_body_passes(extra):
    API.check({"model": "cheap", "messages": HELLO, **extra})  # max_tokens is optional, as at OpenRouter


# ---------------------------------------------------------------- features and the prompt bound


def text_bound(body: dict[str, Any]) -> int:
    """What the rules say the bound is for a body without images, tools or documents."""
    size = len(orjson.dumps(body["messages"])) + MESSAGE_OVERHEAD_TOKENS * len(body["messages"])
    if body.get("system"):
        size += len(orjson.dumps(body["system"])) + MESSAGE_OVERHEAD_TOKENS
    return size


def test_features_come_from_the_messages_format():
    body = {
        "model": "auto",
        "system": "You are terse.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]},
        ],
        "tools": [TOOL],
        "max_tokens": 300,
        "stream": True,
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        "metadata": {"user_id": "u1"},
    }
    features = API.features(body, {"X-Task-Type": " Code_Generation "})
    assert features.task == "code_generation"
    assert (features.has_tools, features.has_images, features.json_mode, features.stream) == (True, True, True, True)
    assert features.max_tokens == 300
    assert features.last_user_text == "What is this?"  # a turn of tool results is not what the user said
    assert features.prompt_tokens > IMAGE_TOKENS + TOOL_SYSTEM_PROMPT_TOKENS
    assert features.prompt_tokens < len(PIXELS)  # the image's bytes are not counted


@pytest.mark.parametrize(
    ("body", "task", "json_mode", "last_user_text"),
    [
        ({"messages": HELLO}, None, False, "Say hello"),
        ({"messages": HELLO, "metadata": {"task": "Summarise"}}, "summarise", False, "Say hello"),
        ({"messages": HELLO, "output_format": {"type": "json_schema", "schema": {}}}, None, True, "Say hello"),
        ({"messages": HELLO, "output_config": {"effort": "low"}}, None, False, "Say hello"),
        (
            {"messages": [*HELLO, {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}]},
            None,
            False,
            "Again",
        ),
    ],
)
def test_task_json_mode_and_last_user_text(body, task, json_mode, last_user_text):
    features = API.features({"model": "auto", **body}, {})
    assert (features.task, features.json_mode, features.last_user_text) == (task, json_mode, last_user_text)
    assert (features.has_tools, features.has_images, features.stream, features.max_tokens) == (
        False,
        False,
        False,
        None,
    )


def test_the_bound_of_text_is_a_token_per_byte_of_json_plus_each_message_and_the_system_prompt():
    body = {
        "model": "m",
        "system": "Réponds en français.",
        "messages": [*HELLO, {"role": "assistant", "content": "Ok"}],
    }
    assert measure_prompt(body).bound == text_bound(body)
    assert measure_prompt(body).estimate == -(
        -(len(orjson.dumps(body["messages"])) + len(orjson.dumps(body["system"]))) // 4
    )


def test_images_count_their_allowance_wherever_they_sit_and_never_their_bytes():
    nested = {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "a chart"}, IMAGE]}
    body = {"model": "m", "messages": [{"role": "user", "content": [IMAGE, nested]}]}
    without = {"model": "m", "messages": [{"role": "user", "content": [{**nested, "content": [nested["content"][0]]}]}]}
    measured = measure_prompt(body)
    assert measured.images == 2
    assert measured.bound == text_bound(without) + 2 * IMAGE_TOKENS


def test_tools_count_their_json_their_wrapping_and_anthropics_tool_system_prompt():
    plain = {"model": "m", "messages": HELLO}
    with_tools = {**plain, "tools": [TOOL, TOOL]}
    added = len(orjson.dumps(with_tools["tools"])) + TOOL_SYSTEM_PROMPT_TOKENS + 2 * TOOL_OVERHEAD_TOKENS
    assert measure_prompt(with_tools).bound == measure_prompt(plain).bound + added


def test_a_document_counts_its_bytes_and_a_page_image():
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}
    body = {"model": "m", "messages": [{"role": "user", "content": [pdf]}]}
    assert measure_prompt(body).bound == text_bound(body) + IMAGE_TOKENS


TEXT = st.text(st.characters(codec="utf-8"), max_size=200)  # CJK, emoji, control characters, all of it


@settings(max_examples=200, deadline=None)
@given(system=TEXT, turns=st.lists(TEXT, min_size=1, max_size=6), tool_text=TEXT)
def test_the_bound_is_never_below_the_bytes_of_the_text_sent(system, turns, tool_text):
    """No tokenizer makes more tokens than bytes: the bound is at least every byte of text, as UTF-8."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]
    messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": tool_text}]})
    body = {"model": "m", "system": system, "messages": messages}
    text_bytes = sum(len(t.encode()) for t in [system, *turns, tool_text])
    assert measure_prompt(body).bound >= text_bytes + MESSAGE_OVERHEAD_TOKENS * len(messages)


# ---------------------------------------------------------------- usage


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"input_tokens": 12, "output_tokens": 8}, Usage(12, 8, None, 0, 0)),
        (
            {"input_tokens": 5, "output_tokens": 8, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20},
            Usage(125, 8, None, 100, 20),  # Anthropic's input_tokens leaves the cached input out
        ),
        (
            {
                "input_tokens": 5,
                "output_tokens": 8,
                "cache_read_input_tokens": None,
                "cache_creation_input_tokens": None,
            },
            Usage(5, 8, None, 0, 0),
        ),
        ({"input_tokens": 5, "output_tokens": 8, "cost": 0.00012}, Usage(5, 8, 0.00012, 0, 0)),
        ({"input_tokens": 5, "output_tokens": 8, "cost": 0}, Usage(5, 8, 0.0, 0, 0)),  # a free model is free
        ({"input_tokens": -5, "output_tokens": True, "cost": "1"}, Usage(0, 0, None, 0, 0)),  # nonsense counts nothing
        (None, None),
        ([], None),
    ],
)
def test_usage_of_a_message(usage, expected):
    assert API.usage({"usage": usage}) == expected
    assert messages_usage(usage) == expected


# ---------------------------------------------------------------- the stream meter


def event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def start(usage: dict[str, Any], provider: str = "DigitalOcean") -> bytes:
    message = {"id": "gen-1-abc", "type": "message", "role": "assistant", "content": [], "model": "m", "usage": usage}
    return event("message_start", {"type": "message_start", "message": {**message, "provider": provider}})


def delta(kind: str, field: str, text: str) -> bytes:
    return event(
        "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": kind, field: text}}
    )


def message_delta(usage: dict[str, Any]) -> bytes:
    return event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage})


PING = event("ping", {"type": "ping"})
BLOCK = event(
    "content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
)
STOP = event("content_block_stop", {"type": "content_block_stop", "index": 0}) + event(
    "message_stop", {"type": "message_stop"}
)
WORDS = delta("text_delta", "text", "Hello") + delta("text_delta", "text", " wörld")
OPENROUTER_START = {
    "input_tokens": 0,
    "output_tokens": 0,
    "cache_read_input_tokens": None,
    "cache_creation_input_tokens": None,
}
OPENROUTER_FINAL = {
    "input_tokens": 574,
    "output_tokens": 306,
    "cache_read_input_tokens": 128,
    "cache_creation_input_tokens": None,
    "cost": 0.000126255304,
}

# (stream bytes, usage billed, streamed text bytes, error): the wire shapes, as taken off the wire.
STREAMS = {
    # OpenRouter (a non-Anthropic model): zeros at the start, everything on message_delta, then its [DONE].
    "openrouter": (
        b": OPENROUTER PROCESSING\n\n"
        + start(OPENROUTER_START)
        + BLOCK
        + PING
        + WORDS
        + message_delta(OPENROUTER_FINAL)
        + STOP
        + b"event: data\ndata: [DONE]\n\n",
        Usage(702, 306, 0.000126255304, 128, 0),
        12,
        None,
    ),
    # Anthropic's own: the input on message_start, the output alone on message_delta.
    "anthropic": (
        start({"input_tokens": 339, "output_tokens": 1, "cache_read_input_tokens": 40}, "Anthropic")
        + BLOCK
        + WORDS
        + message_delta({"output_tokens": 53})
        + STOP,
        Usage(379, 53, None, 40, 0),
        12,
        None,
    ),
    "tool input and thinking are generated text": (
        start(OPENROUTER_START)
        + delta("thinking_delta", "thinking", "Hmm")
        + delta("input_json_delta", "partial_json", '{"city": "Köln"}')
        + delta("signature_delta", "signature", "sig")
        + message_delta({"input_tokens": 9, "output_tokens": 4})
        + STOP,
        Usage(9, 4, None, 0, 0),
        3 + len('{"city": "Köln"}'.encode()),
        None,
    ),
    "cut before message_delta: no usage, text counted": (
        start({"input_tokens": 339, "output_tokens": 1}, "Anthropic") + BLOCK + WORDS,
        None,
        12,
        None,
    ),
    "an error event": (
        start(OPENROUTER_START)
        + WORDS
        + event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        None,
        12,
        "upstream_stream_error",
    ),
}


def meter_over(stream: bytes, pieces: list[bytes]) -> tuple[RequestRecord, bytes, bool]:
    record = RequestRecord("r1", 0.0, "auto", None, True, prompt_estimate=7)
    meter = API.meter(record, STARTED, {})
    decoder, forwarded, done = SseDecoder(1 << 20), b"", False
    for piece in pieces:
        batch = decoder.feed(piece)
        for data in batch.events:
            assert meter.forward(meter.see(data, STARTED + 0.25))  # every event reaches the client
        forwarded += batch.raw
        done = done or batch.done
    return record, forwarded, done


@pytest.mark.parametrize(("stream", "usage", "text_bytes", "error"), STREAMS.values(), ids=STREAMS.keys())
def test_every_split_of_a_stream_bills_the_same(stream, usage, text_bytes, error):
    step = max(1, len(stream) // 150)  # reads split at ~150 places: every framing boundary is crossed
    for pieces in [[stream], *([stream[:cut], stream[cut:]] for cut in range(1, len(stream), step))]:
        record, forwarded, done = meter_over(stream, pieces)
        assert record.usage == usage
        assert record.streamed_text_bytes == text_bytes
        assert (record.error, record.generation_id, record.ttft_s) == (error, "gen-1-abc", 0.25)
        end = stream.find(b"event: data\ndata: [DONE]")
        assert (forwarded, done) == ((stream[:end], True) if end >= 0 else (stream, False))  # [DONE] never forwarded


def test_the_provider_is_noted_and_a_cut_stream_is_billed_from_its_text():
    cut = STREAMS["cut before message_delta: no usage, text counted"][0]
    record, _, _ = meter_over(cut, [cut])
    record.model = "anthropic/claude-sonnet-4.5"
    assert record.provider == "Anthropic"
    # message_start's input count instead of the prompt's estimate (7), and 12 bytes of text at four a token
    assert billed_tokens(record) == Tokens(339, 3)


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b'"text"', b"{}", b'{"type": "message_delta", "usage": 3}'])
def test_events_it_cannot_read_change_nothing_but_the_first_token_time(data):
    record = RequestRecord("r1", 0.0, "auto", None, True)
    meter = MessagesMeter(record, STARTED)
    meter.see(data, STARTED + 1)
    assert (record.usage, record.streamed_text_bytes, record.error, record.generation_id) == (None, 0, None, None)


# ---------------------------------------------------------------- credentials, errors, the upstream body


@pytest.mark.parametrize(
    ("headers", "authorization"),
    [
        ({"Authorization": "Bearer a"}, "Bearer a"),
        ({"x-api-key": "k"}, "Bearer k"),
        ({"Authorization": "Bearer a", "x-api-key": "k"}, "Bearer a"),
        ({"Authorization": "", "x-api-key": "k"}, "Bearer k"),
        ({"x-api-key": ""}, None),
        ({}, None),
    ],
)
def test_the_client_key_comes_as_a_bearer_token_or_as_x_api_key(headers, authorization):
    assert API.authorization(headers) == authorization


def test_the_in_stream_error_is_an_anthropic_error_event(anthropic_schemas):
    raw = API.stream_error("The upstream stream broke off: dropped", "stream_interrupted")
    lines = raw.decode().split("\n")
    assert lines[0] == "event: error" and raw.endswith(b"\n\n")  # the SDKs raise only on a named error event
    payload = orjson.loads(lines[1].removeprefix("data: "))
    anthropic_schemas.validate("ErrorResponse", payload)
    assert payload["error"] == {"type": "api_error", "message": "The upstream stream broke off: dropped"}


def test_the_upstream_gets_the_body_with_the_model_rewritten_and_no_fallback_lists():
    body = {"model": "quality", "messages": HELLO, "max_tokens": 9, "fallbacks": [{"model": "x/y"}], "models": ["a/b"]}
    sent = orjson.loads(API.prepare(body, "anthropic/claude-sonnet-4.5", "openrouter"))
    assert sent == {"model": "anthropic/claude-sonnet-4.5", "messages": HELLO, "max_tokens": 9}


def test_only_anthropic_headers_go_upstream():
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "context-1m",
        "x-api-key": "k",
        "Authorization": "a",
    }
    assert API.upstream_headers(headers) == {"anthropic-version": "2023-06-01", "anthropic-beta": "context-1m"}
    assert API.upstream_headers({"x-api-key": "k"}) is None
