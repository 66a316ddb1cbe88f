"""The retry/fallback policy as tables: attempt results in, decisions out; no sockets, no sleeping."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.config import Cooldown, Retry
from proxy.core.errors import ProxyError
from proxy.core.failures import Action, Failure, classify_status, connection_failure, timeout_failure
from proxy.core.redact import redact
from proxy.core.retry import Call, Decision, Done, GiveUp, RetryPolicy, ToClient, Wait, backoff_delay, exhausted_error
from proxy.core.routing import Block, Plan, Target

ROOT = Path(__file__).resolve().parents[2]  # the checkout under test, whatever is installed
NOW = 1_700_000_000.0
A = Target("vendor/a", "openrouter")
B = Target("vendor/b", "openrouter")
C = Target("gpt-4o-mini", "openai")
KEY_ENVS = {"openrouter": "OPENROUTER_API_KEY", "openai": "OPENAI_API_KEY"}
SECRET = "sk-or-v1-0123456789abcdef"
# base backoff 1 s doubling to a 3 s cap; jitter fixed at 0.5, so each wait is 3/4 of its base
RETRY = Retry(attempts_per_model=3, backoff_s=1.0, backoff_max_s=3.0, max_retry_after_s=10.0, cooldown=Cooldown())


def http(status: int, message: str = "", retry_after: float | None = None, code: str | None = None) -> Failure:
    error = {"message": message or f"upstream said {status}", **({"code": code} if code else {})}
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
    return classify_status(status, error, headers, now=NOW)


@dataclass(frozen=True)
class Step:
    """One attempt's result: a failure (None: success) and whether the member's breaker is open after it."""

    failure: Failure | None
    breaker_open: bool = False


OK = Step(None)


def policy_for(*targets: Target, retry: Retry = RETRY, skipped: tuple = (), jitter: float = 0.5) -> RetryPolicy:
    plan = Plan("chain", "chain", targets=targets, skipped=skipped)
    return RetryPolicy(plan, retry, key_envs=KEY_ENVS, secrets=(SECRET,), jitter=lambda: jitter)


def drive(policy: RetryPolicy, steps: list[Step]) -> list[Decision]:
    decisions: list[Decision] = [policy.start(NOW)]
    for step in steps:
        if step.failure is None:
            decisions.append(policy.succeeded(0.25))
        else:
            decisions.append(policy.failed(step.failure, now=NOW, breaker_open=step.breaker_open, duration_s=0.25))
    return decisions


def given_up(decision: Decision) -> ProxyError:
    assert isinstance(decision, GiveUp), decision
    return decision.error


def shape(decision: Decision) -> tuple:
    """A decision as plain values, so tables can spell it out (errors compare by identity)."""
    match decision:
        case Call(target, number):
            return ("call", str(target), number)
        case Wait(target, number, delay):
            return ("wait", str(target), number, delay)
        case Done(target):
            return ("done", str(target))
        case GiveUp(error) | ToClient(error):
            return (type(decision).__name__, error.status, error.code, error.retry_after)
    raise AssertionError(decision)


def test_retry_then_success_on_the_same_member():
    policy = policy_for(A, B)
    decisions = drive(policy, [Step(http(503)), OK])
    assert [shape(d) for d in decisions] == [
        ("call", "vendor/a", 1),
        ("wait", "vendor/a", 2, 0.75),
        ("done", "vendor/a"),
    ]
    assert [(a.target, a.outcome, a.status, a.duration_s) for a in policy.attempts] == [
        (A, "http_503", 503, 0.25),
        (A, "ok", 200, 0.25),
    ]


@pytest.mark.parametrize(
    "targets, steps, expected",
    [
        pytest.param(
            (A, B),
            [Step(http(429, retry_after=2)), OK],
            [("call", "vendor/a", 1), ("wait", "vendor/a", 2, 2.0), ("done", "vendor/a")],
            id="retry-after-within-the-cap-waits-exactly-that",
        ),
        pytest.param(
            (A, B),
            [Step(http(429, retry_after=10)), OK],
            [("call", "vendor/a", 1), ("wait", "vendor/a", 2, 10.0), ("done", "vendor/a")],
            id="retry-after-at-the-cap-still-waits",
        ),
        pytest.param(
            (A, B),
            [Step(http(429, retry_after=30)), OK],
            [("call", "vendor/a", 1), ("call", "vendor/b", 1), ("done", "vendor/b")],
            id="retry-after-beyond-the-cap-moves-on-at-once",
        ),
        pytest.param(
            (A, B),
            [Step(http(503)), Step(http(503)), Step(http(503)), OK],
            [
                ("call", "vendor/a", 1),
                ("wait", "vendor/a", 2, 0.75),
                ("wait", "vendor/a", 3, 1.5),
                ("call", "vendor/b", 1),
                ("done", "vendor/b"),
            ],
            id="attempts-per-model-then-the-next-member",
        ),
        pytest.param(
            (A, B),
            [Step(http(400, "This model's maximum context length is 8192 tokens")), OK],
            [("call", "vendor/a", 1), ("call", "vendor/b", 1), ("done", "vendor/b")],
            id="context-length-moves-on",
        ),
        pytest.param(
            (A, B),
            [Step(http(404, "No endpoints found for vendor/a")), OK],
            [("call", "vendor/a", 1), ("call", "vendor/b", 1), ("done", "vendor/b")],
            id="404-moves-on",
        ),
        pytest.param(
            (A, B, C),
            [Step(http(401)), OK],
            [("call", "vendor/a", 1), ("call", "gpt-4o-mini@openai", 1), ("done", "gpt-4o-mini@openai")],
            id="401-skips-the-rest-of-that-upstream",
        ),
        pytest.param(
            (A, B, C),
            [Step(http(402)), OK],
            [("call", "vendor/a", 1), ("call", "gpt-4o-mini@openai", 1), ("done", "gpt-4o-mini@openai")],
            id="402-moves-only-to-another-upstream",
        ),
        pytest.param(
            (A, C, B),
            [Step(http(503)), Step(http(503)), Step(http(503)), Step(http(402)), OK],
            [
                ("call", "vendor/a", 1),
                ("wait", "vendor/a", 2, 0.75),
                ("wait", "vendor/a", 3, 1.5),
                ("call", "gpt-4o-mini@openai", 1),
                ("call", "vendor/b", 1),
                ("done", "vendor/b"),
            ],
            id="402-on-openai-leaves-openrouter-members-alive",
        ),
        pytest.param(
            (A, B),
            [Step(http(503), breaker_open=True), OK],
            [("call", "vendor/a", 1), ("call", "vendor/b", 1), ("done", "vendor/b")],
            id="breaker-open-after-the-first-failure-moves-on",
        ),
        pytest.param(
            (A, B),
            [Step(http(503)), Step(timeout_failure("x"), breaker_open=True), OK],
            [("call", "vendor/a", 1), ("wait", "vendor/a", 2, 0.75), ("call", "vendor/b", 1), ("done", "vendor/b")],
            id="breaker-opening-mid-retries-moves-on",
        ),
        pytest.param(
            (A, B),
            [Step(http(429, retry_after=1), breaker_open=True), OK],
            [("call", "vendor/a", 1), ("call", "vendor/b", 1), ("done", "vendor/b")],
            id="breaker-open-beats-retry-after",
        ),
        pytest.param(
            (A, B),
            [Step(connection_failure("refused")), Step(http(502)), Step(http(529)), Step(http(408)), OK],
            [
                ("call", "vendor/a", 1),
                ("wait", "vendor/a", 2, 0.75),
                ("wait", "vendor/a", 3, 1.5),
                ("call", "vendor/b", 1),
                ("wait", "vendor/b", 2, 0.75),
                ("done", "vendor/b"),
            ],
            id="backoff-starts-over-on-each-member",
        ),
        pytest.param(
            (A, B),
            [Step(http(400, "busy"))],
            [("call", "vendor/a", 1), ("ToClient", 400, None, None)],
            id="400-goes-straight-to-the-client",
        ),
        pytest.param(
            (A, B),
            [Step(http(413))],
            [("call", "vendor/a", 1), ("ToClient", 413, None, None)],
            id="413-goes-straight-to-the-client",
        ),
        pytest.param(
            (A, B),
            [Step(http(422, code="invalid_tool_schema"))],
            [("call", "vendor/a", 1), ("ToClient", 422, "invalid_tool_schema", None)],
            id="422-goes-straight-to-the-client-with-its-code",
        ),
    ],
)
def test_decisions(targets, steps, expected):
    policy = policy_for(*targets)
    decisions = drive(policy, steps)
    assert [shape(d) for d in decisions] == expected


@pytest.mark.parametrize(
    "number, jitter, expected",
    [
        (1, 0.0, 0.5),  # equal jitter: never less than half the base ...
        (1, 1.0, 1.0),  # ... nor more than the base
        (1, 0.5, 0.75),
        (2, 0.5, 1.5),  # doubles per attempt
        (3, 0.5, 2.25),  # 1 * 2**2 = 4, capped at backoff_max_s = 3
        (4, 0.5, 2.25),
        (5, 0.0, None),  # the last attempt on the member: move on
    ],
)
def test_backoff_doubles_and_caps(number, jitter, expected):
    retry = Retry(attempts_per_model=5, backoff_s=1.0, backoff_max_s=3.0)
    assert backoff_delay(retry, http(503), number, lambda: jitter) == expected


@pytest.mark.parametrize(
    "failure, expected",
    [
        (http(429, retry_after=4), 4.0),
        (http(429, retry_after=11), None),
        (http(404), None),
        (http(401), None),
        (http(402), None),
        (http(400), None),
    ],
)
def test_backoff_delay_by_failure(failure, expected):
    assert backoff_delay(RETRY, failure, 1, lambda: 0.5) == expected


def test_jitter_is_drawn_only_for_a_backoff():
    draws: list[int] = []

    def jitter() -> float:
        draws.append(1)
        return 0.5

    policy = RetryPolicy(Plan("m", "m", targets=(A, B)), RETRY, key_envs=KEY_ENVS, secrets=(), jitter=jitter)
    policy.start(NOW)
    policy.failed(http(429, retry_after=1), now=NOW, breaker_open=False)
    assert draws == []
    policy.failed(http(503), now=NOW, breaker_open=False)
    assert draws == [1]


# ----------------------------------------------------------------- an exhausted chain


@pytest.mark.parametrize(
    "targets, steps, status, code, retry_after",
    [
        pytest.param((A, B), [Step(http(401))], 502, "upstream_auth_failed", None, id="401-nothing-else-answers"),
        pytest.param(
            (A, C),
            [Step(http(401)), Step(http(401))],
            502,
            "upstream_auth_failed",
            None,
            id="401-from-every-upstream",
        ),
        pytest.param(
            (A, C),
            [Step(http(401)), Step(http(404))],
            502,
            "upstream_failed",
            None,
            id="401-and-another-failure-is-a-plain-502",
        ),
        pytest.param((A, B), [Step(http(402))], 502, "upstream_failed", None, id="402-with-no-other-upstream"),
        pytest.param(
            (A, B),
            [Step(http(429, retry_after=30)), Step(http(429, retry_after=20))],
            429,
            "rate_limit_exceeded",
            20.0,
            id="all-rate-limited-beyond-the-cap-smallest-wait",
        ),
        pytest.param(
            (A, B),
            [Step(http(429, retry_after=7))] * 3 + [Step(http(429, retry_after=4))] * 3,
            429,
            "rate_limit_exceeded",
            4.0,
            id="all-rate-limited-after-waiting-smallest-wait",
        ),
        pytest.param(
            (A,),
            [Step(http(429))] * 3,
            429,
            "rate_limit_exceeded",
            1.0,
            id="all-rate-limited-without-a-hint-says-one-second",
        ),
        pytest.param(
            (A, B),
            [Step(timeout_failure("x"))] * 6,
            504,
            "upstream_timeout",
            None,
            id="all-timeouts",
        ),
        pytest.param(
            (A, B),
            [Step(timeout_failure("x"))] * 3 + [Step(http(503))] * 3,
            502,
            "upstream_failed",
            None,
            id="mixed-failures",
        ),
        pytest.param(
            (A, B),
            [Step(http(404)), Step(http(429, retry_after=30))],
            502,
            "upstream_failed",
            None,
            id="one-not-rate-limited-is-a-502",
        ),
    ],
)
def test_exhausted_chain_gives_the_most_telling_error(targets, steps, status, code, retry_after):
    policy = policy_for(*targets)
    decisions = drive(policy, steps)
    assert all(isinstance(d, Call | Wait) for d in decisions[:-1])
    last = decisions[-1]
    assert isinstance(last, GiveUp)
    assert (last.error.status, last.error.code, last.error.retry_after) == (status, code, retry_after)
    assert len(policy.attempts) == len(steps)


def test_the_502_lists_every_attempt_and_the_skipped_members():
    skipped = ((C, Block("cooldown", NOW + 30, "3 failures within 60s")),)
    policy = policy_for(A, B, skipped=skipped, retry=Retry(attempts_per_model=1))
    decisions = drive(policy, [Step(http(503, "a is overloaded")), Step(http(404, "x " * 200))])
    error = given_up(decisions[-1])
    assert error.message.startswith("Every member of 'chain' failed (2 attempts): ")
    assert "vendor/a: 503 http_503 (a is overloaded)" in error.message
    assert "vendor/b: 404 http_404 (" + "x " * 79 + "x…)" in error.message  # clipped to 160 characters
    assert error.message.endswith("; skipped gpt-4o-mini@openai: cooldown")


def test_a_refused_proxy_key_names_the_variable_to_fix():
    policy = policy_for(A, C)
    decisions = drive(policy, [Step(http(401)), Step(http(401))])
    error = given_up(decisions[-1])
    assert "(OPENROUTER_API_KEY, OPENAI_API_KEY)" in error.message
    assert "not your key" in error.message
    assert set(policy.dead_upstreams) == {"openrouter", "openai"}
    assert all(f.action is Action.BAD_KEY for f in policy.dead_upstreams.values())


def test_a_direct_model_is_named_by_its_slug():
    plan = Plan("vendor/a", None, targets=(A,))
    policy = RetryPolicy(plan, Retry(attempts_per_model=1), key_envs=KEY_ENVS, secrets=(), jitter=lambda: 0.5)
    decisions = drive(policy, [Step(timeout_failure("connecting"))])
    assert "Every member of 'vendor/a' timed out" in given_up(decisions[-1]).message


# ----------------------------------------------------------------- nothing could be tried


def no_key(target: Target) -> tuple[Target, Block]:
    return target, Block("no_api_key", None, "set X")


@pytest.mark.parametrize(
    "skipped, status, code, retry_after",
    [
        pytest.param((no_key(A), no_key(B)), 401, "upstream_key_missing", None, id="no-key-anywhere"),
        pytest.param(
            ((A, Block("cooldown", NOW + 30)), (B, Block("cooldown", NOW + 12))),
            503,
            "upstream_unavailable",
            12.0,
            id="all-cooling-down-soonest-reopening",
        ),
        pytest.param(
            ((A, Block("rate_limited", NOW + 40)), (B, Block("rate_limited", NOW + 25))),
            429,
            "rate_limit_exceeded",
            25.0,
            id="all-rate-limited-soonest-reset",
        ),
        pytest.param(
            ((A, Block("rate_limited", NOW + 40)), (B, Block("cooldown", NOW + 25))),
            503,
            "upstream_unavailable",
            25.0,
            id="rate-limited-and-cooling-down",
        ),
        pytest.param(
            (no_key(A), (B, Block("cooldown", NOW + 5))),
            503,
            "upstream_unavailable",
            5.0,
            id="no-key-and-cooling-down",
        ),
        pytest.param(((A, Block("cooldown", NOW - 3)),), 503, "upstream_unavailable", 0.0, id="reset-already-past"),
        pytest.param((), 503, "upstream_unavailable", None, id="empty-plan"),
    ],
)
def test_all_members_skipped(skipped, status, code, retry_after):
    policy = policy_for(skipped=skipped)
    decision = policy.start(NOW)
    assert isinstance(decision, GiveUp)
    assert (decision.error.status, decision.error.code, decision.error.retry_after) == (status, code, retry_after)
    assert policy.attempts == []


def test_no_upstream_key_names_each_variable_once():
    error = exhausted_error(Plan("cheap", "cheap", skipped=(no_key(A), no_key(B), no_key(C))), [], {}, KEY_ENVS, NOW)
    assert "set the environment variable OPENAI_API_KEY or OPENROUTER_API_KEY where the proxy runs" in error.message


def test_an_upstream_missing_from_key_envs_is_named_itself():
    plan = Plan("cheap", "cheap", skipped=(no_key(Target("m", "local")),))
    assert "variable local " in exhausted_error(plan, [], {}, {}, NOW).message


# ----------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "text, secrets, expected",
    [
        ("no secret here", ("sk-1",), "no secret here"),
        ("key sk-1 and sk-1 again", ("sk-1",), "key [redacted] and [redacted] again"),
        ("sk-1 / sk-2", ("sk-1", "sk-2"), "[redacted] / [redacted]"),
        ("sk-1-long", ("sk-1", "sk-1-long"), "[redacted]"),  # the longer key first: no tail left readable
        ("plain", ("",), "plain"),  # an unset key redacts nothing
        ("plain", (), "plain"),
    ],
)
def test_redact(text, secrets, expected):
    assert redact(text, secrets) == expected


def test_secrets_never_reach_an_attempt_or_a_client_error():
    policy = policy_for(A, B)
    decisions = drive(policy, [Step(http(503, f"bad key {SECRET}")), Step(http(400, f"echo Bearer {SECRET}"))])
    to_client = decisions[-1]
    assert isinstance(to_client, ToClient)
    assert to_client.error.message == "echo Bearer [redacted]"
    assert [a.message for a in policy.attempts] == ["bad key [redacted]", "echo Bearer [redacted]"]


def test_secrets_never_reach_the_exhausted_chain_error():
    policy = policy_for(A, retry=Retry(attempts_per_model=1))
    decisions = drive(policy, [Step(http(503, f"Authorization: Bearer {SECRET}"))])
    error = given_up(decisions[-1])
    assert SECRET not in error.message and "[redacted]" in error.message


# ----------------------------------------------------------------- misuse and purity


def test_a_result_without_a_call_in_flight_is_refused():
    policy = policy_for(A, retry=Retry(attempts_per_model=1))
    with pytest.raises(RuntimeError, match="no attempt in flight"):
        policy.succeeded(0.1)
    policy.start(NOW)
    policy.failed(http(503), now=NOW, breaker_open=False)  # the chain is now exhausted
    with pytest.raises(RuntimeError, match="no attempt in flight"):
        policy.failed(http(503), now=NOW, breaker_open=False)
    with pytest.raises(RuntimeError, match="start called twice"):
        policy.start(NOW)


def test_the_policy_imports_no_io():
    """Checked in a fresh interpreter, so what other tests imported cannot hide a dependency."""
    forbidden = (
        "aiohttp",
        "aiosqlite",
        "prometheus_client",
        "proxy.upstream",
        "proxy.http",
        "proxy.ops",
        "proxy.money",
    )
    script = (
        "import sys, proxy.core.retry, proxy.core.redact\n"
        f"print('\\n'.join(m for m in sys.modules if m.startswith({forbidden!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == ""
