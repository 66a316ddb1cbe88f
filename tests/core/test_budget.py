"""Pure budget logic: fractions, downgrade steps, reservations, rollover, rebuilding from the ledger."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from proxy.config import Budget, DowngradeStep, ProxyKey
from proxy.core.budget import GLOBAL, Refusal, Reservation, SpendBook

LA = ZoneInfo("America/Los_Angeles")
STEPS = (
    DowngradeStep(at=0.4, map={"quality": "balanced"}),
    DowngradeStep(at=0.6, map={"quality": "cheap", "balanced": "cheap"}),
    DowngradeStep(at=0.8, map={"*": "cheap"}),
)
BOT = ProxyKey(name="bot", key_env="BOT_KEY", daily_usd=1.0, monthly_usd=5.0)
OPS = ProxyKey(name="ops", key_env="OPS_KEY")


def at(*args: int) -> float:
    """Epoch seconds of a wall-clock time in Los Angeles."""
    return datetime(*args, tzinfo=LA).timestamp()


NOW = at(2025, 3, 15, 12, 0)


def spend_book(
    daily: float | None = 10.0, monthly: float | None = 100.0, now: float = NOW, keys=(BOT, OPS)
) -> SpendBook:
    budget = Budget(daily_usd=daily, monthly_usd=monthly, downgrade=STEPS, timezone="America/Los_Angeles")
    return SpendBook(budget, keys, now)


def spend(book: SpendBook, key: str | None, amount: float, now: float = NOW) -> None:
    reservation = book.try_reserve(key, amount, now)
    assert isinstance(reservation, Reservation), reservation
    book.settle(reservation, amount, now)


@pytest.mark.parametrize(
    "day, month, key, expected",
    [
        ({}, {}, None, 0.0),
        ({"": 4.0}, {"": 4.0}, None, 0.4),  # daily 4/10 beats monthly 4/100
        ({"": 1.0}, {"": 60.0}, None, 0.6),  # monthly 60/100 beats daily 1/10
        ({"bot": 0.5}, {"bot": 0.5}, None, 0.05),  # a key's spend counts globally
        ({"bot": 0.5}, {"bot": 0.5}, "bot", 0.5),  # and against its own 1.0 budget
        ({"bot": 0.5}, {"bot": 4.5}, "bot", 0.9),  # its monthly 4.5/5
        ({"bot": 0.5}, {"bot": 0.5}, "ops", 0.05),  # ops has no budget of its own
        ({"": 9.0, "bot": 0.1}, {"": 9.0}, "bot", 0.91),  # global 9.1/10 beats the key's 0.1/1
    ],
)
def test_fraction(day, month, key, expected):
    book = spend_book()
    book.load(day, month)
    assert book.fraction(key, NOW) == pytest.approx(expected)


def test_fraction_without_any_limit_is_zero():
    book = spend_book(daily=None, monthly=None, keys=())
    book.load({"": 1e6}, {"": 1e6})
    assert book.fraction(None, NOW) == 0.0


@pytest.mark.parametrize(
    "fraction, expected",
    [
        (0.0, None),
        (0.3999, None),
        (0.4, 0),
        (0.5999, 0),
        (0.6, 1),
        (0.7999, 1),
        (0.8, 2),
        (1.0, 2),
        (3.0, 2),
    ],
)
def test_downgrade_step_boundaries(fraction, expected):
    found = spend_book().downgrade_step(fraction)
    assert (found[0] if found else None) == expected
    if found:
        assert found[1] is STEPS[expected]


@pytest.mark.parametrize(
    "spent, reserved, amount, fits",
    [
        (0.0, 0.0, 10.0, True),  # exactly the limit fits
        (0.0, 0.0, 10.0001, False),
        (9.0, 0.0, 1.0, True),
        (9.0, 0.0, 1.0001, False),
        (9.0, 0.5, 0.5, True),  # money reserved by requests in flight counts
        (9.0, 0.5, 0.5001, False),
        (10.0, 0.0, 1e-9, False),  # exhausted: not even a fraction of a cent
    ],
)
def test_reserve_refuses_when_spent_plus_reserved_plus_amount_passes_the_limit(spent, reserved, amount, fits):
    book = spend_book(monthly=None)
    book.load({"": spent}, {"": spent})
    if reserved:
        assert isinstance(book.try_reserve(None, reserved, NOW), Reservation)
    outcome = book.try_reserve(None, amount, NOW)
    assert isinstance(outcome, Reservation) is fits
    if not fits:
        assert outcome == Refusal(
            GLOBAL, "daily", pytest.approx(spent), pytest.approx(reserved), 10.0, at(2025, 3, 16, 0, 0)
        )
        assert book.reserved() == pytest.approx(reserved)  # a refusal reserves nothing


def test_monthly_limit_refuses_with_the_month_reset():
    book = spend_book(daily=10.0, monthly=100.0)
    book.load({"": 1.0}, {"": 99.5})
    refusal = book.try_reserve(None, 1.0, NOW)
    assert isinstance(refusal, Refusal)
    assert (refusal.window, refusal.resets_at) == ("monthly", at(2025, 4, 1, 0, 0))


def test_settle_releases_the_reservation_and_books_the_real_cost_once():
    book = spend_book()
    reservation = book.try_reserve("bot", 0.8, NOW)
    assert isinstance(reservation, Reservation)
    assert book.reserved() == book.reserved("bot") == pytest.approx(0.8)
    assert isinstance(book.try_reserve("bot", 0.3, NOW), Refusal)  # 0.8 + 0.3 > the key's 1.0
    book.settle(reservation, 0.25, NOW)
    book.settle(reservation, 0.25, NOW)  # twice: booked once
    assert book.reserved() == book.reserved("bot") == 0.0
    assert book.fraction("bot", NOW) == pytest.approx(0.25)
    snapshot = {(scope, window): spent for scope, window, spent, _ in book.snapshot()}
    assert snapshot[(GLOBAL, "daily")] == snapshot[("bot", "daily")] == pytest.approx(0.25)
    assert snapshot[("ops", "daily")] == 0.0
    assert isinstance(book.try_reserve("bot", 0.3, NOW), Reservation)  # room again


def test_a_key_over_its_budget_is_refused_while_other_keys_go_on():
    book = spend_book()
    spend(book, "bot", 1.0)
    refusal = book.try_reserve("bot", 0.01, NOW)
    assert isinstance(refusal, Refusal) and refusal.scope == "bot" and refusal.limit == 1.0
    assert isinstance(book.try_reserve("ops", 0.01, NOW), Reservation)
    assert isinstance(book.try_reserve(None, 0.01, NOW), Reservation)


def test_the_global_budget_binds_every_key():
    book = spend_book(daily=1.0)
    spend(book, "ops", 0.95)
    refusal = book.try_reserve("bot", 0.1, NOW)
    assert isinstance(refusal, Refusal) and refusal.scope == GLOBAL


def test_day_rolls_over_at_local_midnight_not_utc_midnight():
    book = spend_book()
    spend(book, "bot", 0.5, at(2025, 3, 15, 16, 30))  # 23:30 UTC
    assert book.fraction("bot", at(2025, 3, 15, 17, 30)) == pytest.approx(0.5)  # 00:30 UTC, same LA day
    assert book.fraction("bot", at(2025, 3, 15, 23, 59)) == pytest.approx(0.5)
    assert book.fraction("bot", at(2025, 3, 16, 0, 0)) == pytest.approx(0.1)  # daily reset; month 0.5/5
    assert dict(((s, w), v) for s, w, v, _ in book.snapshot())[("bot", "monthly")] == pytest.approx(0.5)


def test_a_dst_day_is_23_hours_long():
    book = spend_book(now=at(2025, 3, 8, 23, 30))
    spend(book, None, 5.0, at(2025, 3, 8, 23, 30))
    assert book.fraction(None, at(2025, 3, 9, 0, 0, 1)) == pytest.approx(0.05)  # day reset, month 5/100
    calendar = book.calendar
    assert calendar.day_end - calendar.day_start == 23 * 3600
    assert calendar.day_end == at(2025, 3, 10, 0, 0)


def test_month_rolls_over_in_the_local_zone():
    book = spend_book(now=at(2025, 3, 31, 23, 0))
    spend(book, None, 5.0, at(2025, 3, 31, 23, 0))  # already 1 April in UTC... and still March here
    assert book.fraction(None, at(2025, 3, 31, 23, 59)) == pytest.approx(0.5)
    assert book.fraction(None, at(2025, 4, 1, 0, 0, 1)) == 0.0
    assert book.calendar.month_end == at(2025, 5, 1, 0, 0)
    assert isinstance(book.try_reserve(None, 10.0, at(2025, 4, 1, 0, 1)), Reservation)


def test_a_reservation_across_midnight_is_released_and_booked_on_the_new_day():
    book = spend_book()
    reservation = book.try_reserve(None, 2.0, at(2025, 3, 15, 23, 59))
    book.settle(reservation, 1.0, at(2025, 3, 16, 0, 1))
    assert book.reserved() == 0.0
    assert book.fraction(None, at(2025, 3, 16, 0, 2)) == pytest.approx(0.1)


def test_load_rebuilds_from_per_key_sums():
    book = spend_book()
    spend(book, None, 3.0)  # replaced by load(), not added to
    book.load({"": 1.0, "bot": 0.5, "gone": 0.25}, {"": 11.0, "bot": 2.5, "gone": 0.25})
    snapshot = {(scope, window): (spent, limit) for scope, window, spent, limit in book.snapshot()}
    assert snapshot[(GLOBAL, "daily")] == (pytest.approx(1.75), 10.0)
    assert snapshot[(GLOBAL, "monthly")] == (pytest.approx(13.75), 100.0)
    assert snapshot[("bot", "daily")] == (0.5, 1.0)
    assert snapshot[("bot", "monthly")] == (2.5, 5.0)
    assert snapshot[("ops", "daily")] == (0.0, None)
    assert ("gone", "daily") not in snapshot  # a key since removed counts globally only
    assert book.fraction("bot", NOW) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "refusal, needed, now, expected",
    [
        (
            Refusal(GLOBAL, "daily", 9.87654, 0.1, 10.0, at(2025, 3, 16, 0, 0)),
            0.5,
            at(2025, 3, 15, 21, 30),
            ["the daily budget", "$9.8765", "$10.00", "$0.1000", "$0.5000", "2025-03-16 07:00 UTC", "2h30m"],
        ),
        (
            Refusal("bot", "monthly", 5.0, 0.0, 5.0, at(2025, 4, 1, 0, 0)),
            0.01,
            at(2025, 3, 31, 23, 59, 30),
            ["the monthly budget of key 'bot'", "$5.00", "2025-04-01 07:00 UTC", "0m30s"],
        ),
        # small budgets must not print as $0.00
        (
            Refusal(GLOBAL, "daily", 0.0019, 0.0, 0.002, at(2025, 3, 16, 0, 0)),
            0.0004,
            NOW,
            ["$0.0019", "$0.002", "$0.0004"],
        ),
    ],
)
def test_refusal_message_names_the_budget_its_spend_its_limit_and_the_reset(refusal, needed, now, expected):
    message = refusal.message(needed, now)
    for part in expected:
        assert part in message, (part, message)
    assert "$0.00 " not in message and not message.count("$0.00.")


# --- admission: the pure decision on real config, router, prices and book (no IO) ---------------

from proxy.config import parse_config  # noqa: E402
from proxy.core.admission import admit, worst_case  # noqa: E402
from proxy.core.budget import SpendCounters  # noqa: E402
from proxy.core.errors import BudgetExceeded  # noqa: E402
from proxy.core.features import RequestFeatures  # noqa: E402
from proxy.core.policy import Policy  # noqa: E402
from proxy.core.pricing import Catalogue  # noqa: E402
from proxy.money.catalogue import packaged_snapshot  # noqa: E402
from tests.support.money import MODELS, budget_block  # noqa: E402

CONFIG_HEAD = "upstreams: {openrouter: {base_url: 'http://127.0.0.1:1/api/v1'}}\n"


def admission_setup(on_exhausted: str, spent: float, daily: float = 0.005) -> Policy:
    config = parse_config(CONFIG_HEAD + MODELS + budget_block(daily, on_exhausted))
    counters = SpendCounters(config.budget.timezone, NOW)
    counters.load({"": spent}, {"": spent})
    return Policy.build(config, Catalogue.parse(packaged_snapshot()), {}, counters)


@pytest.mark.parametrize(
    "on_exhausted, spent, max_tokens, chain, downgrade",
    [
        ("reject", 0.0, 10, "quality", None),
        ("reject", 0.0021, 10, "balanced", "quality->balanced (step 0 at 40%)"),
        ("reject", 0.0031, 10, "cheap", "quality->cheap (step 1 at 60%)"),
        ("reject", 0.0041, 10, "cheap", "quality->cheap (step 2 at 80%)"),
        ("cheapest", 0.0041, 2000, "tiny", "quality->tiny (budget exhausted: cheapest)"),
    ],
)
def test_admit_plans_what_the_budget_affords(on_exhausted, spent, max_tokens, chain, downgrade):
    policy = admission_setup(on_exhausted, spent)
    features = RequestFeatures(prompt_tokens=20, max_tokens=max_tokens)
    admission = admit(policy, None, "quality", features, None, NOW)
    assert admission.plan.chain_owner == chain
    assert admission.downgrade == downgrade
    assert admission.reservation.amount == pytest.approx(worst_case(policy.prices, admission.plan, 20, max_tokens))
    assert policy.book.reserved() == admission.reservation.amount


@pytest.mark.parametrize("on_exhausted", ["reject", "cheapest"])
def test_admit_refuses_with_the_amount_it_last_tried(on_exhausted):
    policy = admission_setup(on_exhausted, 0.0049)
    features = RequestFeatures(prompt_tokens=20, max_tokens=200_000)
    with pytest.raises(BudgetExceeded) as refused:
        admit(policy, None, "quality", features, None, NOW)
    tiny = policy.prices.worst_case("meta-llama/llama-3.1-8b-instruct", 20, 200_000)
    cheap = policy.prices.worst_case("openai/gpt-4o-mini", 20, 200_000)
    needed = tiny if on_exhausted == "cheapest" else cheap
    assert f"may cost up to ${needed:.4f}" in refused.value.message
    utc_midnight = datetime(2025, 3, 16, tzinfo=ZoneInfo("UTC")).timestamp()  # the budget's zone is UTC
    assert refused.value.retry_after == pytest.approx(utc_midnight - NOW)
    assert policy.book.reserved() == 0.0
