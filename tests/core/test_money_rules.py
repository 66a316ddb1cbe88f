"""The pure money rules as tables: the prompt's upper bound, spend plus reservations for the
downgrade steps, the day a request is booked in, midnight in zones where it happens twice, cache
prices, figure bounds, reconciliation decisions, and redaction of bytes."""

from __future__ import annotations

import itertools
import math
from datetime import datetime
from zoneinfo import ZoneInfo

import orjson
import pytest

from proxy.config import Budget, DowngradeStep, Pricing
from proxy.core.bounds import MAX_ROW_TOKENS, MAX_ROW_USD, bound_tokens, bound_usd, flags_of
from proxy.core.budget import BudgetCalendar, SpendBook, SpendCounters
from proxy.core.features import IMAGE_TOKENS, extract_features, prompt_token_bound
from proxy.core.pricing import Catalogue, Price, PriceBook, Tokens
from proxy.core.reconcile import SCHEDULE, Generation, next_delay, qualifies, read_generation
from proxy.core.redact import REDACTED, leaks, redact
from proxy.emulator.billing import prompt_tokens as emulator_prompt_tokens

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 50_000}}
PROMPTS = {
    "ascii": "Count the words in this short sentence, please.",
    "cjk": "灯台守と嵐の物語を聞かせてください。海は荒れ、光は消えかけていた。" * 4,
    "emoji": "🌊⛈️🏝️🔦" * 20,
    "control": "\x01\x02\x03\x1f" * 30,
    "mixed": 'naïve café "quotes" \\ back\nslash\ttab 漢字 🚀',
}


@pytest.mark.parametrize("name", PROMPTS)
def test_the_prompt_bound_is_at_least_a_token_per_byte_of_text(name):
    """Byte-level BPE tokenizers never make more tokens than bytes: the bound is an upper bound for
    every real tokenizer. The old estimate (characters / 4) was far below it for non-ASCII text."""
    text = PROMPTS[name]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    bound = prompt_token_bound(messages)
    assert bound >= len(text.encode()) + len(b"Be brief.")
    assert bound >= len(orjson.dumps(messages))  # control characters counted as their JSON escapes
    assert bound >= emulator_prompt_tokens(messages)
    if name in ("cjk", "emoji", "control"):
        old_estimate = (len(text) + len("Be brief.")) // 4 + 8
        assert emulator_prompt_tokens(messages) > 2 * old_estimate  # what the old estimate under-reserved


def test_images_get_an_allowance_not_their_bytes():
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE, IMAGE]}]
    features = extract_features({"messages": messages}, {})
    assert features.has_images
    assert 2 * IMAGE_TOKENS < features.prompt_tokens < 2 * IMAGE_TOKENS + 200  # not 100 kB of base64
    assert features.prompt_tokens >= emulator_prompt_tokens(messages)
    assert features.prompt_estimate == emulator_prompt_tokens(messages)  # four bytes a token, 765 an image


def test_tools_and_schemas_count():
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}] * 3
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    plain = prompt_token_bound(messages)
    assert prompt_token_bound(messages, tools) == plain + len(orjson.dumps(tools)) + 3 * 16
    assert prompt_token_bound(messages, None, schema) == plain + len(orjson.dumps(schema))


STEPS = Budget(
    daily_usd=1.0,
    downgrade=(DowngradeStep(at=0.4, map={"quality": "balanced"}), DowngradeStep(at=0.8, map={"*": "cheap"})),
)


@pytest.mark.parametrize(
    "spent, reservations, step",
    [
        (0.0, [], None),
        (0.0, [0.39], None),
        (0.0, [0.2, 0.2], 0),  # nothing spent yet, but 40% is reserved by requests in flight
        (0.3, [0.1], 0),
        (0.5, [0.1, 0.1, 0.1], 1),
        (0.79, [], 0),
    ],
)
def test_downgrade_steps_count_spent_and_reserved(spent, reservations, step):
    book = SpendBook(STEPS, now=1000.0)
    book.add_spend(None, spent, 1000.0)
    for amount in reservations:
        assert not hasattr(book.try_reserve(None, amount, 1000.0), "window")
    found = book.downgrade_step(book.fraction(None, 1000.0))
    assert (found[0] if found else None) == step


