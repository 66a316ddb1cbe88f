"""`StreamMeter.see_events` measures ordinary text chunks from their bytes instead of parsing them.
It must bill exactly as parsing every event (`see`, then `forward`) does: the same usage, text
bytes, error, generation id, provider, time to the first token and dropped usage chunks, for every
wire shape, every text a JSON string can hold, and bytes that only look like a chunk."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from proxy.core.apis.completions import CompletionsMeter
from proxy.core.record import RequestRecord
from proxy.core.sse import EventTooLarge, SseDecoder
from proxy.core.stream_meter import StreamMeter
from tests.core.test_sse import LIMIT, METERED, OPENROUTER_USAGE, STARTED, openai_chunk, openrouter_chunk, record

# Texts a JSON string may carry: escapes (quote, backslash, control characters, line breaks),
# multi-byte UTF-8, and text that spells the keys and values the fast path looks for.
TEXTS = [
    "Hello",
    "",
    " wörld",
    "你好",
    "👋🏽",
    "line\nbreak\r\n",
    'say "hi"',
    "back\\slash",
    "\\",
    "\\\\n",
    "tab\tand\bbell\x01\x1f",
    "\x7f",
    "a/b",
    "usage",
    "error",
    '"usage":{"prompt_tokens":1,"completion_tokens":1}',
    '{"error":{"message":"x"}}',
    "content",
    '","content":"',
    "\u2028\u2029",
]


def outcome(target: RequestRecord) -> tuple[Any, ...]:
    return (
        target.usage,
        target.streamed_text_bytes,
        target.error,
        target.generation_id,
        target.provider,
        target.ttft_s,
    )


def parsed(kind: type[StreamMeter], events: list[bytes], per_read: int, include_usage: bool) -> tuple[Any, ...]:
    """What the parsing path makes of the events, read `per_read` at a time."""
    target = record()
    meter = kind(target, STARTED, include_usage=include_usage)
    dropped = [
        index
        for index, data in enumerate(events)
        if not meter.forward(meter.see(data, STARTED + 1 + index // per_read))
    ]
    return *outcome(target), dropped


def skimmed(kind: type[StreamMeter], events: list[bytes], per_read: int, include_usage: bool) -> tuple[Any, ...]:
    target = record()
    meter = kind(target, STARTED, include_usage=include_usage)
    dropped: list[int] = []
    for start in range(0, len(events), per_read):
        read = events[start : start + per_read]
        dropped += [start + index for index in meter.see_events(read, STARTED + 1 + start // per_read)]
    return *outcome(target), dropped


def assert_same(events: list[bytes], kind: type[StreamMeter] = StreamMeter) -> None:
    for per_read in (1, 3, len(events) or 1):
        for include_usage in (True, False):
            assert skimmed(kind, events, per_read, include_usage) == parsed(kind, events, per_read, include_usage)


@pytest.mark.parametrize("events", [case[0] for case in METERED.values()], ids=METERED.keys())
def test_every_metered_stream_bills_the_same_skimmed(events):
    assert_same(events)


def openrouter_stream(texts: list[str], usage: bool = True) -> list[bytes]:
    body = [openrouter_chunk({"role": "assistant", "content": text}) for text in texts]
    tail = [openrouter_chunk({"role": "assistant", "content": ""}, "stop")]
    if usage:
        tail.append(openrouter_chunk(None, usage=OPENROUTER_USAGE))
    return [openrouter_chunk({"role": "assistant", "content": ""}), *body, *tail]


def ascii_escaped(events: list[bytes]) -> list[bytes]:
    """The same chunks as an upstream on Python's json module writes them (`\\uXXXX` for non-ASCII)."""
    return [json.dumps(orjson.loads(data), separators=(",", ":")).encode() for data in events]


