"""Streams: true pass-through, failures before and after the first byte, client disconnects, and
what an OpenAI-style stream (role only in the first delta, `"usage": null` in every chunk) bills."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from proxy.emulator import Fault, load_default_catalogue
from tests.support.gateway import proxy_config_text
from tests.support.money import ledger_rows

HELLO = [{"role": "user", "content": "Tell me a story about a lighthouse keeper and a storm."}]
OPENAI_CHAIN = "models: {oa: {chain: [{model: gpt-4o-mini, upstream: openai}]}}"


async def test_failure_before_the_first_byte_falls_back(proxy, emulator, schemas):
    emulator.state.faults.set("google/gemini-2.5-flash", Fault(status=503))
    raw = await proxy.client().chat.completions.with_raw_response.create(model="balanced", messages=HELLO, stream=True)
    assert raw.headers["x-proxy-model"] == "deepseek/deepseek-v3.2"
    models = set()
    async for chunk in raw.parse():
        schemas.validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        models.add(chunk.model)
    assert models == {"deepseek/deepseek-v3.2"}


async def test_midstream_error_is_forwarded_and_the_stream_ends(proxy, emulator, schemas):
    emulator.state.faults.set("google/gemini-2.5-flash", Fault(midstream_error=True, after_chunks=2))
    stream = await proxy.client().chat.completions.create(model="balanced", messages=HELLO, stream=True)
    received = []
    try:
        async for chunk in stream:
            schemas.validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
            received.append(chunk)
    except openai.APIError as exc:
        error = exc
    else:
        raise AssertionError("the SDK should have raised on the error chunk")
    assert len(received) >= 2
    assert error.message
    assert [r.model for r in emulator.state.requests] == ["google/gemini-2.5-flash"]  # no fallback after the first byte


async def test_dropped_stream_after_first_byte_ends_with_an_error_event(proxy, emulator, aiohttp_client):
    emulator.state.faults.set("google/gemini-2.5-flash", Fault(drop_midstream=True, after_chunks=2))
    http = await aiohttp_client(proxy.server)
    response = await http.post("/v1/chat/completions", json={"model": "balanced", "messages": HELLO, "stream": True})
    assert response.status == 200
    body = await response.text()
    events = [e for e in body.split("\n\n") if e]
    assert '"code":"stream_interrupted"' in events[-2]
    assert events[-1] == "data: [DONE]"


@pytest.mark.realtime  # the emulator's latency and chunk pacing over real sockets
async def test_events_arrive_as_they_are_produced(proxy, emulator, aiohttp_client):
    """Nothing is buffered: with a pause between upstream chunks, the client sees them spread out."""
    emulator.state.faults.set("google/gemini-2.5-flash", Fault(chunk_delay_s=0.15))
    http = await aiohttp_client(proxy.server)
    response = await http.post("/v1/chat/completions", json={"model": "balanced", "messages": HELLO, "stream": True})
    arrivals = []
    buffer = b""
    async for piece in response.content.iter_any():
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event.startswith(b"data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) >= 4
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(gap >= 0.1 for gap in gaps) >= len(gaps) // 2


@pytest.mark.realtime  # the emulator's latency and chunk pacing over real sockets
async def test_processing_comments_are_passed_through(proxy, emulator, aiohttp_client):
    emulator.state.faults.set("google/gemini-2.5-flash", Fault(latency_s=0.35))
    http = await aiohttp_client(proxy.server)
    response = await http.post("/v1/chat/completions", json={"model": "balanced", "messages": HELLO, "stream": True})
    body = await response.text()
    assert body.startswith(": OPENROUTER PROCESSING\n\n")
    assert body.endswith("data: [DONE]\n\n")


@pytest.mark.realtime  # the emulator's latency and chunk pacing over real sockets
async def test_client_disconnect_cancels_the_upstream_request(proxy, emulator, caplog):
    caplog.set_level(logging.INFO, logger="orproxy")
    emulator.state.faults.set("google/gemini-2.5-flash", Fault(chunk_delay_s=0.2))
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{proxy.url}/v1/chat/completions", json={"model": "balanced", "messages": HELLO, "stream": True}
        )
        await response.content.readuntil(b"data: {")
        response.close()  # hang up mid-stream
    for _ in range(40):
        if emulator.state.stats["streams_cancelled"] == 1:
            break
        await asyncio.sleep(0.05)
    assert emulator.state.stats["streams_cancelled"] == 1
    assert emulator.state.stats["streams_completed"] == 0
    assert "unexpected error" not in caplog.text
    assert "client_disconnected" in caplog.text  # the access log says what happened


def gpt_4o_mini_cost(prompt_tokens: int, completion_tokens: int) -> float:
    """What the proxy's catalogue charges for gpt-4o-mini (an OpenAI-style usage has no `cost`)."""
    pricing = next(m for m in load_default_catalogue()["data"] if m["id"] == "gpt-4o-mini")["pricing"]
    return prompt_tokens * float(pricing["prompt"]) + completion_tokens * float(pricing["completion"])


