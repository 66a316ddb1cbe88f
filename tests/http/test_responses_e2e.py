"""POST /v1/responses end to end: the official openai SDK (`client.responses`) -> the proxy -> the
emulator, on real sockets; every response and stream event checked against OpenAI's schemas."""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.emulator import Fault
from tests.support.responses import check_event, events_of

SONNET, MINI, MISTRAL = "anthropic/claude-sonnet-4.5", "openai/gpt-4o-mini", "mistralai/mistral-7b-instruct"
OA = "\n  oa: {chain: [{model: gpt-4o-mini, upstream: openai}]}\n"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
MODELS = """
models:
  cheap:    {chain: [mistralai/mistral-7b-instruct, meta-llama/llama-3.1-8b-instruct]}
  quality:  {chain: [anthropic/claude-sonnet-4.5, openai/gpt-4o-mini]}
  oa:       {chain: [{model: gpt-4o-mini, upstream: openai}]}
  code:     {chain: [x-ai/grok-code-fast-1]}
  long:     {chain: [google/gemini-2.5-flash]}
  auto:
    route:
      - {when: {task: code_generation}, to: code}
      - {when: {prompt_tokens_over: 2000}, to: long}
      - {when: {last_user_message_matches: "(?i)lighthouse"}, to: quality}
      - {to: cheap}
"""


async def post(proxy, body: dict[str, Any], path: str = "/v1/responses") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(f"{proxy.url}{path}", json=body) as response:
        return response.status, dict(response.headers), await response.read()


@pytest.fixture
async def proxy(make_proxy):
    return await make_proxy(MODELS)


async def test_a_response_through_the_sdk(proxy, emulator, openai_api_schemas):
    raw = await proxy.client().responses.with_raw_response.create(
        model="cheap", input="Say hello in five words.", instructions="Be brief.", max_output_tokens=64
    )
    response = raw.parse()
    openai_api_schemas.validate("Response", response.model_dump(exclude_unset=True))
    assert response.model == MISTRAL and response.status == "completed"
    assert response.output_text == f"[{MISTRAL}] You said: Say hello in five words."
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.model_extra["cost"] > 0  # OpenRouter's cost reaches the client untouched
    assert raw.headers["x-proxy-virtual-model"] == "cheap"
    assert raw.headers["x-proxy-model"] == MISTRAL
    assert raw.headers["x-proxy-route"] == f"cheap: {MISTRAL}=ok"
    (seen,) = emulator.state.requests
    assert seen.path == "/api/v1/responses"
    expected = {"model": MISTRAL, "input": "Say hello in five words.", "instructions": "Be brief."}
    assert seen.body == {**expected, "max_output_tokens": 64}


async def test_the_wire_answer_is_openai_shaped_under_both_prefixes(proxy, openai_api_schemas):
    for path in ("/v1/responses", "/api/v1/responses"):
        status, headers, body = await post(proxy, {"model": "quality", "input": "Hi"}, path)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        payload = orjson.loads(body)
        openai_api_schemas.validate("Response", payload)
        assert payload["id"].startswith("gen-") and payload["model"] == SONNET


async def test_a_streamed_response_through_the_sdk(proxy, openai_api_schemas):
    stream = await proxy.client().responses.create(model="quality", input="Tell me about the sea.", stream=True)
    types, text, final = [], "", None
    async for event in stream:
        check_event(openai_api_schemas, event.model_dump(exclude_unset=True))
        types.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            final = event.response
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final is not None and final.output_text == text == f"[{SONNET}] You said: Tell me about the sea."
    assert final.usage.output_tokens > 0


async def test_the_sdks_stream_helper_assembles_the_final_response(proxy):
    """`responses.stream()` (the events are the wire's, checked above; the helper adds parsed
    snapshots of its own)."""
    async with proxy.client().responses.stream(model="cheap", input="Count the waves.") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.usage.total_tokens > 0


