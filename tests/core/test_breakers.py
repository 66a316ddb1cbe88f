"""The circuit breaker behind retry.cooldown, with time passed in."""

from proxy.config import Cooldown
from proxy.core.breakers import CircuitBreakers
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
