"""The pure part of the Batch API (`proxy.core.batch`) as tables: an input file line by line, the
scheduling gates, the cheapest-first order, the terminal status, the result lines' shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.config import parse_config
from proxy.core.batch import (
    BatchRecord,
    LineResult,
    cheapest_first,
    dispatch_wait,
    finished_status,
    parse_input,
    result_line,
    share_left,
)
from proxy.core.errors import InvalidRequest
from proxy.core.features import RequestFeatures
from proxy.core.pricing import Catalogue, PriceBook
from proxy.core.routing import Router

CHAT = "/v1/chat/completions"


def line(custom_id: str = "a", url: str = CHAT, body: Any = None, method: str = "POST") -> bytes:
    body = {"model": "cheap", "messages": [{"role": "user", "content": "hi"}]} if body is None else body
    return orjson.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def refuse_model_x(body: dict[str, Any]) -> None:
    if body.get("model") == "x":
        raise InvalidRequest("The model 'x' does not exist.", param="model", code="model_not_found")


@pytest.mark.parametrize(
    ("content", "errors"),
    [
        (line("a") + b"\n" + line("b"), []),
        (line("a") + b"\n\n  \n" + line("b") + b"\n", []),  # blank lines are not lines
        (b"", [(None, "empty_file")]),
        (line("a") + b"\n{oops", [(2, "invalid_json_line")]),
        (b"[1, 2]", [(1, "invalid_request")]),
        (line("") + b"\n" + line("x" * 513), [(1, "invalid_custom_id"), (2, "invalid_custom_id")]),
        (line("a") + b"\n" + line("b") + b"\n" + line("a"), [(3, "duplicate_custom_id")]),
        (line("a", method="GET"), [(1, "invalid_method")]),
        (line("a", url="/v1/embeddings"), [(1, "invalid_url")]),
        (line("a", url="/v1/images/generations"), [(1, "invalid_url")]),
        (line("a", body=[1]), [(1, "invalid_request")]),
        (line("a", body={"model": "cheap", "stream": True, "messages": []}), [(1, "invalid_request")]),
        (line("a", body={"model": "x", "messages": []}), [(1, "model_not_found")]),
        (b"\n".join(line(str(i)) for i in range(4)), [(4, "too_many_lines")]),
    ],
    ids=[
        "two-good-lines",
        "blank-lines",
        "empty",
        "invalid-json",
        "not-an-object",
        "custom-id-empty-or-long",
        "duplicate",
        "method",
        "other-endpoint",
        "unknown-endpoint",
        "body-not-object",
        "streamed",
        "refused-by-the-check",
        "past-max-lines",
    ],
)
def test_an_input_file_line_by_line(content: bytes, errors: list[tuple[int | None, str]]) -> None:
    lines, found = parse_input(content, CHAT, max_lines=3, check=refuse_model_x)
    assert [(e.line, e.code) for e in found] == errors
    if not errors:
        assert [(x.line, x.custom_id) for x in lines] == [(1, "a"), (2 if b"\n\n" not in content else 4, "b")]
    for error in found:
        if error.line is not None:
            assert f"line {error.line}" in error.message


def test_a_refused_body_names_its_parameter_under_body() -> None:
    _, (error,) = parse_input(line("a", body={"model": "x"}), CHAT, max_lines=10, check=refuse_model_x)
    assert (error.param, error.message) == ("body.model", "line 1: The model 'x' does not exist.")


@pytest.mark.parametrize(
    ("in_flight", "busy", "limited", "wait"),
    [
        (0, 8, False, None),
        (7, 8, False, None),
        (8, 8, False, "busy"),
        (0, 1, False, None),
        (1, 1, False, "busy"),
        (0, 8, True, "rate_limited"),
    ],
)
def test_live_traffic_comes_first(in_flight: int, busy: int, limited: bool, wait: str | None) -> None:
    assert dispatch_wait(interactive_in_flight=in_flight, busy_in_flight=busy, rate_limited=limited) == wait


@pytest.mark.parametrize(
    ("spent", "daily", "share", "left"),
    [(0.0, None, 0.3, None), (0.0, 10.0, 1.0, None), (1.0, 10.0, 0.3, 2.0), (3.5, 10.0, 0.3, 0.0)],
)
def test_the_budget_share_left(spent: float, daily: float | None, share: float, left: float | None) -> None:
    found = share_left(spent, daily, share)
    assert (found is None) == (left is None)
    assert found == pytest.approx(left)


def test_cheapest_first_orders_a_chain_by_its_worst_case_and_keeps_ties_in_order() -> None:
    config = parse_config(
        """
upstreams: {openrouter: {base_url: "http://127.0.0.1:1/api/v1"}}
models:
  mixed: {chain: [anthropic/claude-sonnet-4.5, openai/gpt-4o-mini, mistralai/mistral-7b-instruct, x/unknown]}
""",
        "t.yaml",
    )
    catalogue = Catalogue.parse(
        {
            "data": [
                {"id": "anthropic/claude-sonnet-4.5", "pricing": {"prompt": "0.000003", "completion": "0.000015"}},
                {"id": "openai/gpt-4o-mini", "pricing": {"prompt": "0.00000015", "completion": "0.0000006"}},
                {
                    "id": "mistralai/mistral-7b-instruct",
                    "pricing": {"prompt": "0.000000028", "completion": "0.000000054"},
                },
            ]
        }
    )
    prices = PriceBook(catalogue, config.pricing)
    plan = Router(config).plan("mixed", RequestFeatures(prompt_tokens=100, max_tokens=50))
    ordered = cheapest_first(plan, prices, 100, 50)
    assert [t.model for t in ordered.targets] == [
        "mistralai/mistral-7b-instruct",
        "openai/gpt-4o-mini",
        "anthropic/claude-sonnet-4.5",
        "x/unknown",  # no price: priced as the dearest, so last
    ]
    assert ordered.chain_owner == plan.chain_owner == "mixed"


def batch(status: str, *, cancelling_at: int | None = None, expires_at: int = 1000) -> BatchRecord:
    return BatchRecord("batch_1", CHAT, "file-1", "24h", status, 0, expires_at, cancelling_at=cancelling_at)


@pytest.mark.parametrize(
    ("record", "now", "status"),
    [
        (batch("in_progress"), 10, "completed"),
        (batch("in_progress"), 1000, "expired"),
        (batch("cancelling", cancelling_at=5), 10, "cancelled"),
        (batch("finalizing", cancelling_at=5), 10, "cancelled"),  # a finalization resumed after a crash
        (batch("finalizing"), 2000, "expired"),
    ],
)
def test_the_status_a_batch_ends_in(record: BatchRecord, now: float, status: str) -> None:
    assert finished_status(record, now) == status


def test_result_lines_take_openai_shape() -> None:
    ok = orjson.loads(result_line("batch_req_1", LineResult("a", "r-1", 200, {"id": "x"})))
    assert ok == {
        "id": "batch_req_1",
        "custom_id": "a",
        "response": {"status_code": 200, "request_id": "r-1", "body": {"id": "x"}},
        "error": None,
    }
    expired = orjson.loads(result_line("batch_req_2", LineResult("b", None, None, None, "batch_expired", "late")))
    assert expired["response"] is None and expired["error"] == {"code": "batch_expired", "message": "late"}


def test_a_batch_object_leaves_out_what_it_has_not_reached() -> None:
    shown = batch("in_progress").to_object()
    assert "output_file_id" not in shown and "completed_at" not in shown and "x_proxy" not in shown
    assert shown["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch("in_progress").to_object(0.25)["x_proxy"]["cost_usd"] == 0.25