def utc(text: str) -> float:
    return datetime.fromisoformat(text + "+00:00").timestamp()


def test_a_request_is_booked_in_the_day_it_started():
    counters = SpendCounters("UTC", utc("2026-03-10T23:59:00"))
    book = SpendBook(Budget(daily_usd=1.0), counters=counters)
    started = utc("2026-03-10T23:59:30")
    reservation = book.try_reserve(None, 0.5, started)
    book.add_spend(None, 0.2, started, started)  # yesterday's spend, before midnight
    settled = utc("2026-03-11T00:00:05")
    book.settle(reservation, 0.3, settled, started)  # type: ignore[arg-type]
    today = counters.scope("")
    assert (today.day, today.month, today.reserved) == (0.0, 0.5, 0.0)  # the month is the same one
    book.add_spend(None, 0.1, settled, settled)
    assert today.day == pytest.approx(0.1)
    # A correction (reconciliation) of yesterday's row moves the month, not today.
    book.adjust(None, -0.05, started, settled)
    assert (today.day, today.month) == (pytest.approx(0.1), pytest.approx(0.55))
    book.adjust(None, 0.02, settled, settled)
    assert (today.day, today.month) == (pytest.approx(0.12), pytest.approx(0.57))


@pytest.mark.parametrize(
    "zone, moment, day_start, day_end",
    [
        # Havana: on 2026-11-01 clocks go from 01:00 back to 00:00, so midnight happens twice; a
        # moment in the repeated hour (fold=1) must not start the day at the second midnight.
        ("America/Havana", "2026-11-01T05:30:00", "2026-11-01T04:00:00", "2026-11-02T05:00:00"),
        ("America/Havana", "2026-11-01T04:30:00", "2026-11-01T04:00:00", "2026-11-02T05:00:00"),
        # Spring forward: a 23-hour day (Europe/Paris, 2026-03-29)
        ("Europe/Paris", "2026-03-29T12:00:00", "2026-03-28T23:00:00", "2026-03-29T22:00:00"),
        ("UTC", "2026-03-29T12:00:00", "2026-03-29T00:00:00", "2026-03-30T00:00:00"),
    ],
)
def test_the_day_starts_at_the_first_midnight(zone, moment, day_start, day_end):
    calendar = BudgetCalendar.at(ZoneInfo(zone), utc(moment))
    assert (calendar.day_start, calendar.day_end) == (utc(day_start), utc(day_end))
    assert calendar.day_start <= utc(moment) < calendar.day_end


CATALOGUE = Catalogue.parse(
    {
        "data": [
            {
                "id": "a/cached",
                "pricing": {
                    "prompt": "0.000001",
                    "completion": "0.000002",
                    "input_cache_read": "0.0000001",
                    "input_cache_write": "0.00000125",
                },
            },
            {"id": "a/plain", "pricing": {"prompt": "0.000001", "completion": "0.000002"}},
        ]
    }
)


@pytest.mark.parametrize(
    "model, tokens, expected",
    [
        ("a/cached", Tokens(1000, 10), 1000e-6 + 10 * 2e-6),
        ("a/cached", Tokens(1000, 10, 800), 200e-6 + 800 * 1e-7 + 10 * 2e-6),
        ("a/cached", Tokens(1000, 10, 0, 600), 400e-6 + 600 * 1.25e-6 + 10 * 2e-6),
        ("a/cached", Tokens(1000, 10, 2000), 1000 * 1e-7 + 10 * 2e-6),  # cached past the prompt: clamped
        ("a/plain", Tokens(1000, 10, 800, 100), 1000e-6 + 10 * 2e-6),  # no cache prices: the prompt price
    ],
)
def test_cached_and_written_prompt_tokens_have_their_own_prices(model, tokens, expected):
    cost = PriceBook(CATALOGUE, Pricing(savings_baseline="a/plain")).cost(model, tokens, None)
    assert cost.usd == pytest.approx(expected, rel=1e-12) and cost.source == "catalogue"


