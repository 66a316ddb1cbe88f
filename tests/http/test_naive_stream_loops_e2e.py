"""The simplest client loop over a chat stream, `chunk.choices[0].delta`, runs clean: OpenRouter
always ends a stream with a usage chunk whose `choices` is empty, and the proxy asks an OpenAI-style
upstream for one too (an unbilled stream is money lost); neither reaches a client that did not ask
for it, on either kind of upstream, and an explicit `include_usage: false` is honoured."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.audit import billed_nano, booked_nano, settled

MODELS = """
models:
  cheap: {chain: [mistralai/mistral-7b-instruct]}
  oa: {chain: [{model: gpt-4o-mini, upstream: openai}]}
"""
STORY = [{"role": "user", "content": "Tell me a story about a lighthouse keeper and a storm at sea."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize("options", [None, {"include_usage": False}], ids=["unasked", "include_usage-false"])
@pytest.mark.parametrize("model", ["cheap", "oa"])  # OpenRouter's wire shape, and OpenAI's
async def test_a_naive_choices0_loop_over_a_chat_stream_runs_clean(make_proxy, emulator, schemas, model, options):
    proxy = await make_proxy(MODELS)
    client = proxy.client()
    extra: dict[str, Any] = {} if options is None else {"stream_options": options}
    stream = await client.chat.completions.create(model=model, messages=STORY, stream=True, **extra)
    text = ""
    async for chunk in stream:  # IndexError here if a `"choices": []` chunk came through
        schemas.validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        text += chunk.choices[0].delta.content or ""
        assert chunk.usage is None
    calls = await client.chat.completions.create(model=model, messages=STORY, stream=True, tools=[WEATHER])
    names = [
        chunk.choices[0].delta.tool_calls[0].function.name async for chunk in calls if chunk.choices[0].delta.tool_calls
    ]
    whole = await client.chat.completions.create(model=model, messages=STORY)
    assert text == whole.choices[0].message.content and names[0] == "get_weather"
    streamed = emulator.state.requests[0].body
    if model == "oa":  # asked of the upstream all the same, for the bill
        assert streamed["stream_options"] == {"include_usage": True}
    rows = await settled(proxy)
    assert [r.cost_source for r in rows[:2]] == ["upstream" if model == "cheap" else "catalogue"] * 2
    assert rows[0].cost_usd == rows[2].cost_usd > 0  # billed from the usage chunk the client never saw
    assert booked_nano(rows) == billed_nano(emulator)
