"""The emulator's POST /responses over real sockets: OpenRouter's shape under /api/v1 (as its
streams were captured) and OpenAI's under /v1, every answer and event against OpenAI's schemas,
the bill per generation, and the faults."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from proxy.emulator import EMULATOR_STATE, Fault, create_emulator_app, load_default_catalogue
from proxy.emulator.billing import IMAGE_TOKENS, text_tokens
from tests.support.responses import check_event, events_of

AUTH = {"Authorization": "Bearer sk-or-v1-test"}
MODEL = "anthropic/claude-3-haiku"
NOW = 1_790_000_000.0
TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
def app():
    return create_emulator_app(clock=lambda: NOW)


@pytest.fixture
def state(app):
    return app[EMULATOR_STATE]


@pytest.fixture
async def client(aiohttp_client, app):
    return await aiohttp_client(app)


def price(model: str) -> tuple[float, float]:
    entry = next(m for m in load_default_catalogue()["data"] if m["id"] == model)
    return float(entry["pricing"]["prompt"]), float(entry["pricing"]["completion"])


async def respond(client, prefix: str = "/api/v1", **fields: Any):
    body = {"model": MODEL, "input": "Tell me about the lighthouse keeper and his cat", **fields}
    return await client.post(f"{prefix}/responses", json=body, headers=AUTH)


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_a_whole_response_in_each_shape(client, state, openai_api_schemas, prefix):
    response = await respond(client, prefix, instructions="Be brief.", max_output_tokens=100)
    assert response.status == 200
    body = await response.json()
    openai_api_schemas.validate("Response", body)
    openrouter = prefix == "/api/v1"
    assert body["id"].startswith("gen-" if openrouter else "resp_")
    assert response.headers["X-Generation-Id"] == body["id"]
    assert (body["status"], body["model"], body["instructions"], body["max_output_tokens"]) == (
        "completed",
        MODEL,
        "Be brief.",
        100,
    )
    (message,) = body["output"]
    assert message["content"][0]["text"] == f"[{MODEL}] You said: Tell me about the lighthouse keeper and his cat"
    usage = body["usage"]
    bill = state.bills[body["id"]]
    prompt, completion = price(MODEL)
    assert (usage["input_tokens"], usage["output_tokens"]) == (bill.prompt_tokens, bill.completion_tokens)
    assert bill.cost == pytest.approx(bill.prompt_tokens * prompt + bill.completion_tokens * completion)
    if openrouter:
        assert usage["cost"] == bill.cost and usage["cost_details"]["upstream_inference_cost"] == bill.cost
    else:
        assert "cost" not in usage and "is_byok" not in usage


async def test_the_prompt_is_counted_on_the_responses_wire_format(client, state):
    image = {"type": "input_image", "image_url": "data:image/png;base64," + "Q" * 9000}
    items = [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"}, image]}]
    body = await (await respond(client, input=items, instructions="Look closely.", tools=[TOOL])).json()
    without_image = [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"}]}]
    size = len(orjson.dumps(without_image)) + len(orjson.dumps("Look closely.")) + len(orjson.dumps([TOOL]))
    assert body["usage"]["input_tokens"] == text_tokens(size) + IMAGE_TOKENS


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_a_streamed_response_in_each_shape(client, state, openai_api_schemas, prefix):
    response = await respond(client, prefix, stream=True)
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    raw = await response.read()
    events = events_of(raw)
    for _, event in events:
        check_event(openai_api_schemas, event)
    if prefix == "/api/v1":  # OpenRouter: a comment first, bare data lines, [DONE] last
        assert raw.startswith(b": OPENROUTER PROCESSING\n\n") and raw.endswith(b"data: [DONE]\n\n")
        assert b"\nevent:" not in raw and not raw.startswith(b"event:")
    else:  # OpenAI: each event named, nothing after the last
        assert all(name == event["type"] for name, event in events) and b"[DONE]" not in raw
    data = [event for _, event in events]
    assert [e["sequence_number"] for e in data] == list(range(len(data)))
    text = "".join(e["delta"] for e in data if e["type"] == "response.output_text.delta")
    final = data[-1]["response"]
    assert data[-1]["type"] == "response.completed" and final["output"][0]["content"][0]["text"] == text
    assert data[0]["response"]["id"] == final["id"] == response.headers["X-Generation-Id"]
    bill = state.bills[final["id"]]
    assert bill.streamed and (bill.prompt_tokens, bill.completion_tokens) == (
        final["usage"]["input_tokens"],
        final["usage"]["output_tokens"],
    )


async def test_a_function_call_streams_its_arguments(client, openai_api_schemas):
    raw = await (await respond(client, input="Weather in Oslo?", tools=[TOOL], stream=True)).read()
    data = [event for _, event in events_of(raw)]
    for event in data:
        check_event(openai_api_schemas, event)
    arguments = "".join(e["delta"] for e in data if e["type"] == "response.function_call_arguments.delta")
    (done,) = [e for e in data if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == arguments == '{"city":"emulated"}' and done["name"] == "get_weather"
    (call,) = data[-1]["response"]["output"]
    assert (call["type"], call["arguments"], call["status"]) == ("function_call", arguments, "completed")


async def test_a_tool_result_is_answered_in_words(client):
    items = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ]
    body = await (await respond(client, input=items, tools=[TOOL])).json()
    assert body["output"][0]["content"][0]["text"] == f"[{MODEL}] The tool said: Sunny"


@pytest.mark.parametrize("stream", [False, True])
async def test_max_output_tokens_leaves_the_response_incomplete(client, openai_api_schemas, stream):
    response = await respond(client, max_output_tokens=3, stream=stream)
    if stream:
        last = events_of(await response.read())[-1][1]
        check_event(openai_api_schemas, last)
        assert last["type"] == "response.incomplete"
        body = last["response"]
    else:
        body = await response.json()
        openai_api_schemas.validate("Response", body)
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] <= 3


async def test_instructions_are_cached_like_a_system_prompt(client):
    keeper = "You keep the lighthouse's log; answer as the log would. " * 6
    first = (await (await respond(client, instructions=keeper)).json())["usage"]["input_tokens_details"]
    second = (await (await respond(client, instructions=keeper)).json())["usage"]["input_tokens_details"]
    assert first["cached_tokens"] == 0 and first["cache_write_tokens"] > 0
    assert second["cached_tokens"] == first["cache_write_tokens"] and second["cache_write_tokens"] == 0


async def test_an_error_status_fault(client, state):
    state.faults.set(MODEL, Fault(status=503, times=1))
    failed = await respond(client)
    assert failed.status == 503 and (await failed.json())["error"]["code"] == 503
    assert (await respond(client)).status == 200
    assert len(state.bills) == 1


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_a_midstream_error_ends_the_stream_and_bills_what_was_sent(client, state, openai_api_schemas, prefix):
    state.faults.set(MODEL, Fault(midstream_error=True, after_chunks=2, message="Overloaded"))
    raw = await (await respond(client, prefix, stream=True)).read()
    data = [event for _, event in events_of(raw)]
    for event in data:
        check_event(openai_api_schemas, event)
    deltas = [e["delta"] for e in data if e["type"] == "response.output_text.delta"]
    assert len(deltas) == 2 and b"[DONE]" not in raw
    assert data[-1] == {
        "type": "error",
        "code": "server_error",
        "message": "Overloaded",
        "param": None,
        "sequence_number": data[-2]["sequence_number"] + 1,
    }
    (bill,) = state.bills.values()
    assert bill.completion_tokens == text_tokens(len("".join(deltas).encode())) and bill.finish_reason == "error"


async def test_a_dropped_stream_is_billed_for_what_was_sent(client, state):
    state.faults.set(MODEL, Fault(drop_midstream=True, after_chunks=1))
    response = await respond(client, stream=True)
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for piece in response.content.iter_any():
            received += piece
    deltas = [e["delta"] for _, e in events_of(received) if e["type"] == "response.output_text.delta"]
    (bill,) = state.bills.values()
    assert len(deltas) == 1 and bill.completion_tokens == text_tokens(len(deltas[0].encode()))
    assert state.stats["streams_failed"] == 1


@pytest.mark.realtime  # the emulator's latency is a real pause, with keep-alive comments meanwhile
async def test_latency_keeps_the_stream_alive_with_comments(client, state):
    state.faults.set(MODEL, Fault(latency_s=0.25))
    raw = await (await respond(client, stream=True)).read()
    head = raw.split(b"data: ", 1)[0]
    assert head.count(b": OPENROUTER PROCESSING\n\n") >= 3


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": MODEL}, 400, "Input required"),
        ({"model": MODEL, "input": []}, 400, "Input required"),
        ({"model": "no/such-model", "input": "Hi"}, 400, "not a valid model ID"),
        ({"input": "Hi"}, 400, "No model specified"),
    ],
)
async def test_requests_openrouter_refuses(client, state, body, status, message):
    response = await client.post("/api/v1/responses", json=body, headers=AUTH)
    assert response.status == status and message in (await response.json())["error"]["message"]
    assert state.bills == {}


async def test_a_wrong_key_is_refused(aiohttp_client):
    client = await aiohttp_client(create_emulator_app(api_key="right"))
    response = await client.post("/api/v1/responses", json={"model": MODEL, "input": "Hi"}, headers=AUTH)
    assert response.status == 401