async def collect(stream, schemas, chunks: list[dict[str, Any]]) -> None:
    """Read a stream with the SDK into `chunks` (kept when it raises), each checked against the schema."""
    async for chunk in stream:
        dumped = chunk.model_dump(exclude_unset=True)
        schemas.validate("CreateChatCompletionStreamResponse", dumped)
        chunks.append(dumped)


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])


def assert_openai_shaped(chunks: list[dict[str, Any]]) -> None:
    """What the old tracker could not bill: `"usage": null` in every chunk, the role in the first only."""
    with_choices = [chunk for chunk in chunks if chunk["choices"]]
    assert all("usage" in chunk and chunk["usage"] is None for chunk in with_choices)
    assert ["role" in chunk["choices"][0]["delta"] for chunk in with_choices] == [True] + [False] * (
        len(with_choices) - 1
    )
    assert all("provider" not in chunk for chunk in chunks)


async def test_an_openai_style_stream_cut_midway_is_billed_from_the_text_the_client_received(
    make_proxy, emulator, schemas, tmp_path
):
    ledger = tmp_path / "cut.sqlite3"
    proxy = await make_proxy(OPENAI_CHAIN, ledger_path=ledger)
    emulator.state.faults.set("gpt-4o-mini", Fault(drop_midstream=True, after_chunks=3))
    stream = await proxy.client().chat.completions.create(model="oa", messages=HELLO, stream=True)
    received: list[dict[str, Any]] = []
    with pytest.raises(openai.APIError) as broken:
        await collect(stream, schemas, received)
    assert broken.value.code == "stream_interrupted"
    (seen,) = emulator.state.requests
    assert seen.path == "/v1/chat/completions" and seen.body["stream_options"] == {"include_usage": True}
    assert len(received) == 4  # the role chunk and three pieces of text
    assert_openai_shaped(received)
    text = text_of(received)
    (row,) = await ledger_rows(ledger)  # committed before the error event went out
    assert (row.model, row.upstream, row.streamed, row.status) == ("gpt-4o-mini", "openai", True, 200)
    assert row.error == "stream_interrupted" and row.cost_source == "estimate"
    assert row.generation_id == received[0]["id"] and row.ttft_s is not None
    assert row.completion_tokens == -(-len(text.encode()) // 4) > 0  # ~4 bytes a token of what was sent
    assert row.cost_usd == pytest.approx(gpt_4o_mini_cost(row.prompt_tokens, row.completion_tokens))
    assert row.cost_usd > 0


@pytest.mark.parametrize("asked", [True, False])
async def test_an_openai_style_stream_is_billed_from_its_usage_chunk(make_proxy, emulator, schemas, tmp_path, asked):
    """The proxy always asks an OpenAI-style upstream for usage; the client sees the usage chunk only
    when it asked for it (`stream_options.include_usage`), as from OpenAI itself."""
    ledger = tmp_path / "whole.sqlite3"
    proxy = await make_proxy(OPENAI_CHAIN, ledger_path=ledger)
    received: list[dict[str, Any]] = []
    options = {"stream_options": {"include_usage": True}} if asked else {}
    await collect(
        await proxy.client().chat.completions.create(model="oa", messages=HELLO, stream=True, **options),
        schemas,
        received,
    )
    (seen,) = emulator.state.requests
    assert seen.body["stream_options"] == {"include_usage": True}
    assert_openai_shaped(received)
    (row,) = await ledger_rows(ledger)
    if asked:
        usage = received[-1]["usage"]
        assert received[-1]["choices"] == [] and usage["completion_tokens"] > 0
        assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    else:
        assert all(chunk["choices"] for chunk in received)  # a naive `chunk.choices[0]` loop runs clean
    assert row.error is None and row.cost_source == "catalogue"
    assert row.cost_usd == pytest.approx(gpt_4o_mini_cost(row.prompt_tokens, row.completion_tokens))
    assert row.completion_tokens == -(-len(text_of(received)) // 4) > 0  # the emulator's own count agrees


def openai_event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-crlf",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": choices,
        "usage": usage,
    }
    return b"data: " + orjson.dumps(chunk) + b"\r\n\r\n"


def delta_event(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return openai_event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])


