"""Pure SSE decoding and stream metering, as tables: the wire shapes of OpenAI and OpenRouter,
framings, reads split at every byte, oversize events, and what each stream bills."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.core.record import RequestRecord, Usage, billed_tokens
from proxy.core.sse import Batch, EventTooLarge, SseDecoder
from proxy.core.stream_meter import StreamMeter

LIMIT = 1 << 20
STARTED = 100.0
NULL = object()  # "usage": null, as OpenAI sends it in every chunk when usage is asked for


# ---------------------------------------------------------------- wire shapes


def openai_chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = NULL) -> bytes:
    """One chunk as OpenAI sends it; `usage=None` leaves the field out (include_usage not asked)."""
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "service_tier": "default",
        "system_fingerprint": "fp_1",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        chunk["usage"] = None if usage is NULL else usage
    chunk["obfuscation"] = "Qx7"
    return orjson.dumps(chunk)


def openrouter_chunk(
    delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, Any] | None = None, **extra: Any
) -> bytes:
    chunk: dict[str, Any] = {
        "id": "gen-1",
        "provider": "OpenAI",
        "model": "openai/gpt-4o-mini",
        "object": "chat.completion.chunk",
        "created": 1,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish, "native_finish_reason": finish, "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return orjson.dumps({**chunk, **extra})


OPENAI_USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
OPENROUTER_USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, "cost": 0.00042}
ROLE = {"role": "assistant", "content": "", "refusal": None}

OPENAI_WITH_USAGE = [
    openai_chunk(ROLE),
    openai_chunk({"content": "Hello"}),
    openai_chunk({"content": " wörld"}),
    openai_chunk({}, "stop"),
    openai_chunk(None, usage=OPENAI_USAGE),
]
OPENAI_WITHOUT_USAGE = [
    openai_chunk(ROLE, usage=None),
    openai_chunk({"content": "Hello"}, usage=None),
    openai_chunk({"content": " wörld"}, usage=None),
    openai_chunk({}, "stop", usage=None),
]
OPENROUTER_FINAL_USAGE = [
    openrouter_chunk({"role": "assistant", "content": ""}),
    openrouter_chunk({"role": "assistant", "content": "Hello"}),
    openrouter_chunk({"role": "assistant", "content": " wörld"}),
    openrouter_chunk({"role": "assistant", "content": ""}, "stop"),
    openrouter_chunk(None, usage=OPENROUTER_USAGE),
]
OPENROUTER_USAGE_ON_FINISH = [
    openrouter_chunk({"role": "assistant", "content": ""}),
    openrouter_chunk({"role": "assistant", "content": "Hello"}),
    openrouter_chunk({"role": "assistant", "content": " wörld"}),
    openrouter_chunk({"role": "assistant", "content": ""}, "stop", usage=OPENROUTER_USAGE),
]
TEXT_BYTES = len("Hello wörld".encode())  # 12: ö is two bytes
COMMENT = b": OPENROUTER PROCESSING"


def sse(*events: bytes, crlf: bool = False) -> bytes:
    """A stream: each item is an event's lines (`data: ...` is added to JSON payloads), then [DONE]."""
    end = b"\r\n" if crlf else b"\n"
    lines = [event if event.startswith(b":") else b"data: " + event for event in events]
    return b"".join(line.replace(b"\n", end) + end + end for line in [*lines, b"data: [DONE]"])


# ---------------------------------------------------------------- decoding


def decode(pieces: list[bytes], limit: int = LIMIT) -> tuple[bytes, list[bytes], bool]:
    """(forwarded bytes, event data, done) of a stream fed as these network reads."""
    decoder = SseDecoder(limit)
    raw, events, done = b"", [], False
    for piece in pieces:
        batch = decoder.feed(piece)
        raw += batch.raw
        events += batch.events
        done = done or batch.done
    return raw, events, done


def splits(stream: bytes) -> list[list[bytes]]:
    """The stream as one read, as two reads split at every byte position, and one byte a read."""
    return [
        [stream],
        *([stream[:cut], stream[cut:]] for cut in range(1, len(stream))),
        [stream[i : i + 1] for i in range(len(stream))],
    ]


