"""The response cache: the pure switch and key, SSE replay against OpenAI's schema, and the
SQLite store on real files (TTL, LRU eviction, refusals, reopen, concurrency)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.cache.policy import CachedAnswer, CachePolicy, cache_key, wants_cache
from proxy.cache.replay import replay_as_sse
from proxy.cache.response_cache import ResponseCache

T0 = 1_750_000_000.0
CHAIN = ["mistralai/mistral-7b-instruct@openrouter", "meta-llama/llama-3.1-8b-instruct@openrouter"]
BODY = {"model": "cheap", "temperature": 0, "messages": [{"role": "user", "content": "Say hi"}]}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def completion(content: str | None = "Hello there, how can I help you today?", **overrides: Any) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "reasoning": None}
    body = {
        "id": "gen-123",
        "provider": "Mistral",
        "model": "mistralai/mistral-7b-instruct",
        "object": "chat.completion",
        "created": 1_749_999_000,
        "system_fingerprint": "fp_1",
        "choices": [
            {"index": 0, "message": message, "finish_reason": "stop", "native_finish_reason": "stop", "logprobs": None}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21, "cost": 0.00042},
    }
    body.update(overrides)
    return body


def answer(body: dict | None = None, *, cost: float = 0.00042) -> CachedAnswer:
    return CachedAnswer(
        completion=completion() if body is None else body,
        model="mistralai/mistral-7b-instruct",
        upstream="openrouter",
        cost_usd=cost,
        prompt_tokens=12,
        completion_tokens=9,
        created_at=T0 - 5,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def cache(tmp_path: Path, clock: Clock):
    opened = await ResponseCache.open(tmp_path / "cache.db", CachePolicy(), clock=clock)
    yield opened
    await opened.close()


# --- wants_cache --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "header", "expected"),
    [
        ({"temperature": 0}, None, True),
        ({"temperature": 0.0}, None, True),
        ({"temperature": -0.0}, None, True),
        ({"temperature": 0.2}, None, False),
        ({"temperature": 1}, None, False),
        ({}, None, False),
        ({"temperature": None}, None, False),
        ({"temperature": False}, None, False),  # false is an int in Python, not a temperature
        ({"temperature": "0"}, None, False),
        ({}, "on", True),
        ({}, "ON", True),
        ({}, " On ", True),
        ({"temperature": 0.7}, "on", True),  # the header wins over the body ...
        ({"temperature": 0}, "off", False),
        ({"temperature": 0}, "OFF", False),
        ({"temperature": 0}, "maybe", True),  # ... unless it says neither: then the body decides
        ({"temperature": 0.5}, "", False),
    ],
)
def test_wants_cache(body: dict, header: str | None, expected: bool) -> None:
    assert wants_cache(body, header) is expected


# --- cache_key ----------------------------------------------------------------


def test_key_is_sha256_hex_and_ignores_field_order() -> None:
    key = cache_key(BODY, CHAIN)
    assert len(key) == 64 and int(key, 16) >= 0
    reordered = {"messages": [{"content": "Say hi", "role": "user"}], "temperature": 0, "model": "cheap"}
    assert cache_key(reordered, CHAIN) == key


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"user": "alice"},
        {"metadata": {"trace": "abc"}},
        {"model": "auto"},  # the chain stands for the model
        {"temperature": 0.0},  # 0.0 and 0 ask the same thing
    ],
)
def test_key_ignores_fields_that_do_not_change_the_answer(extra: dict) -> None:
    assert cache_key({**BODY, **extra}, CHAIN) == cache_key(BODY, CHAIN)


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("body", "chain"),
    [
        ({**BODY, "messages": [{"role": "user", "content": "Say bye"}]}, CHAIN),
        ({**BODY, "messages": [{"role": "system", "content": "Say hi"}]}, CHAIN),
        ({**BODY, "temperature": 0.2}, CHAIN),
        ({**BODY, "max_tokens": 10}, CHAIN),
        ({**BODY, "tools": [TOOL]}, CHAIN),
        (BODY, CHAIN[:1]),
        (BODY, list(reversed(CHAIN))),
        (BODY, [CHAIN[0], "gpt-4o-mini@openai"]),
    ],
)
def test_key_changes_with_what_changes_the_answer(body: dict, chain: list[str]) -> None:
    assert cache_key(body, chain) != cache_key(BODY, CHAIN)


def test_key_of_a_tool_differs_by_its_schema() -> None:
    other = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "string"}}}
    assert cache_key({**BODY, "tools": [TOOL]}, CHAIN) != cache_key({**BODY, "tools": [other]}, CHAIN)


# --- replay_as_sse --------------------------------------------------------------


def parse_sse(raw: bytes) -> list[dict]:
    """Split on blank lines; every event is one `data:` line; the last is [DONE]."""
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    chunks = []
    for event in events[:-2]:
        assert event.startswith(b"data: ") and b"\n" not in event
        chunks.append(orjson.loads(event[len(b"data: ") :]))
    return chunks


def accumulate(chunks: list[dict]) -> dict[int, dict]:
    """Rebuild messages as an SDK does: concatenate strings, merge tool calls by index."""
    messages: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            message = messages.setdefault(choice["index"], {"content": None, "finish_reason": None})
            delta = choice["delta"]
            if "role" in delta:
                message["role"] = delta["role"]
            if delta.get("content") is not None:
                message["content"] = (message["content"] or "") + delta["content"]
            for call in delta.get("tool_calls") or ():
                calls = message.setdefault("tool_calls", {})
                merged = calls.setdefault(call["index"], {"function": {"arguments": ""}})
                for name in ("id", "type"):
                    if name in call:
                        merged[name] = call[name]
                function = call.get("function", {})
                if "name" in function:
                    merged["function"]["name"] = function["name"]
                merged["function"]["arguments"] += function.get("arguments", "")
            if choice["finish_reason"] is not None:
                message["finish_reason"] = choice["finish_reason"]
    return messages


def check_stream(schemas, stored: dict, raw: bytes) -> list[dict]:
    chunks = parse_sse(raw)
    for chunk in chunks:
        schemas.validate("CreateChatCompletionStreamResponse", chunk)
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["id"], chunk["created"], chunk["model"]) == (stored["id"], stored["created"], stored["model"])
    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant" and first["finish_reason"] is None
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == stored["usage"]
    assert all("usage" not in chunk for chunk in chunks[:-1])
    return chunks


def test_replay_of_text_validates_and_rebuilds_the_content(schemas) -> None:
    content = "The quick brown fox jumps over the lazy dog. " * 5 + "Ünïcødé ✓ 🦊"
    stored = completion(content)
    chunks = check_stream(schemas, stored, replay_as_sse(answer(stored)))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert 2 <= len(content_chunks) <= 4
    (message,) = accumulate(chunks).values()
    assert message["content"] == content
    assert message["finish_reason"] == "stop"
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "stop"


def test_replay_of_short_and_empty_content(schemas) -> None:
    for content in ("Hi", ""):
        stored = completion(content)
        chunks = check_stream(schemas, stored, replay_as_sse(answer(stored)))
        assert accumulate(chunks)[0]["content"] == content


def test_replay_of_tool_calls(schemas) -> None:
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 3}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
    ]
    stored = completion(None)
    stored["choices"][0]["message"]["tool_calls"] = calls
    stored["choices"][0]["finish_reason"] = "tool_calls"
    chunks = check_stream(schemas, stored, replay_as_sse(answer(stored)))
    message = accumulate(chunks)[0]
    assert message["content"] is None and message["finish_reason"] == "tool_calls"
    rebuilt = [message["tool_calls"][i] for i in sorted(message["tool_calls"])]
    assert rebuilt == calls


def test_replay_keeps_choices_apart_and_builds_usage_when_missing(schemas) -> None:
    stored = completion("first answer")
    second = {
        **stored["choices"][0],
        "index": 1,
        "message": {"role": "assistant", "content": "second answer"},
        "finish_reason": "length",
    }
    stored["choices"].append(second)
    del stored["usage"]
    chunks = parse_sse(replay_as_sse(answer(stored)))
    for chunk in chunks:
        schemas.validate("CreateChatCompletionStreamResponse", chunk)
    messages = accumulate(chunks)
    assert (messages[0]["content"], messages[0]["finish_reason"]) == ("first answer", "stop")
    assert (messages[1]["content"], messages[1]["finish_reason"]) == ("second answer", "length")
    assert chunks[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}


# --- the store ----------------------------------------------------------------


async def test_put_get_round_trip_and_counters(cache: ResponseCache) -> None:
    key = cache_key(BODY, CHAIN)
    assert await cache.get(key) is None
    stored = answer()
    assert await cache.put(key, stored) is True
    assert await cache.get(key) == stored
    assert await cache.get(cache_key(BODY, CHAIN[:1])) is None
    assert (cache.hits, cache.misses, cache.entries) == (1, 2, 1)


async def test_ttl_expiry_with_an_injected_clock(tmp_path: Path, clock: Clock) -> None:
    cache = await ResponseCache.open(tmp_path / "c.db", CachePolicy(ttl_s=100), clock=clock)
    try:
        await cache.put("a", answer())
        clock.now += 99
        assert await cache.get("a") is not None
        clock.now += 1
        assert await cache.get("a") is None  # expired: a miss, and the row is gone
        assert (cache.hits, cache.misses, cache.entries) == (1, 1, 0)
        await cache.put("b", answer())
        await cache.put("c", answer())
        clock.now += 50
        await cache.put("d", answer())
        clock.now += 60
        assert await cache.purge_expired() == 2
        assert await cache.get("d") is not None and cache.entries == 1
    finally:
        await cache.close()
    with sqlite3.connect(tmp_path / "c.db") as raw:
        assert raw.execute("SELECT key FROM responses").fetchall() == [("d",)]


async def test_lru_eviction_at_max_entries(tmp_path: Path, clock: Clock) -> None:
    cache = await ResponseCache.open(tmp_path / "c.db", CachePolicy(max_entries=3), clock=clock)
    try:
        for key in "abc":
            await cache.put(key, answer())
            clock.now += 100
        assert await cache.get("a") is not None  # a is now the most recently used; b the least
        clock.now += 100
        await cache.put("d", answer())
        assert cache.entries == 3
        assert await cache.get("b") is None
        assert all([await cache.get(key) for key in "acd"])
        clock.now += 100
        await cache.get("c")
        clock.now += 100
        await cache.put("e", answer())  # oldest use now: a and d tie on age; a is older
        assert [key for key in "acde" if await cache.get(key)] == ["c", "d", "e"]
    finally:
        await cache.close()


async def test_reopen_with_a_smaller_limit_evicts(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "c.db"
    cache = await ResponseCache.open(path, CachePolicy(), clock=clock)
    for index in range(5):
        await cache.put(str(index), answer())
        clock.now += 1
    await cache.close()
    smaller = await ResponseCache.open(path, CachePolicy(max_entries=2), clock=clock)
    try:
        assert smaller.entries == 2
        assert [await smaller.get(str(index)) is not None for index in range(5)] == [False] * 3 + [True] * 2
    finally:
        await smaller.close()


async def test_a_reloaded_policy_applies_at_once(cache: ResponseCache, clock: Clock) -> None:
    for key in "abc":
        await cache.put(key, answer())
        clock.now += 10
    cache = await cache.with_policy(CachePolicy(max_entries=2, ttl_s=15))
    assert cache.entries == 2
    assert [await cache.get(key) is not None for key in "abc"] == [False, False, True]  # b: past the new TTL


async def test_in_memory_cache_works(clock: Clock) -> None:
    cache = await ResponseCache.open(":memory:", CachePolicy(), clock=clock)
    try:
        await cache.put("k", answer())
        assert await cache.get("k") == answer()
    finally:
        await cache.close()


async def test_oversized_entries_are_refused(tmp_path: Path, clock: Clock) -> None:
    cache = await ResponseCache.open(tmp_path / "c.db", CachePolicy(max_entry_bytes=2_000), clock=clock)
    try:
        assert await cache.put("big", answer(completion("x" * 3_000))) is False
        assert await cache.put("small", answer(completion("x" * 100))) is True
        assert await cache.get("big") is None and await cache.get("small") is not None
        assert cache.entries == 1
    finally:
        await cache.close()


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"code": 429, "message": "Rate limit exceeded"}},
        {**completion(), "error": {"code": 502, "message": "Provider returned error"}},
        {key: value for key, value in completion().items() if key != "choices"},
        completion(choices=[]),
        completion(choices=[{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "error"}]),
    ],
    ids=["error-only", "error-beside-choices", "no-choices", "empty-choices", "choice-errored"],
)
async def test_errors_are_never_cached(cache: ResponseCache, body: dict) -> None:
    assert await cache.put("k", answer(body)) is False
    assert await cache.get("k") is None and cache.entries == 0


async def test_disabled_policy_stores_and_counts_nothing(tmp_path: Path) -> None:
    cache = await ResponseCache.open(tmp_path / "c.db", CachePolicy(enabled=False))
    try:
        assert await cache.put("k", answer()) is False
        assert await cache.get("k") is None
        assert (cache.hits, cache.misses) == (0, 0)
    finally:
        await cache.close()


async def test_reopen_keeps_entries_and_recent_hits(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "nested" / "cache.db"
    first = await ResponseCache.open(path, CachePolicy(), clock=clock)
    await first.put("k", answer())
    clock.now += 3_600
    assert await first.get("k") is not None  # the hit is noted in memory ...
    await first.close()  # ... and written on close
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT last_used FROM responses").fetchone() == (clock.now,)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        indexes = {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"responses_last_used", "responses_created_at"} <= indexes

    second = await ResponseCache.open(path, CachePolicy(), clock=clock)
    try:
        assert second.entries == 1
        assert await second.get("k") == answer()
        await second.close()
        assert await second.get("k") is None and await second.put("j", answer()) is False  # closed: inert
    finally:
        await second.close()  # idempotent


async def test_clear(cache: ResponseCache) -> None:
    for key in "abc":
        await cache.put(key, answer())
    assert await cache.clear() == 3
    assert cache.entries == 0 and await cache.get("a") is None


async def test_concurrent_gets_and_puts_are_safe(tmp_path: Path, clock: Clock) -> None:
    cache = await ResponseCache.open(tmp_path / "c.db", CachePolicy(max_entries=20), clock=clock)
    try:
        keys = [f"k{index}" for index in range(40)]
        stored = {key: answer(completion(f"answer {key}")) for key in keys}

        async def worker(key: str) -> None:
            for _ in range(3):
                await cache.put(key, stored[key])  # the same key stored repeatedly, concurrently
                found = await cache.get(key)
                assert found is None or found == stored[key]

        await asyncio.gather(*(worker(key) for key in keys))
        assert cache.entries == 20
        with sqlite3.connect(tmp_path / "c.db") as raw:
            assert raw.execute("SELECT count(*) FROM responses").fetchone() == (20,)
        assert cache.hits + cache.misses == 120
    finally:
        await cache.close()


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match=r"cache\.ttl_s"):
        CachePolicy(ttl_s=0)
    with pytest.raises(ValueError, match=r"cache\.max_entries"):
        CachePolicy(max_entries=0)
