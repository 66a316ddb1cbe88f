"""The emulator's OpenRouter Batch API, as OpenRouter documents it: submit (202, `validating`), poll
(results inline once terminal), paged results, list, delete; lines billed at the batch discount."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.emulator import EMULATOR_STATE, create_emulator_app
from proxy.emulator.batches import BATCH_DESK
from tests.support.gateway import UPSTREAM_KEY
from tests.support.timing import Clock

AUTH = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
MISTRAL = "mistralai/mistral-7b-instruct"


def submission(count: int = 3, model: str = MISTRAL, **extra: Any) -> dict[str, Any]:
    requests = [
        {"custom_id": f"c{i}", "body": {"messages": [{"role": "user", "content": f"line {i}"}], "max_tokens": 20}}
        for i in range(count)
    ]
    return {"endpoint": "/v1/chat/completions", "model": model, "requests": requests, **extra}


@pytest.fixture
async def batch_emulator(aiohttp_client):
    clock = Clock()
    app = create_emulator_app(api_key=UPSTREAM_KEY, clock=clock)
    return await aiohttp_client(app), app, clock


async def test_a_batch_is_validated_run_after_its_delay_and_billed_at_the_discount(batch_emulator) -> None:
    client, app, clock = batch_emulator
    desk, state = app[BATCH_DESK], app[EMULATOR_STATE]
    desk.discount, desk.delay_s = 0.5, 60
    created = await client.post("/api/v1/batches", json=submission(), headers=AUTH)
    assert created.status == 202
    batch = await created.json()
    assert (batch["status"], batch["results"], batch["request_counts"]["total"]) == ("validating", None, 3)

    polled = await (await client.get(f"/api/v1/batches/{batch['id']}", headers=AUTH)).json()
    assert polled["status"] == "in_progress" and state.bills == {}
    early = await client.get(f"/api/v1/batches/{batch['id']}/results", headers=AUTH)
    assert early.status == 409

    clock.advance(61)
    done = await (await client.get(f"/api/v1/batches/{batch['id']}", headers=AUTH)).json()
    assert done["status"] == "completed" and done["finalized_at"] is not None
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert [r["custom_id"] for r in done["results"]] == ["c0", "c1", "c2"]
    model = state.models[MISTRAL]
    for result in done["results"]:
        body = result["response"]["body"]
        assert result["error"] is None and result["response"]["status_code"] == 200
        usage = body["usage"]
        full = usage["prompt_tokens"] * model.prices.prompt + usage["completion_tokens"] * model.prices.completion
        assert usage["cost"] == pytest.approx(full * 0.5)
        assert state.bills[body["id"]].cost == usage["cost"]
    assert state.key_usage == pytest.approx(sum(b.cost for b in state.bills.values()))

    page = await (await client.get(f"/api/v1/batches/{batch['id']}/results?limit=2", headers=AUTH)).json()
    assert [r["custom_id"] for r in page["data"]] == ["c0", "c1"] and page["has_more"]
    rest = await (
        await client.get(f"/api/v1/batches/{batch['id']}/results?limit=2&cursor={page['next_cursor']}", headers=AUTH)
    ).json()
    assert [r["custom_id"] for r in rest["data"]] == ["c2"] and not rest["has_more"] and rest["next_cursor"] is None

    listed = await (await client.get("/api/v1/batches", headers=AUTH)).json()
    assert [b["id"] for b in listed["data"]] == [batch["id"]] and listed["data"][0]["results"] is None
    assert (await client.delete(f"/api/v1/batches/{batch['id']}", headers=AUTH)).status == 200
    assert (await client.get(f"/api/v1/batches/{batch['id']}", headers=AUTH)).status == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"requests": submission()["requests"], "endpoint": "/v1/chat/completions", "model": MISTRAL}, "before"),
        (submission(endpoint="/v1/images"), "Unsupported batch endpoint"),
        (submission(model="no/such-model"), "not a valid model ID"),
        (submission(count=0), "non-empty"),
        (submission(completion_window="1h"), "24h"),
    ],
    ids=["requests-first", "endpoint", "model", "no-requests", "window"],
)
async def test_a_submission_openrouter_would_refuse(batch_emulator, body: dict[str, Any], message: str) -> None:
    client, _, _ = batch_emulator
    response = await client.post("/api/v1/batches", json=body, headers=AUTH)
    assert response.status == 400
    assert message in (await response.json())["error"]["message"]


async def test_a_model_that_does_not_batch_and_a_line_naming_another_model(batch_emulator) -> None:
    client, app, _ = batch_emulator
    app[BATCH_DESK].models = frozenset({"openai/gpt-4o-mini"})
    refused = await client.post("/api/v1/batches", json=submission(), headers=AUTH)
    assert refused.status == 400 and "does not support batch" in (await refused.json())["error"]["message"]
    other = submission(model="openai/gpt-4o-mini")
    other["requests"][1]["body"]["model"] = MISTRAL
    mismatch = await client.post("/api/v1/batches", json=other, headers=AUTH)
    assert mismatch.status == 400 and "requests[1]" in (await mismatch.json())["error"]["message"]


async def test_a_running_batch_cannot_be_deleted_and_a_bad_line_fails_alone(batch_emulator) -> None:
    client, app, clock = batch_emulator
    app[BATCH_DESK].delay_s = 10
    body = submission(2)
    body["requests"][1]["body"]["messages"] = []
    batch = await (await client.post("/api/v1/batches", json=body, headers=AUTH)).json()
    assert (await client.delete(f"/api/v1/batches/{batch['id']}", headers=AUTH)).status == 409
    clock.advance(11)
    done = await (await client.get(f"/api/v1/batches/{batch['id']}", headers=AUTH)).json()
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    failed = done["results"][1]
    assert failed["response"] is None and "messages" in failed["error"]["message"]
    assert (await client.get("/api/v1/batches", headers={})).status == 401