STREAMS = {
    "openai include_usage": (sse(*OPENAI_WITH_USAGE), OPENAI_WITH_USAGE),
    "openai no usage": (sse(*OPENAI_WITHOUT_USAGE), OPENAI_WITHOUT_USAGE),
    "openrouter with comments": (
        sse(COMMENT, COMMENT, *OPENROUTER_FINAL_USAGE[:2], COMMENT, *OPENROUTER_FINAL_USAGE[2:]),
        OPENROUTER_FINAL_USAGE,
    ),
    "openrouter usage on finish": (sse(*OPENROUTER_USAGE_ON_FINISH), OPENROUTER_USAGE_ON_FINISH),
    "openai CRLF": (sse(*OPENAI_WITH_USAGE, crlf=True), OPENAI_WITH_USAGE),
    "openrouter CRLF with comments": (
        sse(COMMENT, *OPENROUTER_FINAL_USAGE, crlf=True),
        OPENROUTER_FINAL_USAGE,
    ),
    "multi-line data": (sse(b'{"a":\ndata: 1}', b"x\ndata:\ndata: y"), [b'{"a":\n1}', b"x\n\ny"]),
}


@pytest.mark.parametrize(("stream", "expected"), STREAMS.values(), ids=STREAMS.keys())
def test_every_split_of_a_stream_decodes_to_the_same_events_and_bytes(stream, expected):
    head = stream[: stream.rindex(b"data: [DONE]")]  # the relay sends its own [DONE] after settling
    for pieces in splits(stream):
        assert decode(pieces) == (head, expected, True), [len(p) for p in pieces]


FRAMINGS = [
    # (bytes of one read or more, forwarded bytes, data of the events, done)
    (b"data: x\n\n", b"data: x\n\n", [b"x"], False),
    (b"data:x\n\n", b"data:x\n\n", [b"x"], False),
    (b"data:  x\n\n", b"data:  x\n\n", [b" x"], False),  # only one space after the colon is framing
    (b"data: a\ndata: b\n\n", b"data: a\ndata: b\n\n", [b"a\nb"], False),
    (b"data: a\r\ndata: b\r\n\r\n", b"data: a\r\ndata: b\r\n\r\n", [b"a\nb"], False),
    (b"data: x\n\ndata: y\r\n\r\n", b"data: x\n\ndata: y\r\n\r\n", [b"x", b"y"], False),  # LF, then CRLF
    (b": keep-alive\n\n", b": keep-alive\n\n", [], False),
    (b": a comment line\ndata: x\n\n", b": a comment line\ndata: x\n\n", [b"x"], False),
    (b"event: message\nid: 7\nretry: 10\ndata: x\n\n", b"event: message\nid: 7\nretry: 10\ndata: x\n\n", [b"x"], False),
    (b"data\n\n", b"data\n\n", [], False),  # empty data dispatches nothing
    (b"data:\ndata:\n\n", b"data:\ndata:\n\n", [b"\n"], False),
    (b"\n\ndata: x\n\n\n\ndata: y\n\n", b"\n\ndata: x\n\n\n\ndata: y\n\n", [b"x", b"y"], False),
    (b"data: x\n\ndata: y", b"data: x\n\n", [b"x"], False),  # y waits for its blank line
    (b"data: x\r\n\r\ndata: y\r\n", b"data: x\r\n\r\n", [b"x"], False),
    (b"data: x\n\ndata: [DONE]\n\ndata: after\n\n", b"data: x\n\n", [b"x"], True),
    (b"data:[DONE]\n\n", b"", [], True),
    (b"data: [DONE]\r\n\r\n", b"", [], True),
    (b": c\n\ndata: [DONE]\n\n", b": c\n\n", [], True),
]


@pytest.mark.parametrize(("stream", "raw", "events", "done"), FRAMINGS)
def test_framing(stream, raw, events, done):
    for pieces in splits(stream):
        assert decode(pieces) == (raw, events, done), [len(p) for p in pieces]


@pytest.mark.parametrize(
    ("left_over", "pending"),
    [(b"", False), (b"data: x", True), (b"data: x\n", True), (b": c", True), (b"\n", False), (b"\r\n", False)],
)
def test_pending_says_whether_a_stream_ending_now_was_cut_mid_event(left_over, pending):
    decoder = SseDecoder(LIMIT)
    decoder.feed(b"data: x\n\n" + left_over)
    assert decoder.pending is pending


def test_nothing_after_done_is_read():
    decoder = SseDecoder(LIMIT)
    assert decoder.feed(b"data: [DONE]\n\ndata: x")[:3] == (b"", [], True)
    assert decoder.feed(b"\n\ndata: y\n\n")[:3] == (b"", [], True)
    assert not decoder.pending


EVENT = b"data: " + b"x" * 10 + b"\n\n"  # 18 bytes with its blank line