async def test_the_stream_on_the_wire_ends_after_the_last_event(proxy, openai_api_schemas):
    """OpenRouter ends its Responses streams with `data: [DONE]`; OpenAI's have no end marker, and
    neither does the proxy's: the body ends with `response.completed`."""
    status, headers, body = await post(proxy, {"model": "cheap", "input": "Hi", "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert b"[DONE]" not in body and body.startswith(b": OPENROUTER PROCESSING\n\n")
    events = [data for _, data in events_of(body)]
    for event in events:
        check_event(openai_api_schemas, event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed" and body.endswith(b"}\n\n")


async def test_an_openai_upstream_streams_with_its_event_names(proxy, emulator, openai_api_schemas):
    status, _, body = await post(proxy, {"model": "oa", "input": "Hi", "stream": True})
    assert status == 200 and emulator.state.requests[-1].path == "/v1/responses"
    events = events_of(body)
    assert events and all(name == data["type"] for name, data in events)  # `event:` lines pass through
    for _, data in events:
        check_event(openai_api_schemas, data)
    final = events[-1][1]["response"]
    assert final["id"].startswith("resp_") and "cost" not in final["usage"]


async def test_function_calls_pass_through(proxy, openai_api_schemas):
    client = proxy.client()
    response = await client.responses.create(model="quality", input="Weather in Paris?", tools=[WEATHER])
    openai_api_schemas.validate("Response", response.model_dump(exclude_unset=True))
    (call,) = response.output
    assert (call.type, call.name) == ("function_call", "get_weather")
    assert orjson.loads(call.arguments) == {"city": "emulated"}

    stream = await client.responses.create(model="quality", input="Weather in Oslo?", tools=[WEATHER], stream=True)
    arguments, done = "", None
    async for event in stream:
        check_event(openai_api_schemas, event.model_dump(exclude_unset=True))
        if event.type == "response.function_call_arguments.delta":
            arguments += event.delta
        if event.type == "response.function_call_arguments.done":
            done = event
    assert done is not None and done.arguments == arguments == '{"city":"emulated"}'

    answer = await client.responses.create(
        model="quality",
        input=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees"},
        ],
        tools=[WEATHER],
    )
    assert answer.output_text == f"[{SONNET}] The tool said: Sunny, 21 degrees"  # the agent loop ends


async def test_falls_back_to_the_next_member_after_a_503(proxy, emulator):
    emulator.state.faults.set(SONNET, Fault(status=503))
    raw = await proxy.client().responses.with_raw_response.create(model="quality", input="Hi")
    assert raw.parse().model == MINI
    assert raw.headers["x-proxy-route"] == f"quality: {SONNET}=http_503,http_503 {MINI}=ok"
    assert raw.headers["x-proxy-attempts"] == "3"
    assert [r.model for r in emulator.state.requests] == [SONNET, SONNET, MINI]

    stream = await proxy.client().responses.create(model="quality", input="Hi", stream=True)
    models = {event.response.model async for event in stream if event.type == "response.completed"}
    assert models == {MINI}


async def test_the_chain_failing_is_a_502_in_openais_shape(proxy, emulator, openai_api_schemas):
    emulator.state.faults.set("*", Fault(status=503))
    status, headers, body = await post(proxy, {"model": "cheap", "input": "Hi"})
    assert status == 502 and headers["x-proxy-attempts"] == "4"
    openai_api_schemas.validate("ErrorResponse", orjson.loads(body))


async def test_rules_route_on_what_a_responses_request_says(proxy, emulator):
    client = proxy.client()
    coding = await client.responses.create(
        model="auto", input="Write a sort.", extra_headers={"X-Task-Type": "code_generation"}
    )
    tagged = await client.responses.create(model="auto", input="Write a sort.", metadata={"task": "code_generation"})
    long = await client.responses.create(model="auto", input=[{"role": "user", "content": "word " * 600}])
    about = await client.responses.create(
        model="auto",
        input=[
            {"role": "user", "content": "Tell me about the lighthouse."},
            {"role": "assistant", "content": [{"type": "output_text", "text": "It stands on a rock."}]},
            {"role": "user", "content": [{"type": "input_text", "text": "And its keeper?"}]},
        ],
    )
    keeper = await client.responses.create(
        model="auto", input=[{"role": "user", "content": [{"type": "input_text", "text": "The LIGHTHOUSE keeper?"}]}]
    )
    models = [r.model for r in (coding, tagged, long, about, keeper)]
    assert models == ["x-ai/grok-code-fast-1", "x-ai/grok-code-fast-1", "google/gemini-2.5-flash", MISTRAL, SONNET]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"prompt": {"id": "pmpt_123"}}, "prompt"),
        ({"background": True}, "background"),
        ({"input": None}, "input"),
        ({"input": []}, "input"),
        ({"input": ["not an item"]}, "input"),
        ({"stream": "yes"}, "stream"),
    ],
)
async def test_requests_it_cannot_serve_are_refused_naming_the_parameter(
    proxy, emulator, openai_api_schemas, fields, param
):
    status, headers, body = await post(proxy, {"model": "cheap", "input": "Hi", **fields})
    assert status == 400
    payload = orjson.loads(body)
    openai_api_schemas.validate("ErrorResponse", payload)
    assert payload["error"]["param"] == param and headers["x-proxy-attempts"] == "0"
    assert emulator.state.requests == []