CRLF_TEXT = ["灯台", " keeper 🌊"]
CRLF_EVENTS = [
    b": keep-alive\r\n\r\n",
    delta_event({"role": "assistant", "content": "", "refusal": None}),
    *(delta_event({"content": piece}) for piece in CRLF_TEXT),
    delta_event({}, "stop"),
    openai_event([], {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}),
]


def trickling_upstream(stream: bytes, piece: int = 7) -> web.Application:
    """An OpenAI-style upstream sending `stream` a few bytes at a time, so events and CRLFs are
    split across network reads at odd places."""

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for start in range(0, len(stream), piece):
            await response.write(stream[start : start + piece])
            await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


@pytest.mark.parametrize("cut", [False, True])
async def test_a_crlf_stream_in_small_reads_is_relayed_untouched_and_billed(
    make_proxy, aiohttp_server, aiohttp_client, tmp_path, cut
):
    whole = b"".join(CRLF_EVENTS)
    # Cut: the upstream closes half-way into the finish event, after all the text.
    stream = whole[: len(whole) - len(CRLF_EVENTS[-1]) - 10] if cut else whole + b"data: [DONE]\r\n\r\n"
    upstream = await aiohttp_server(trickling_upstream(stream))
    ledger = tmp_path / "crlf.sqlite3"
    proxy = await make_proxy(
        config_text=proxy_config_text(str(upstream.make_url("")).rstrip("/"), OPENAI_CHAIN), ledger_path=ledger
    )
    http = await aiohttp_client(proxy.server)
    asked = {"stream_options": {"include_usage": True}}  # so the usage chunk is the client's too
    response = await http.post("/v1/chat/completions", json={"model": "oa", "messages": HELLO, "stream": True, **asked})
    body = await response.read()
    complete = b"".join(CRLF_EVENTS[:-2]) if cut else whole  # the events that arrived whole
    assert body.startswith(complete) and body.endswith(b"data: [DONE]\n\n")
    (row,) = await ledger_rows(ledger)
    if cut:
        assert b'"code":"stream_interrupted"' in body[len(complete) :]
        text_bytes = len("".join(CRLF_TEXT).encode())  # 6 + 12: CJK and emoji as UTF-8
        assert (row.error, row.cost_source, row.completion_tokens) == ("stream_interrupted", "estimate", 5)
        assert row.completion_tokens == -(-text_bytes // 4)
    else:
        assert body == whole + b"data: [DONE]\n\n"
        assert (row.error, row.cost_source, row.prompt_tokens, row.completion_tokens) == (None, "catalogue", 11, 5)
    assert row.generation_id == "chatcmpl-crlf" and row.ttft_s is not None