STREAMS = {
    "openrouter, every text": openrouter_stream(TEXTS),
    "openrouter, cut before its usage": openrouter_stream(TEXTS, usage=False),
    "openrouter, cut mid-text": openrouter_stream(TEXTS, usage=False)[:9],
    "openrouter, \\u escapes": ascii_escaped(openrouter_stream(TEXTS, usage=False)),
    "openrouter, spaced JSON": [
        json.dumps(orjson.loads(data)).encode() for data in openrouter_stream(TEXTS, usage=False)
    ],
    "openai, every text": [
        openai_chunk({"role": "assistant", "content": "", "refusal": None}),
        *(openai_chunk({"content": text}) for text in TEXTS),
        openai_chunk({}, "stop"),
    ],
    "reasoning, then content, then a refusal": [
        openrouter_chunk({"role": "assistant", "content": ""}),
        *(openrouter_chunk({"role": "assistant", "content": "", "reasoning": text}) for text in TEXTS[:6]),
        *(openrouter_chunk({"role": "assistant", "content": text}) for text in TEXTS[:6]),
        *(openrouter_chunk({"role": "assistant", "refusal": text}) for text in TEXTS[:6]),
    ],
    "text, a tool call, text": [
        openrouter_chunk({"role": "assistant", "content": "a"}),
        openrouter_chunk({"role": "assistant", "content": "b"}),
        openrouter_chunk({"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}),
        openrouter_chunk({"role": "assistant", "content": "c"}),
    ],
    "a text chunk then one with usage and one with an error": [
        openrouter_chunk({"role": "assistant", "content": "a"}),
        openrouter_chunk({"role": "assistant", "content": "b"}),
        openrouter_chunk({"role": "assistant", "content": "c"}, usage=OPENROUTER_USAGE),
        openrouter_chunk({"role": "assistant", "content": "d"}, error={"message": "x"}),
        openrouter_chunk({"role": "assistant", "content": "e"}),
    ],
    "not JSON, not objects, between text chunks": [
        b"[1]",
        openrouter_chunk({"role": "assistant", "content": "a"}),
        b"not json",
        openrouter_chunk({"role": "assistant", "content": "b"}),
        b"null",
        openrouter_chunk({"role": "assistant", "content": "c"}),
    ],
}


@pytest.mark.parametrize("events", STREAMS.values(), ids=STREAMS.keys())
def test_streams_bill_the_same_skimmed(events):
    assert_same(events)


# Raw bytes put where a text chunk's text goes: what is no JSON string, or a different chunk.
HOSTILE = {
    "invalid UTF-8": b"caf\xc3",
    "a surrogate in UTF-8": b"\xed\xa0\x80",
    "a raw control character": b"a\x01b",
    "a raw line break": b"a\nb",
    "an unknown escape": b"a\\qb",
    "a lone backslash at the end": b"ab\\",
    "\\u escapes": b"\\u00e9\\ud83d\\udc4b",
    "a lone surrogate escape": b"\\ud800",
    "an escaped slash": b"a\\/b",
    "a second text field": b'x","reasoning":"yyyy',
    "a usage object": b'x"}}],"usage":{"prompt_tokens":5,"completion_tokens":7},"z":[{"a":{"b":"',
    "an error": b'x"}}],"error":{"message":"boom"},"z":[{"a":{"b":"',
    "a quote": b'a"b',
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_bytes_that_are_not_a_plain_text_chunk_are_parsed(text):
    before, after = openrouter_chunk({"role": "assistant", "content": "\0"}).split(b"\\u0000")
    events = [
        openrouter_chunk({"role": "assistant", "content": ""}),
        openrouter_chunk({"role": "assistant", "content": "a"}),
        before + text + after,
        openrouter_chunk({"role": "assistant", "content": "b"}),
        before + after[1:],  # the bytes around the text overlapping: `"content":"}...`
        openrouter_chunk({"role": "assistant", "content": "c"}),
    ]
    assert_same(events)


def completions_chunk(text: Any, **fields: Any) -> bytes:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": None, **fields}
    return orjson.dumps({"id": "gen-1", "object": "text_completion", "provider": "Mistral", "choices": [choice]})


def test_legacy_completions_bill_the_same_skimmed():
    events = [
        *(completions_chunk(text) for text in TEXTS),
        completions_chunk(None),
        completions_chunk("a", delta={"content": "bc"}),  # chat's delta counts too
        completions_chunk("tail"),
        orjson.dumps({"id": "gen-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}),
    ]
    assert_same(events, CompletionsMeter)
    assert_same(events[:-1], CompletionsMeter)


class CountingOrjson:
    """orjson, counting the events parsed."""

    JSONDecodeError = orjson.JSONDecodeError

    def __init__(self) -> None:
        self.parsed = 0

    def loads(self, data: bytes) -> Any:
        self.parsed += 1
        return orjson.loads(data)


def test_a_long_stream_parses_its_first_text_chunk_and_its_usage_only(monkeypatch):
    counting = CountingOrjson()
    monkeypatch.setattr("proxy.core.stream_meter.orjson", counting)
    events = openrouter_stream([f"word {n} wörd\n" for n in range(1000)])
    target = record()
    meter = StreamMeter(target, STARTED)
    for start in range(0, len(events), 7):
        meter.see_events(events[start : start + 7], STARTED + 1)
    # the opening chunk (its shape is the text chunks'), the finish chunk, the usage chunk
    assert counting.parsed == 3
    assert target.streamed_text_bytes == sum(len(f"word {n} wörd\n".encode()) for n in range(1000))


# ---------------------------------------------------------------- runs of events left uncut by the decoder


def relayed(stream: bytes, reads: list[int], include_usage: bool, skim: str) -> tuple[Any, ...]:
    """(the record's outcome, the bytes the client gets) of a stream read in pieces of these sizes,
    through the decoder and `see` + `forward` for each event (`skim` "no", as the relay did), or
    `see_events` with the decoder's skim hook set ("decoder"), with the batches' bytes ("batch",
    as for a stream's first read, cut before the hook is set), or both (as the relay does)."""
    target = record()
    meter = StreamMeter(target, STARTED, include_usage=include_usage)
    decoder = SseDecoder(LIMIT)
    if skim in ("decoder", "both"):
        decoder.skim = meter.skim
    forwarded, at = [], 0
    for size in reads:
        batch = decoder.feed(stream[at : at + size])
        at += size
        if skim == "no":
            dropped = [i for i, data in enumerate(batch.events) if not meter.forward(meter.see(data, STARTED + 1))]
        elif skim == "decoder":
            dropped = meter.see_events(batch.events, STARTED + 1)
        else:
            dropped = meter.see_events(batch.events, STARTED + 1, batch.raw, batch.spans)
        forwarded.append(batch.without(dropped) if dropped else batch.raw)
        if batch.done:
            break
    return *outcome(target), b"".join(forwarded), decoder.pending


def assert_relayed_the_same(stream: bytes, reads: list[int], include_usage: bool) -> None:
    expected = relayed(stream, reads, include_usage, "no")
    for skim in ("decoder", "batch", "both"):
        assert relayed(stream, reads, include_usage, skim) == expected, skim


def sse_bytes(events: list[bytes], comments: bool = False, crlf: bool = False) -> bytes:
    end = b"\r\n" if crlf else b"\n"
    out = []
    for index, data in enumerate(events):
        if comments and index % 4 == 2:
            out.append(b": OPENROUTER PROCESSING" + end + end)
        out.append(b"data: " + data + end + end)
    return b"".join(out) + b"data: [DONE]" + end + end


def read_sizes(length: int, events: list[bytes] | None = None) -> list[list[int]]:
    """One read; a read per event (LF framing, no comments); reads of 1, 7, 50 and 301 bytes;
    two reads, cut at a spread of places."""
    sizes: list[list[int]] = [[length]]
    if events is not None:
        sizes.append([len(b"data: \n\n") + len(data) for data in [*events, b"[DONE]"]])
    sizes += [[size] * (length // size + 1) for size in (1, 7, 50, 301)]
    sizes += [[cut, length - cut] for cut in range(1, length, max(1, length // 25))]
    return sizes


SKIMMED_STREAMS = {
    **{f"stream: {name}": events for name, events in STREAMS.items()},
    **{f"metered: {name}": case[0] for name, case in METERED.items()},
    "a long openrouter stream": openrouter_stream([f"w{n} wörd\\n " for n in range(60)]),
}


@pytest.mark.parametrize("events", SKIMMED_STREAMS.values(), ids=SKIMMED_STREAMS.keys())
@pytest.mark.parametrize("framing", ["lf", "comments", "crlf"])
def test_runs_left_uncut_bill_and_forward_the_same_however_the_stream_is_read(events, framing):
    stream = sse_bytes(events, comments=framing == "comments", crlf=framing == "crlf")
    for reads in read_sizes(len(stream), events if framing == "lf" else None):
        for include_usage in (True, False):
            assert_relayed_the_same(stream, reads, include_usage)


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_runs_stop_at_bytes_that_are_not_a_plain_text_chunk(text):
    before, after = openrouter_chunk({"role": "assistant", "content": "\0"}).split(b"\\u0000")
    plain = [openrouter_chunk({"role": "assistant", "content": t}) for t in ("a", "b\\", "\\\\", "c")]
    events = [*plain, before + text + after, *plain, before + after[1:], *plain]
    stream = sse_bytes(events)
    for reads in read_sizes(len(stream), events):
        assert_relayed_the_same(stream, reads, True)


def test_an_event_over_the_limit_in_a_run_is_refused_as_before():
    events = [openrouter_chunk({"role": "assistant", "content": text}) for text in ("a", "b", "x" * 5000, "c")]
    stream = sse_bytes(events)
    for skim in (True, False):
        target = record()
        meter = StreamMeter(target, STARTED)
        decoder = SseDecoder(len(events[0]) + 1000)
        if skim:
            decoder.skim = meter.skim
        meter.see_events(decoder.feed(stream[:600]).events, STARTED + 1)  # learns the shape
        with pytest.raises(EventTooLarge):
            decoder.feed(stream[600:])