async def test_a_stateful_request_is_refused_by_the_sdk_as_a_bad_request(proxy):
    with pytest.raises(openai.BadRequestError) as refused:
        await proxy.client().responses.create(model="cheap", input="And then?", previous_response_id="resp_1")
    assert "stateless" in refused.value.message and refused.value.param == "previous_response_id"


async def test_a_client_key_only_reaches_its_models(make_proxy, emulator):
    env = {"TEST_OPENROUTER_KEY": "sk-or-test-upstream-secret-0123456789", "APP_KEY": "app-secret"}
    proxy = await make_proxy(MODELS, extra="keys:\n  - {name: app, key_env: APP_KEY, models: [cheap]}\n", env=env)
    client = proxy.client(api_key="app-secret")
    assert (await client.responses.create(model="cheap", input="Hi")).model == MISTRAL
    with pytest.raises(openai.PermissionDeniedError):
        await client.responses.create(model="quality", input="Hi")
    with pytest.raises(openai.AuthenticationError):
        await proxy.client(api_key="wrong").responses.create(model="cheap", input="Hi")
    assert [r.model for r in emulator.state.requests] == [MISTRAL]


async def test_the_readmes_example_runs_as_written(proxy):
    """The README's Responses example, run with the synchronous SDK it shows (in a thread, so the
    proxy keeps serving on this loop)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Responses (`POST /v1/responses`)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    printed = io.StringIO()

    def run() -> None:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused-without-proxy-keys", max_retries=0)
        with contextlib.redirect_stdout(printed):
            exec(code, {"client": client})

    await asyncio.to_thread(run)
    assert printed.getvalue() == f"[{MISTRAL}] You said: Write a haiku about retries {MISTRAL}\n"


async def test_a_codex_style_agent_turn(proxy, emulator, openai_api_schemas):
    """What Codex sends (shape from a captured request): typed input items with a developer message,
    an encrypted reasoning item, a function call and its output; `store: false`, `include`,
    `reasoning`, `prompt_cache_key`, `text.verbosity`. It all reaches the upstream untouched but
    for the model, and the answer streams back."""
    shell = {
        "type": "function",
        "name": "exec_command",
        "description": "Runs a command in a PTY.",
        "strict": False,
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
    }
    body = {
        "model": "auto",
        "instructions": "You are a coding agent running in a terminal.",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions/>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAAABqjM81Q9Wo" * 40},
            {"type": "function_call", "call_id": "call_1", "name": "exec_command", "arguments": '{"cmd":"ls"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "README.md proxy tests"},
        ],
        "tools": [shell],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "high", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0a1b2c",
        "text": {"verbosity": "low"},
    }
    status, headers, raw = await post(proxy, {**body}, "/v1/responses")
    assert status == 200 and headers["x-proxy-model"] == MISTRAL
    events = [data for _, data in events_of(raw)]
    for event in events:
        check_event(openai_api_schemas, event)
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == f"[{MISTRAL}] The tool said: README.md proxy tests"
    assert emulator.state.requests[-1].body == {**body, "model": MISTRAL}


async def test_a_wrong_method_or_path_names_the_responses_route(proxy, openai_api_schemas):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/v1/responses") as response:
            assert response.status == 405 and response.headers["Allow"] == "POST"
        async with session.post(f"{proxy.url}/v1/respond", json={}) as response:
            assert response.status == 404
            payload = await response.json()
    openai_api_schemas.validate("ErrorResponse", payload)
    assert "POST /v1/responses" in payload["error"]["message"]
