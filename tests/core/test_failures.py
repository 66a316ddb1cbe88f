"""Pure failure classification: what each upstream answer means for the chain."""

import pytest

from proxy.core.failures import Action, classify_status, parse_retry_after

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


@pytest.mark.parametrize(
    "status, error, action",
    [
        (408, None, Action.RETRY),
        (429, None, Action.RETRY),
        (500, None, Action.RETRY),
        (502, None, Action.RETRY),
        (503, None, Action.RETRY),
        (504, None, Action.RETRY),
        (524, None, Action.RETRY),
        (529, None, Action.RETRY),
        (400, {"message": "bad temperature"}, Action.CLIENT),
        (413, None, Action.CLIENT),
        (422, None, Action.CLIENT),
        (400, {"message": "This model's maximum context length is 8192 tokens"}, Action.NEXT),
        (400, {"message": "x", "code": "context_length_exceeded"}, Action.NEXT),
        (400, {"message": "busy", "metadata": {"availability": {"retryable": True}}}, Action.RETRY),
        (401, {"message": "No auth credentials found"}, Action.BAD_KEY),
        (402, {"message": "Insufficient credits"}, Action.OTHER_UPSTREAM),
        (403, {"message": "flagged by moderation"}, Action.NEXT),
        (404, {"message": "No endpoints found for x/y"}, Action.NEXT),
    ],
)
def test_classification(status, error, action):
    assert classify_status(status, error, {}).action is action


def test_client_errors_do_not_count_against_the_member():
    assert not classify_status(400, None, {}).counts_against_member
    assert classify_status(503, None, {}).counts_against_member


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"Retry-After": "3"}, 3.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"Retry-After": "Tue, 14 Nov 2023 22:13:40 GMT"}, 20.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-4"}, None),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1700000005000"}, 5.0),  # epoch milliseconds
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1700000004"}, 4.0),  # epoch seconds
        ({"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "1700000005000"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers, expected):
    assert parse_retry_after(headers, now=NOW) == expected
