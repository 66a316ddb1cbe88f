"""The spend book's protocol, run against both stores where their behaviour must match: the
in-process book and the one on Redis (the machine's own server, a prefix per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from proxy.config import parse_config
from proxy.core.budget import GLOBAL, Reservation, SpendCounters
from proxy.core.errors import BudgetExceeded
from proxy.core.features import extract_features
from proxy.core.policy import Policy
from proxy.core.pricing import Catalogue
from proxy.money.catalogue import packaged_snapshot
from proxy.state.health import StateHealth
from proxy.state.redis_spend import RedisSpend, hold_ttl_s
from proxy.state.spend import LocalSpend, SpendStore
from tests.state.conftest import REDIS_URL
from tests.support.money import MODELS
from tests.support.timing import Clock

HEAD = "upstreams: {openrouter: {base_url: 'http://127.0.0.1:1/api/v1', timeout_s: 1, connect_timeout_s: 1}}\n"
RETRY = "retry: {attempts_per_model: 1, backoff_max_s: 0, max_retry_after_s: 0}\n"
BODY = {"model": "cheap", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
CATALOGUE = Catalogue.parse(packaged_snapshot())


@dataclass
class Book:
    """One store with the counters its policy reads, and a way to build a second one on the same state."""

    store: SpendStore
    counters: SpendCounters
    policy: Policy
    clock: Clock
    twin: Callable[[], tuple[SpendStore, Policy]]


def policy_of(text: str, counters: SpendCounters) -> Policy:
    config = parse_config(HEAD + MODELS + RETRY + text)
    return Policy.build(config, CATALOGUE, {}, counters)


@pytest.fixture(params=["local", "redis"])
async def make_book(request, redis_prefix) -> AsyncIterator[Callable[[str], Book]]:
    clients: list[Redis] = []

    def make(text: str) -> Book:
        clock = Clock.at(2026, 3, 10, 12)

        def build() -> tuple[SpendStore, SpendCounters, Policy]:
            counters = SpendCounters("UTC", clock())
            policy = policy_of(text, counters)
            if request.param == "local":
                return LocalSpend(), counters, policy
            client = Redis.from_url(REDIS_URL)
            clients.append(client)
            return (
                RedisSpend(client, redis_prefix, counters, StateHealth(REDIS_URL, "fail_closed"), clock),
                counters,
                policy,
            )

        store, counters, policy = build()

        def twin() -> tuple[SpendStore, Policy]:
            if request.param == "local":
                return store, policy  # one process: one book
            other, _, other_policy = build()
            return other, other_policy

        return Book(store, counters, policy, clock, twin)

    yield make
    for client in clients:
        await client.aclose()


async def admit(store: SpendStore, policy: Policy, key: str | None, now: float, model: str = "cheap"):
    features = extract_features({**BODY, "model": model}, {})
    return await store.admit(policy, key, model, features, None, now)


KEYS = "keys: [{name: bot, key_sha256: '" + "a" * 64 + "', daily_usd: 0.00002}]\n"


async def test_a_reservation_holds_until_settled_and_then_books_the_cost(make_book) -> None:
    book = make_book("budget: {daily_usd: 1.0}\n")
    admitted = await admit(book.store, book.policy, None, book.clock())
    held = admitted.reservation.amount
    assert held > 0 and book.counters.scope(GLOBAL).reserved == pytest.approx(held)
    await book.store.settle(book.policy, admitted.reservation, None, 0.000123, book.clock(), book.clock())
    await book.store.refresh(book.policy)
    totals = book.counters.scope(GLOBAL)
    assert (totals.day, totals.month, totals.reserved) == (pytest.approx(0.000123), pytest.approx(0.000123), 0.0)


async def test_settling_twice_books_once(make_book) -> None:
    book = make_book("budget: {daily_usd: 1.0}\n")
    admitted = await admit(book.store, book.policy, None, book.clock())
    for _ in range(2):
        await book.store.settle(book.policy, admitted.reservation, None, 0.5, book.clock(), book.clock())
    await book.store.refresh(book.policy)
    assert book.counters.scope(GLOBAL).day == pytest.approx(0.5)


async def test_a_refusing_scope_reserves_nothing_in_any_scope(make_book) -> None:
    """All or nothing: the key's budget refuses, so the proxy-wide one holds nothing for it either."""
    book = make_book("budget: {daily_usd: 1.0}\n" + KEYS)
    with pytest.raises(BudgetExceeded, match="daily budget of key 'bot'"):
        await admit(book.store, book.policy, "bot", book.clock())
    await book.store.refresh(book.policy)
    assert book.counters.scope(GLOBAL).reserved == 0.0
    assert book.counters.scope("bot").reserved == 0.0


async def test_the_window_a_request_started_in_is_the_one_it_is_booked_in(make_book) -> None:
    book = make_book("budget: {daily_usd: 1.0}\n")
    started = book.clock()
    admitted = await admit(book.store, book.policy, None, started)
    book.clock.advance(13 * 3600)  # past midnight: yesterday's request, booked after it
    await book.store.settle(book.policy, admitted.reservation, None, 0.25, book.clock(), started)
    await book.store.refresh(book.policy)
    totals = book.counters.scope(GLOBAL)
    assert (totals.day, totals.month, totals.reserved) == (0.0, pytest.approx(0.25), 0.0)


