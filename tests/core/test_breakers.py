"""The circuit breaker behind retry.cooldown, with time passed in."""

import pytest

from proxy.config import Cooldown
from proxy.core.breakers import CircuitBreakers, blamed
from proxy.core.failures import Failure, classify_status, connection_failure, names_input
from proxy.core.routing import Target

T = Target("a/b", "openrouter")


def test_opens_after_failures_within_window_and_closes_after_cooldown():
    policy = Cooldown(failures=3, window_s=60, cooldown_s=30)
    breakers = CircuitBreakers()
    assert not breakers.record_failure(policy, T, 0)
    assert not breakers.record_failure(policy, T, 10)
    assert breakers.record_failure(policy, T, 20)
    assert breakers.is_open(T, 49.9)
    assert breakers.active(49.9)[T].reason == "cooldown"
    assert not breakers.is_open(T, 50.0)


def test_old_failures_fall_out_of_the_window():
    policy = Cooldown(failures=3, window_s=60, cooldown_s=30)
    breakers = CircuitBreakers()
    breakers.record_failure(policy, T, 0)
    breakers.record_failure(policy, T, 10)
    assert not breakers.record_failure(policy, T, 61)
    assert not breakers.is_open(T, 62)


def test_success_resets_the_count():
    policy = Cooldown(failures=2, window_s=60, cooldown_s=30)
    breakers = CircuitBreakers()
    breakers.record_failure(policy, T, 0)
    breakers.record_success(T)
    assert not breakers.record_failure(policy, T, 1)
    assert breakers.record_failure(policy, T, 2)


def test_memory_stays_bounded_whatever_targets_fail():
    from proxy.core.breakers import MAX_TRACKED

    policy = Cooldown(failures=3, window_s=60, cooldown_s=30)
    breakers = CircuitBreakers()
    for i in range(MAX_TRACKED * 3):
        breakers.record_failure(policy, Target(f"bogus/model-{i}", "openrouter"), now=float(i) / 1000)
    assert len(breakers._failures) <= MAX_TRACKED
    # A target with a live window is still counted: the breaker still opens on its third failure.
    assert not breakers.record_failure(policy, T, 20.0)
    assert not breakers.record_failure(policy, T, 20.1)
    assert breakers.record_failure(policy, T, 20.2)


def test_a_breaker_opens_only_on_failures_of_distinct_requests():
    policy = Cooldown(failures=3, window_s=60, cooldown_s=30)
    breakers = CircuitBreakers()
    one, two, three = object(), object(), object()
    for now in (0.0, 1.0, 2.0, 3.0):  # one request failing four times is one request
        assert not breakers.record_failure(policy, T, now, request=one)
    assert not breakers.record_failure(policy, T, 4.0, request=two)
    assert breakers.record_failure(policy, T, 5.0, request=three)


A, B, C = Target("a/one", "openrouter"), Target("b/two", "openrouter"), Target("c/three", "openai")


def failure(status: int | None = 503, message: str = "Provider returned error", **error) -> Failure:
    if status is None:
        return connection_failure("Cannot connect to host")
    return classify_status(status, {"message": message, **error}, {})


@pytest.mark.parametrize(
    "failures, served, expected",
    [
        ([(A, failure()), (A, failure())], True, [A]),  # A failed twice for one request that B then served
        ([(A, failure()), (A, failure())], False, [A]),  # a single-member chain: its own health
        ([(A, failure()), (B, failure())], True, [A, B]),  # both failed, C served: both are unhealthy
        ([(A, failure()), (B, failure())], False, []),  # the same request failing on every member: the request
        ([(A, failure(None)), (B, failure(None))], False, [A, B]),  # no connection: never the request's doing
        ([(A, failure(500, "Invalid input: messages[0].content"))], True, []),  # the upstream names the input
        ([(A, failure(502, "Provider error", param="tools"))], True, []),  # a `param` names the input
        ([(A, failure(400, "Bad Request"))], False, []),  # a client error is never the member's
        ([(A, failure(404, "No endpoints found"))], True, [A]),  # 404: this member cannot serve it
        ([(A, failure(401, "User not found"))], False, []),  # the proxy's key: not the member's health
    ],
)
def test_which_failures_count_against_a_member(failures, served, expected):
    assert blamed(failures, served) == expected


@pytest.mark.parametrize(
    "message, error, names",
    [
        ("Provider returned error", {}, False),
        ("Internal Server Error", {}, False),
        ("No endpoints found that can handle the request", {}, False),
        ("Invalid request: messages[1].content must be a string", {}, True),
        ("malformed JSON in tool arguments", {}, True),
        ("Unsupported value: 'temperature' does not support 3.0", {}, True),
        ("upstream timeout", {"param": "response_format"}, True),
        ("Failed to parse the request body", {}, True),
    ],
)
def test_an_error_that_names_the_input(message, error, names):
    assert names_input({"message": message, **error}, message) is names
    assert classify_status(500, {"message": message, **error}, {}).counts_against_member is not names


def test_unblock_closes_open_breakers():
    policy = Cooldown(failures=1, window_s=60, cooldown_s=30)
    breakers = CircuitBreakers()
    breakers.record_failure(policy, A, 0)
    breakers.record_failure(policy, B, 0)
    assert breakers.close("a/one") == [A]
    assert list(breakers.active(1)) == [B]
    assert breakers.close() == [B] and not breakers.active(1)