@pytest.mark.parametrize(
    ("pieces", "limit", "refused"),
    [
        ([EVENT], 18, False),
        ([EVENT], 17, True),  # whole in one read: still too large
        ([EVENT[:9], EVENT[9:]], 17, True),
        ([EVENT[:9], EVENT[9:]], 18, False),
        ([b"data: " + b"x" * 30], 17, True),  # refused while it grows, before its end comes
        ([b"data: x\n\n" * 50], 17, False),  # many small events in one large read are fine
        ([EVENT.replace(b"\n", b"\r\n")], 19, True),
        ([EVENT.replace(b"\n", b"\r\n")], 20, False),
    ],
)
def test_an_event_over_the_limit_is_refused(pieces, limit, refused):
    if refused:
        with pytest.raises(EventTooLarge, match=f"the limit is {limit}"):
            decode(pieces, limit)
    else:
        assert decode(pieces, limit)[1]


def test_a_large_event_over_many_reads_comes_out_whole():
    decoder = SseDecoder(LIMIT)
    body = b"data: " + b"y" * 100_000
    for offset in range(0, len(body), 1000):
        assert decoder.feed(body[offset : offset + 1000])[:3] == (b"", [], False)
    assert decoder.feed(b"\n\n")[:3] == Batch(body + b"\n\n", [b"y" * 100_000], False)[:3]


# ---------------------------------------------------------------- metering


def record() -> RequestRecord:
    return RequestRecord("r1", 0.0, "m", None, True, prompt_estimate=20, model="gpt-4o-mini")


def meter(events: list[bytes], times: list[float] | None = None) -> RequestRecord:
    target = record()
    stream_meter = StreamMeter(target, STARTED)
    for index, data in enumerate(events):
        stream_meter.see(data, times[index] if times else STARTED + 0.25 + index)
    return target


def delta(**fields: Any) -> bytes:
    return openai_chunk(fields)


