"""Streams: true pass-through, failures before and after the first byte, client disconnects."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import aiohttp
import openai

from proxy.emulator import Fault

HELLO = [{"role": "user", "content": "Tell me a story about a lighthouse keeper and a storm."}]


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


async def test_processing_comments_are_passed_through(proxy, emulator, aiohttp_client):
    emulator.state.faults.set("google/gemini-2.5-flash", Fault(latency_s=0.35))
    http = await aiohttp_client(proxy.server)
    response = await http.post("/v1/chat/completions", json={"model": "balanced", "messages": HELLO, "stream": True})
    body = await response.text()
    assert body.startswith(": OPENROUTER PROCESSING\n\n")
    assert body.endswith("data: [DONE]\n\n")


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