async def test_one_book_for_every_instance(make_book) -> None:
    """Two stores on one state (two replicas; in one process, the same book): what one holds, the
    other cannot spend."""
    book = make_book("budget: {daily_usd: 0.0001}\n")
    features = extract_features(BODY, {})
    first = await admit(book.store, book.policy, None, book.clock())
    assert first.reservation.amount > 0.00005, "each reservation must take over half of the budget"
    other, other_policy = book.twin()
    with pytest.raises(BudgetExceeded, match=r"daily budget (is exhausted|has .* less than this request's worst case)"):
        await other.admit(other_policy, None, "cheap", features, None, book.clock())
    await book.store.settle(book.policy, first.reservation, None, 0.0, book.clock(), book.clock())
    await book.store.drain()  # a replica sends its settlements with its next call, or a moment later
    second = await other.admit(other_policy, None, "cheap", features, None, book.clock())
    assert isinstance(second.reservation, Reservation)


# -- Redis only ------------------------------------------------------------------------------


@pytest.fixture
async def redis_book(redis_prefix) -> AsyncIterator[tuple[RedisSpend, SpendCounters, Policy, Clock]]:
    clock = Clock.at(2026, 3, 10, 12)
    counters = SpendCounters("UTC", clock())
    client = Redis.from_url(REDIS_URL)
    store = RedisSpend(client, redis_prefix, counters, StateHealth(REDIS_URL, "fail_closed"), clock)
    yield store, counters, policy_of("budget: {daily_usd: 1.0}\n", counters), clock
    await client.aclose()


async def test_a_hold_nobody_settles_lapses_after_its_ttl(redis_book, redis_prefix) -> None:
    store, counters, policy, clock = redis_book
    admitted = await admit(store, policy, None, clock())
    ttl = hold_ttl_s(policy.config)
    assert ttl < 60, "derived from the request timeout of this config"
    client = Redis.from_url(REDIS_URL)
    try:
        assert 0 < await client.pttl(f"{redis_prefix}hold:{admitted.reservation.hold}") <= ttl * 1000
    finally:
        await client.aclose()
    clock.advance(ttl - 1)
    await store.refresh(policy)
    assert counters.scope(GLOBAL).reserved == pytest.approx(admitted.reservation.amount)
    clock.advance(2)
    await store.refresh(policy)
    assert counters.scope(GLOBAL).reserved == 0.0
    # Settled late all the same (a request that outlived its hold): the cost counts, the hold not twice.
    await store.settle(policy, admitted.reservation, None, 0.01, clock(), clock())
    await store.drain()
    assert (counters.scope(GLOBAL).reserved, counters.scope(GLOBAL).day) == (0.0, pytest.approx(0.01))


async def test_the_hold_of_a_request_still_running_is_renewed_past_its_ttl(redis_book) -> None:
    """A long stream outlives its hold's TTL: the replica serving it keeps it alive (the background
    sync renews it), so the budget goes on counting it; only a replica that died stops renewing."""
    store, counters, policy, clock = redis_book
    admitted = await admit(store, policy, None, clock())
    ttl = hold_ttl_s(policy.config)
    for _ in range(4):  # two TTLs, renewed every half of one
        clock.advance(ttl / 2)
        await store.renew(clock())
    await store.refresh(policy)
    assert counters.scope(GLOBAL).reserved == pytest.approx(admitted.reservation.amount)
    await store.settle(policy, admitted.reservation, None, 0.01, clock(), clock())
    await store.drain()
    await store.renew(clock() + ttl)  # settled: nothing left to renew
    assert (counters.scope(GLOBAL).reserved, counters.scope(GLOBAL).day) == (0.0, pytest.approx(0.01))


@pytest.mark.parametrize(
    "in_redis, in_ledger, expected",
    [
        (0.5, 0.3, 0.5),  # Redis ahead of the ledger (rows not yet written): kept
        (0.3, 0.5, 0.5),  # an old snapshot restored, or a flushed Redis: the ledger's figure
        (0.0, 0.0, 0.0),
    ],
)
async def test_seeding_takes_the_larger_figure_and_never_adds(redis_book, in_redis, in_ledger, expected) -> None:
    store, counters, policy, clock = redis_book
    if in_redis:
        await store.settle(policy, None, "bot", in_redis, clock(), clock())
    for _ in range(3):  # three replicas starting at once
        await store.seed({"bot": in_ledger}, {"bot": in_ledger})
    assert counters.scope("bot").day == pytest.approx(expected)
    assert counters.scope(GLOBAL).month == pytest.approx(expected)


async def test_a_dead_redis_fails_closed_or_falls_back_to_the_local_book(redis_prefix) -> None:
    clock = Clock.at(2026, 3, 10, 12)
    for on_error in ("fail_closed", "local"):
        counters = SpendCounters("UTC", clock())
        policy = policy_of("budget: {daily_usd: 1.0}\n", counters)
        client = Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2)
        health = StateHealth("redis://127.0.0.1:1/0", on_error)
        store = RedisSpend(client, redis_prefix, counters, health, clock)
        try:
            if on_error == "fail_closed":
                with pytest.raises(Exception, match=r"Redis at redis://127\.0\.0\.1:1/0 does not answer") as caught:
                    await admit(store, policy, None, clock())
                assert getattr(caught.value, "status", None) == 503
                assert "state.on_state_error" in str(caught.value)
            else:
                admitted = await admit(store, policy, None, clock())
                assert admitted.reservation.hold == ""  # held in this process
                await store.settle(policy, admitted.reservation, None, 0.2, clock(), clock())
                assert (counters.scope(GLOBAL).day, counters.scope(GLOBAL).reserved) == (pytest.approx(0.2), 0.0)
            assert not health.up and health.errors == 1  # the next requests do not try again: the sync does
        finally:
            await client.aclose()