METERED = {
    # name: (data of the events, usage (prompt, completion, cost) or None, text bytes, error)
    "openai include_usage": (OPENAI_WITH_USAGE, (9, 3, None), TEXT_BYTES, None),
    "openai include_usage, cut before the usage chunk": (OPENAI_WITH_USAGE[:-1], None, TEXT_BYTES, None),
    "openai include_usage, cut mid-text": (OPENAI_WITH_USAGE[:2], None, len(b"Hello"), None),
    "openai without include_usage": (OPENAI_WITHOUT_USAGE, None, TEXT_BYTES, None),
    "openai role-only first delta": (
        [delta(role="assistant"), delta(content="Hi"), delta(content=" there")],
        None,
        len(b"Hi there"),
        None,
    ),
    "openrouter usage on the final chunk": (OPENROUTER_FINAL_USAGE, (9, 3, 0.00042), TEXT_BYTES, None),
    "openrouter usage on the finish chunk": (OPENROUTER_USAGE_ON_FINISH, (9, 3, 0.00042), TEXT_BYTES, None),
    "openrouter cut before usage": (OPENROUTER_FINAL_USAGE[:3], None, TEXT_BYTES, None),
    "a null after the usage keeps it": ([*OPENAI_WITH_USAGE, openai_chunk({})], (9, 3, None), TEXT_BYTES, None),
    "reasoning then content": (
        [delta(role="assistant", content=""), delta(reasoning="Think."), delta(content="Answer.")],
        None,
        len(b"Think.Answer."),
        None,
    ),
    "reasoning_content": ([delta(reasoning_content="Hmm, "), delta(content="ok")], None, len(b"Hmm, ok"), None),
    "refusal": ([delta(role="assistant", refusal=""), delta(refusal="I can't help.")], None, 13, None),
    "tool-call arguments, not names or ids": (
        [
            delta(
                role="assistant",
                content=None,
                tool_calls=[
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
            ),
            delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city":'}}]),
            delta(tool_calls=[{"index": 0, "function": {"arguments": ' "Paris"}'}}]),
        ],
        None,
        len(b'{"city": "Paris"}'),
        None,
    ),
    "two tool calls in one delta": (
        [
            delta(
                tool_calls=[
                    {"index": 0, "function": {"arguments": "{}"}},
                    {"index": 1, "function": {"arguments": "[]"}},
                ]
            )
        ],
        None,
        4,
        None,
    ),
    "legacy function_call arguments": (
        [delta(function_call={"name": "f", "arguments": ""}), delta(function_call={"arguments": '{"a": 1}'})],
        None,
        8,
        None,
    ),
    "CJK counted as UTF-8 bytes": ([delta(content="你好"), delta(content="世界")], None, 12, None),
    "emoji counted as UTF-8 bytes": ([delta(content="👋🏽"), delta(content="!")], None, 9, None),
    "two choices (n=2)": (
        [
            orjson.dumps(
                {"choices": [{"index": 0, "delta": {"content": "ab"}}, {"index": 1, "delta": {"content": "cde"}}]}
            )
        ],
        None,
        5,
        None,
    ),
    "openrouter mid-stream error chunk": (
        [
            *OPENROUTER_FINAL_USAGE[:2],
            openrouter_chunk(
                {"content": ""}, "error", error={"code": "server_error", "message": "Provider disconnected"}
            ),
        ],
        None,
        len(b"Hello"),
        "upstream_stream_error",
    ),
    "openai error event": (
        [*OPENAI_WITH_USAGE[:2], b'{"error":{"message":"boom","type":"server_error","param":null,"code":null}}'],
        None,
        len(b"Hello"),
        "upstream_stream_error",
    ),
    "not JSON, not an object, odd shapes": (
        [
            b"not json",
            b"[1, 2]",
            b'{"choices": "x"}',
            b'{"choices": [1, {"delta": "x"}, {"delta": {"content": 5, "tool_calls": [1, {"function": 2}]}}]}',
            delta(content="ok"),
        ],
        None,
        2,
        None,
    ),
}


@pytest.mark.parametrize(("events", "usage", "text_bytes", "error"), METERED.values(), ids=METERED.keys())
def test_meter(events, usage, text_bytes, error):
    seen = meter(events)
    expected_usage = None if usage is None else Usage(*usage)
    assert (seen.usage, seen.streamed_text_bytes, seen.error) == (expected_usage, text_bytes, error)


@pytest.mark.parametrize(
    ("events", "generation_id", "provider"),
    [
        (OPENAI_WITH_USAGE, "chatcmpl-1", None),
        (OPENROUTER_FINAL_USAGE, "gen-1", "OpenAI"),
        ([b"not json", b"[]", *OPENROUTER_FINAL_USAGE], "gen-1", "OpenAI"),  # the first chunk that is one
    ],
)
def test_origin_and_time_to_first_token_come_from_the_first_chunk(events, generation_id, provider):
    times = [STARTED + 0.5 + index for index in range(len(events))]
    seen = meter(events, times)
    first_chunk = next(index for index, data in enumerate(events) if data.startswith(b"{"))
    assert (seen.generation_id, seen.provider) == (generation_id, provider)
    assert seen.ttft_s == pytest.approx(times[first_chunk] - STARTED)


@pytest.mark.parametrize(
    ("events", "tokens"),
    [
        (OPENAI_WITH_USAGE[:-1], (20, 3)),  # ceil(12 / 4): the bug billed 0, as every chunk has "usage": null
        (OPENAI_WITH_USAGE[:2], (20, 2)),  # ceil(5 / 4)
        (OPENAI_WITH_USAGE[:1], (20, 0)),  # the role chunk alone: no text yet
        (OPENAI_WITH_USAGE, (9, 3)),  # the upstream's own counts
    ],
)
def test_an_openai_stream_cut_short_is_billed_from_its_text(events, tokens):
    assert billed_tokens(meter(events))[:2] == tokens  # (prompt: the estimate of 20 without usage, completion)


@pytest.mark.parametrize(("stream", "expected"), STREAMS.values(), ids=STREAMS.keys())
def test_decoder_and_meter_bill_a_stream_the_same_however_it_is_read(stream, expected):
    whole = meter(expected)
    for pieces in splits(stream)[:: max(1, len(stream) // 40)]:  # a spread of split positions
        target = record()
        stream_meter, decoder = StreamMeter(target, STARTED), SseDecoder(LIMIT)
        for index, piece in enumerate(pieces):
            for data in decoder.feed(piece).events:
                stream_meter.see(data, STARTED + 0.25 + index)
        assert (target.usage, target.streamed_text_bytes, target.generation_id) == (
            whole.usage,
            whole.streamed_text_bytes,
            whole.generation_id,
        )


@pytest.mark.parametrize(
    "module, allowed",
    [
        # the decoder: `collections.abc` types its skim hook
        ("sse.py", {"__future__", "collections.abc", "typing"}),
        # the meter: `re` checks a JSON string's bytes
        ("stream_meter.py", {"__future__", "collections.abc", "re", "typing", "orjson", "proxy.core.record"}),
    ],
)
def test_the_stream_modules_are_pure(module, allowed):
    """No IO library, no other layer of the proxy, no clock: the caller passes the time in."""
    source = Path(__file__).resolve().parents[2] / "proxy" / "core" / module
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert imported == allowed
