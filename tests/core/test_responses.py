"""The Responses API's pure part (`proxy.core.apis.responses`), as tables: what is refused, the
facts routing and budgets read, usage in both upstreams' shapes, the stream meter on a captured
OpenRouter stream, and what the upstream is sent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.apis.responses import ResponsesApi, ResponsesMeter, responses_usage
from proxy.core.errors import InvalidRequest
from proxy.core.features import IMAGE_TOKENS
from proxy.core.record import RequestRecord, Usage
from proxy.emulator.response_events import prompt_tokens as emulator_prompt_tokens
from tests.support.responses import check_event

API = ResponsesApi()
IMAGE = {"type": "input_image", "image_url": "data:image/png;base64," + "A" * 40_000}
TOOL = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}


def record() -> RequestRecord:
    return RequestRecord("req-1", 0.0, "cheap", "cheap", True, api="responses")


# ------------------------------------------------------------------ what is refused


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "input": "Hi"},
        {"model": "m", "input": [{"role": "user", "content": "Hi"}], "stream": True},
        {"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}], "background": False},
        {"model": "m", "input": "Hi", "previous_response_id": None, "store": True},
    ],
)
def test_bodies_it_serves(body: dict[str, Any]) -> None:
    API.check(body)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": "Hi"}, "model", "missing_required_parameter"),
        ({"model": "m"}, "input", "missing_required_parameter"),
        ({"model": "m", "input": ""}, "input", "invalid_type"),
        ({"model": "m", "input": []}, "input", "invalid_type"),
        ({"model": "m", "input": [1]}, "input", "invalid_type"),
        ({"model": "m", "input": {"role": "user"}}, "input", "invalid_type"),
        (
            {"model": "m", "input": "Hi", "previous_response_id": "resp_1"},
            "previous_response_id",
            "unsupported_parameter",
        ),
        ({"model": "m", "input": "Hi", "conversation": {"id": "conv_1"}}, "conversation", "unsupported_parameter"),
        ({"model": "m", "input": "Hi", "prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter"),
        ({"model": "m", "input": "Hi", "background": True}, "background", "unsupported_parameter"),
        ({"model": "m", "input": "Hi", "stream": 1}, "stream", "invalid_type"),
    ],
)
def test_bodies_it_refuses_name_the_parameter(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        API.check(body)
    assert (refused.value.param, refused.value.code, refused.value.status) == (param, code, 400)


# ------------------------------------------------------------------ request features


def features(body: dict[str, Any], headers: dict[str, str] | None = None):
    return API.features({"model": "m", **body}, headers or {})


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        ({"input": "Hi"}, {}, dict(task=None, has_tools=False, has_images=False, json_mode=False, stream=False)),
        ({"input": "Hi", "metadata": {"task": " Code_Generation "}}, {}, dict(task="code_generation")),
        ({"input": "Hi", "metadata": {"task": "a"}}, {"X-Task-Type": "b"}, dict(task="b")),
        ({"input": "Hi", "tools": [TOOL]}, {}, dict(has_tools=True)),
        ({"input": [{"role": "user", "content": [IMAGE]}]}, {}, dict(has_images=True)),
        ({"input": "Hi", "text": {"format": {"type": "json_object"}}}, {}, dict(json_mode=True)),
        (
            {"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}},
            {},
            dict(json_mode=True),
        ),
        ({"input": "Hi", "text": {"format": {"type": "text"}}}, {}, dict(json_mode=False)),
        ({"input": "Hi", "stream": True}, {}, dict(stream=True)),
        ({"input": "Hi", "max_output_tokens": 300}, {}, dict(max_tokens=300)),
        ({"input": "Hi", "max_output_tokens": 0}, {}, dict(max_tokens=None)),
        ({"input": "Hi", "max_output_tokens": True}, {}, dict(max_tokens=None)),
        ({"input": "Hi", "max_tokens": 300}, {}, dict(max_tokens=None)),  # chat's name means nothing here
    ],
)
def test_routing_facts(body: dict[str, Any], headers: dict[str, str], expected: dict[str, Any]) -> None:
    found = features(body, headers)
    assert {name: getattr(found, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("items", "text"),
    [
        ("Just a string", "Just a string"),
        ([{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"}], "first"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "b"),
        (
            [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}, IMAGE]}],
            "x",
        ),
        (
            [{"role": "user", "content": [{"type": "input_text", "text": "x"}, {"type": "input_text", "text": "y"}]}],
            "x\ny",
        ),
        (
            [
                {"role": "developer", "content": "rules"},
                {"type": "function_call_output", "call_id": "c", "output": "o"},
            ],
            "",
        ),
    ],
)
def test_the_last_user_message(items: Any, text: str) -> None:
    assert features({"input": items}).last_user_text == text


def test_the_prompt_bound_counts_every_part_of_the_prompt() -> None:
    base = features({"input": "Hi"}).prompt_tokens
    assert base >= len(b'"Hi"')
    instructions = "Be brief. " * 50
    with_instructions = features({"input": "Hi", "instructions": instructions}).prompt_tokens
    assert with_instructions - base >= len(instructions)
    with_tool = features({"input": "Hi", "tools": [TOOL]}).prompt_tokens
    assert with_tool - base >= len(orjson.dumps([TOOL]))
    schema = {"type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    with_schema = features({"input": "Hi", "text": {"format": schema}}).prompt_tokens
    assert with_schema - base >= len(orjson.dumps(schema))


def test_images_are_counted_by_allowance_not_by_their_bytes() -> None:
    one = features({"input": [{"role": "user", "content": [{"type": "input_text", "text": "What?"}, IMAGE]}]})
    output = [{"type": "input_text", "text": "What?"}, IMAGE, IMAGE]
    in_a_result = features({"input": [{"type": "function_call_output", "call_id": "c", "output": output}]})
    assert IMAGE_TOKENS <= one.prompt_tokens < IMAGE_TOKENS + 200  # not the 40,000 bytes of base64
    assert 2 * IMAGE_TOKENS <= in_a_result.prompt_tokens < 2 * IMAGE_TOKENS + 200
    assert one.has_images and in_a_result.has_images


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.text(max_size=200), min_size=1, max_size=5),
    instructions=st.one_of(st.none(), st.text(min_size=1, max_size=100)),
    images=st.integers(0, 2),
)
def test_the_bound_holds_for_any_text_and_the_estimate_is_the_emulators_count(
    texts: list[str], instructions: str | None, images: int
) -> None:
    """The bound is at least a token per UTF-8 byte of every text (no real tokenizer makes more),
    plus the image allowance; the estimate that bills a cut stream counts the prompt as the
    emulator bills it (four bytes a token, an image at 765), so a cut stream audits exactly."""
    content: list[Any] = [{"type": "input_text", "text": text} for text in texts] + [IMAGE] * images
    body: dict[str, Any] = {"model": "m", "input": [{"role": "user", "content": content}]}
    if instructions is not None:
        body["instructions"] = instructions
    found = API.features(body, {})
    text_bytes = sum(len(text.encode()) for text in texts) + len((instructions or "").encode())
    assert found.prompt_tokens >= text_bytes + IMAGE_TOKENS * images
    assert found.prompt_estimate == emulator_prompt_tokens(body)


# ------------------------------------------------------------------ usage


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {  # OpenRouter's, as captured: cost, and cache writes among the input tokens
                "input_tokens": 9175,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 9172},
                "output_tokens": 277,
                "output_tokens_details": {"reasoning_tokens": 135},
                "total_tokens": 9452,
                "cost": 0.025706,
                "is_byok": False,
            },
            Usage(9175, 277, 0.025706, 0, 9172),
        ),
        (
            {"input_tokens": 328, "input_tokens_details": {"cached_tokens": 128}, "output_tokens": 52},  # OpenAI's
            Usage(328, 52, None, 128, 0),
        ),
        ({"input_tokens": 5, "output_tokens": 1, "cost": 0}, Usage(5, 1, 0.0)),
        ({"input_tokens": -1, "output_tokens": True, "cost": "1", "input_tokens_details": None}, Usage(0, 0, None)),
        ({}, Usage(0, 0, None)),
        (None, None),
        ("12", None),
    ],
)
def test_usage_in_either_upstreams_shape(usage: Any, expected: Usage | None) -> None:
    assert responses_usage(usage) == expected
    assert API.usage({"usage": usage}) == expected


# ------------------------------------------------------------------ the stream meter

# An OpenRouter stream, as captured (trimmed): the generation id on the lifecycle events, typed
# deltas, and the usage with the cost on `response.completed`.
CAPTURED = [
    {"type": "response.created", "response": {"id": "gen-1787612977-3B6P", "status": "in_progress", "usage": None}},
    {"type": "response.in_progress", "response": {"id": "gen-1787612977-3B6P", "status": "in_progress", "usage": None}},
    {"type": "response.output_item.added", "output_index": 0, "item": {"id": "rs_0", "type": "reasoning"}},
    {"type": "response.reasoning_text.delta", "item_id": "rs_0", "output_index": 0, "delta": "Think: 灯台"},
    {"type": "response.output_item.added", "output_index": 1, "item": {"id": "msg_tmp_1", "type": "message"}},
    {"type": "response.output_text.delta", "item_id": "msg_tmp_1", "output_index": 1, "delta": "Two"},
    {"type": "response.output_text.delta", "item_id": "msg_tmp_1", "output_index": 1, "delta": " memory 🌊"},
    {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 2, "delta": '{"a":1}'},
    {"type": "response.output_text.done", "item_id": "msg_tmp_1", "output_index": 1, "text": "Two memory 🌊"},
    {
        "type": "response.completed",
        "response": {
            "id": "gen-1787612977-3B6P",
            "status": "completed",
            "usage": {
                "input_tokens": 9175,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 9172},
                "output_tokens": 277,
                "total_tokens": 9452,
                "cost": 0.025706,
            },
        },
    },
]


def feed(meter: ResponsesMeter, events: list[dict[str, Any]], start: float = 10.0) -> list[dict[str, Any] | None]:
    return [meter.see(orjson.dumps({**event, "sequence_number": n}), start + n) for n, event in enumerate(events)]


def test_the_meter_reads_a_captured_openrouter_stream() -> None:
    rec = record()
    meter = API.meter(rec, 9.0, {})
    parsed = feed(meter, CAPTURED)
    assert [p["type"] for p in parsed if p] == [e["type"] for e in CAPTURED]  # parsed once, handed back
    assert all(meter.forward(p) for p in parsed)  # every event reaches the client
    assert rec.generation_id == "gen-1787612977-3B6P" and rec.provider is None
    assert rec.ttft_s == 3.0  # the first output event (at 12.0), not response.created (at 10.0)
    assert rec.usage == Usage(9175, 277, 0.025706, 0, 9172)
    assert rec.streamed_text_bytes == len("Think: 灯台".encode()) + len("Two memory 🌊".encode()) + len('{"a":1}')
    assert rec.error is None and meter.sequence == len(CAPTURED) - 1


def test_a_stream_cut_before_its_usage_leaves_what_bills_it() -> None:
    rec = record()
    meter = API.meter(rec, 0.0, {})
    feed(meter, CAPTURED[:6])
    assert rec.usage is None and rec.generation_id == "gen-1787612977-3B6P"
    assert rec.streamed_text_bytes == len("Think: 灯台".encode()) + 3


@pytest.mark.parametrize(
    "event",
    [
        {"type": "error", "code": "server_error", "message": "Provider disconnected", "param": None},
        {"type": "response.failed", "response": {"id": "gen-1", "status": "failed", "error": {"code": "server_error"}}},
    ],
)
def test_an_error_event_marks_the_record(event: dict[str, Any]) -> None:
    rec = record()
    feed(API.meter(rec, 0.0, {}), [CAPTURED[0], event])
    assert rec.error == "upstream_stream_error" and rec.ttft_s is None


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b'"text"', b"{}", b'{"type": 7, "delta": "x"}'])
def test_odd_events_are_passed_on_and_bill_nothing(data: bytes) -> None:
    rec = record()
    meter = API.meter(rec, 0.0, {})
    parsed = meter.see(data, 1.0)
    assert meter.forward(parsed)
    assert (rec.usage, rec.generation_id, rec.streamed_text_bytes, rec.error) == (None, None, 0, None)


def test_the_proxys_error_event_follows_the_last_event_and_matches_the_schema(openai_api_schemas) -> None:
    meter = API.meter(record(), 0.0, {})
    feed(meter, CAPTURED[:5])
    raw = API.stream_error_after(meter, "The upstream stream broke off: reset", "stream_interrupted")
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2
    event = orjson.loads(raw.split(b"data: ", 1)[1])
    check_event(openai_api_schemas, event)
    assert (event["sequence_number"], event["code"]) == (5, "stream_interrupted")
    first = orjson.loads(API.stream_error("broke", "stream_interrupted").split(b"data: ", 1)[1])
    assert first["sequence_number"] == 0  # no event seen: the first of the stream


# ------------------------------------------------------------------ what the upstream is sent


def test_the_upstream_body_has_the_model_rewritten_and_no_stacked_fallbacks() -> None:
    body = {
        "model": "cheap",
        "input": "Hi",
        "instructions": "Be brief.",
        "models": ["a/b"],
        "provider": {"order": ["x"]},
        "reasoning": {"effort": "low"},
    }
    to_openrouter = orjson.loads(API.prepare(body, "mistralai/mistral-7b-instruct", "openrouter"))
    to_openai = orjson.loads(API.prepare(body, "gpt-4o-mini", "openai"))
    rest = {"input": "Hi", "instructions": "Be brief.", "reasoning": {"effort": "low"}}
    assert to_openrouter == {**rest, "model": "mistralai/mistral-7b-instruct", "provider": {"order": ["x"]}}
    assert to_openai == {**rest, "model": "gpt-4o-mini"}
    assert body["model"] == "cheap"  # the client's body is not changed


def test_the_api_is_served_on_its_routes() -> None:
    assert (API.name, API.routes, API.path, API.done, API.error_style) == (
        "responses",
        ("/v1/responses",),
        "/responses",
        None,
        "openai",
    )
    assert API.kinds == {"openrouter", "openai"} and not API.cacheable