def test_an_override_may_price_the_cache():
    pricing = Pricing.model_validate(
        {
            "overrides": {
                "a/plain": {"prompt_usd_per_mtok": 1, "completion_usd_per_mtok": 2, "cache_read_usd_per_mtok": 0.1}
            }
        }
    )
    price = PriceBook(CATALOGUE, pricing).lookup("a/plain")
    assert price is not None and price[0] == Price(1 / 1e6, 2 / 1e6, cache_read=0.1 / 1e6)  # per MILLION


@pytest.mark.parametrize(
    "value, expected, clamped",
    [
        (0.0123, 0.0123, False),
        (9.2e9, MAX_ROW_USD, True),  # past SQLite's INTEGER in nano-dollars: the whole batch would fail
        (math.inf, MAX_ROW_USD, True),
        (math.nan, 0.0, True),
        (-1.0, 0.0, True),
    ],
)
def test_absurd_dollars_are_clamped(value, expected, clamped):
    names: list[str] = []
    assert bound_usd("cost_usd", value, names) == expected
    assert names == (["cost_usd"] if clamped else [])


def test_absurd_token_counts_are_clamped():
    names: list[str] = []
    assert bound_tokens(Tokens(10**30, 5, 10**12), names) == Tokens(MAX_ROW_TOKENS, 5, MAX_ROW_TOKENS)
    assert flags_of(names) == "clamped:prompt_tokens,cached_tokens"
    assert flags_of([]) is None


@pytest.mark.parametrize(
    "source, generation, kind, expected",
    [
        ("estimate", "gen-1", "openrouter", True),
        ("reserved", "gen-1", "openrouter", True),
        ("estimate", "gen-1", "openai", False),  # OpenAI has no generation lookup
        ("estimate", None, "openrouter", False),
        ("upstream", "gen-1", "openrouter", False),
        ("reconciled", "gen-1", "openrouter", False),
    ],
)
def test_which_rows_are_reconciled(source, generation, kind, expected):
    assert qualifies(source, generation, kind) is expected


def test_the_lookup_schedule_backs_off_then_stops():
    delays = [next_delay(tries) for tries in range(len(SCHEDULE) + 1)]
    assert delays[:-1] == list(SCHEDULE) and delays[-1] is None
    assert all(a < b for a, b in itertools.pairwise(SCHEDULE))


@pytest.mark.parametrize(
    "payload, expected",
    [
        (
            {
                "data": {
                    "total_cost": 0.0015,
                    "native_tokens_prompt": 10,
                    "native_tokens_completion": 25,
                    "tokens_prompt": 9,
                    "native_tokens_cached": 3,
                    "cancelled": True,
                }
            },
            Generation(0.0015, Tokens(10, 25, 3), True),
        ),
        ({"data": {"total_cost": 0, "tokens_prompt": 7, "tokens_completion": 1}}, Generation(0.0, Tokens(7, 1), False)),
        ({"data": {"total_cost": None}}, None),
        ({"data": {"total_cost": -1}}, None),
        ({"data": {"total_cost": True}}, None),
        ({"error": {"code": 404}}, None),
        ([], None),
    ],
)
def test_reading_a_generation(payload, expected):
    assert read_generation(payload) == expected


def test_redaction_serves_bytes_and_text():
    key, longer = "sk-or-abc", "sk-or-abc-longer"
    text = f"bad key {longer} and {key}"
    assert redact(text, [key, longer]) == f"bad key {REDACTED} and {REDACTED}"
    assert redact(text.encode(), [key, longer]) == f"bad key {REDACTED} and {REDACTED}".encode()
    assert redact(b"nothing here", [key, ""]) == b"nothing here"
    assert leaks(text.encode(), (key.encode(),)) and not leaks(b"clean", (key.encode(),))
