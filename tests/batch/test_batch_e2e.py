"""The Batch API end to end: the official `openai` SDK uploads, creates, polls and downloads against a
real proxy in front of the emulator; the ledger is audited against the emulator's own bill.

Every batch and file object is checked against OpenAI's published schemas (Batch, OpenAIFile,
ListBatchesResponse, DeleteFileResponse) and every answer in an output file against its
chat-completion schema; the lines' own envelope has no published schema, so its shape is checked
field by field."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.emulator import Fault
from proxy.emulator.batches import BATCH_DESK
from proxy.http.batches import BATCHES
from proxy.money.ledger_rows import to_nano
from tests.support.audit import billed_nano, booked_nano
from tests.support.gateway import UPSTREAM_KEY, Proxy
from tests.support.timing import wait_for

TERMINAL = ("completed", "failed", "expired", "cancelled")
MISTRAL = "mistralai/mistral-7b-instruct"
AUTH = {"Authorization": "Bearer client-key-unused"}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def chat_lines(count: int, model: str = "cheap", prefix: str = "item") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"rewrite {prefix} {i}"}]},
        }
        for i in range(count)
    ]


async def raw(proxy: Proxy, path: str) -> dict[str, Any]:
    """The proxy's own JSON, not the SDK's model of it: what the schemas are checked against."""
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}{path}", headers=AUTH) as response:
        return await response.json()


async def until_done(client: Any, batch_id: str, timeout: float = 20.0) -> Any:
    async def finished() -> Any:
        batch = await client.batches.retrieve(batch_id)
        return batch if batch.status in TERMINAL else None

    return await wait_for(finished, timeout, interval=0.05, message=f"batch {batch_id} did not finish")


def parse(content: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in content.splitlines() if line.strip()]


async def batch_rows(proxy: Proxy, batch_id: str) -> list[Any]:
    await proxy.ledger.flush()
    return [row for row in await proxy.ledger.rows() if row.batch_id == batch_id]


async def test_the_whole_flow_through_the_openai_sdk(
    ledger_config,
    make_proxy,
    emulator,
    schemas,
    openai_api_schemas,  # the schema outlives the proxy
) -> None:
    proxy = await make_proxy(extra="batches: {concurrency: 4}\n" + ledger_config)
    client = proxy.client()
    lines = chat_lines(24) + chat_lines(6, model=MISTRAL, prefix="direct")
    uploaded = await client.files.create(file=("catalogue.jsonl", jsonl(lines)), purpose="batch")
    openai_api_schemas.validate("OpenAIFile", await raw(proxy, f"/v1/files/{uploaded.id}"))
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))

    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "seo"}
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 30
    openai_api_schemas.validate("Batch", await raw(proxy, f"/v1/batches/{batch.id}"))

    done = await until_done(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (30, 0)
    assert done.error_file_id is None and done.metadata == {"job": "seo"}
    final = await raw(proxy, f"/v1/batches/{batch.id}")
    openai_api_schemas.validate("Batch", final)
    openai_api_schemas.validate("ListBatchesResponse", await raw(proxy, "/v1/batches"))

    output = parse((await client.files.content(done.output_file_id)).content)
    by_id = {line["custom_id"]: line for line in output}
    assert set(by_id) == {line["custom_id"] for line in lines}
    for line in lines:
        answer = by_id[line["custom_id"]]
        assert answer["error"] is None and answer["response"]["status_code"] == 200
        assert answer["id"].startswith("batch_req_")
        body = answer["response"]["body"]
        schemas.validate("CreateChatCompletionResponse", body)
        # The emulator echoes the line's own prompt: each answer went with its request.
        said = "You said: " + line["body"]["messages"][0]["content"]
        assert body["choices"][0]["message"]["content"].endswith(said)

    rows = await batch_rows(proxy, batch.id)
    assert sorted(row.custom_id for row in rows) == sorted(by_id)
    assert {row.request_id for row in rows} == {a["response"]["request_id"] for a in output}
    # The auditor: every generation the emulator billed is booked once, at its figure, to the nano-dollar.
    assert booked_nano(rows) == billed_nano(emulator)
    ledger_total = sum(to_nano(row.cost_usd) for row in rows)
    assert ledger_total == sum(billed_nano(emulator).values()) > 0
    assert to_nano(final["x_proxy"]["cost_usd"]) == ledger_total

    deleted = await client.files.delete(uploaded.id)
    assert deleted.deleted
    report = await raw(proxy, "/admin/spend?period=day&by=batch")
    assert report  # the admin route answers; the CLI's --by batch is tested in tests/cli


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", "invalid_json_line"),
        (orjson.dumps({"custom_id": "a", "method": "POST", "url": "/v1/images", "body": {}}), "invalid_url"),
        (
            orjson.dumps(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
                }
            ),
            "model_not_found",
        ),
        (
            orjson.dumps(
                {
                    "custom_id": "item-0",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "cheap", "messages": [{"role": "user", "content": "again"}]},
                }
            ),
            "duplicate_custom_id",
        ),
    ],
    ids=["invalid-json", "unknown-endpoint", "unknown-model", "duplicate-custom-id"],
)
async def test_a_bad_line_fails_the_batch_in_validating_naming_its_line(
    make_proxy, emulator, openai_api_schemas, line: bytes, code: str
) -> None:
    proxy = await make_proxy()
    client = proxy.client()
    good = jsonl(chat_lines(3))
    content = good + line + b"\n" + jsonl(chat_lines(1, prefix="after"))
    uploaded = await client.files.create(file=("bad.jsonl", content), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
    error = batch.errors.data[0]
    assert (error.line, error.code) == (4, code), batch.errors
    assert "line 4" in (error.message or "")
    openai_api_schemas.validate("Batch", await raw(proxy, f"/v1/batches/{batch.id}"))
    # Nothing ran and nothing was spent.
    await asyncio.sleep(0.3)  # the runner's tick: it must find nothing to run
    assert emulator.state.bills == {} and emulator.state.requests == []
    assert await batch_rows(proxy, batch.id) == []


async def test_too_many_lines_and_a_too_large_file_are_refused(make_proxy, emulator) -> None:
    proxy = await make_proxy(extra="batches: {max_lines: 2, max_file_bytes: 2048}\n")
    client = proxy.client()
    uploaded = await client.files.create(file=("three.jsonl", jsonl(chat_lines(3))), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.errors is not None
    assert (batch.errors.data[0].line, batch.errors.data[0].code) == (3, "too_many_lines")
    with pytest.raises(openai.APIStatusError) as refused:
        await client.files.create(file=("big.jsonl", b"x" * 4096), purpose="batch")
    assert refused.value.status_code == 413


async def test_cancel_stops_new_lines_and_keeps_finished_results(make_proxy, emulator) -> None:
    proxy = await make_proxy(extra="batches: {concurrency: 2}\n")
    emulator.state.faults.set(MISTRAL, Fault(latency_s=0.05, times=None))
    client = proxy.client()
    uploaded = await client.files.create(file=("many.jsonl", jsonl(chat_lines(200, model=MISTRAL))), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def some_done() -> bool:
        current = await client.batches.retrieve(batch.id)
        return current.request_counts.completed >= 4

    await wait_for(some_done, 10, interval=0.02)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = await until_done(client, batch.id)
    assert done.status == "cancelled"
    kept = parse((await client.files.content(done.output_file_id)).content)
    assert 4 <= len(kept) < 200 and len(kept) == done.request_counts.completed
    sent = len(emulator.state.requests)
    await asyncio.sleep(0.3)
    assert len(emulator.state.requests) == sent, "lines were sent after the cancel"
    assert sent <= len(kept) + 2  # at most the lines in flight at the cancel (concurrency 2) beyond those kept
    unrun = parse((await client.files.content(done.error_file_id)).content)
    assert {line["error"]["code"] for line in unrun} == {"batch_cancelled"}
    assert len(kept) + len(unrun) == 200
    rows = await batch_rows(proxy, batch.id)
    assert booked_nano(rows) == billed_nano(emulator)


async def test_the_openrouter_path_books_the_discounted_cost(make_proxy, emulator, schemas) -> None:
    desk = emulator.app[BATCH_DESK]
    desk.discount, desk.delay_s = 0.5, 0.2
    proxy = await make_proxy(extra="batches: {upstream: openrouter, poll_s: 0.05}\n")
    client = proxy.client()
    lines = chat_lines(12)  # cheap: its first member is on the OpenRouter upstream
    uploaded = await client.files.create(file=("or.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await until_done(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 12
    # The emulator's batch was submitted once, polled to completion and its results mapped back.
    (upstream,) = desk.batches.values()
    assert upstream.status == "completed" and upstream.model == MISTRAL and len(upstream.requests) == 12
    assert [r.path for r in emulator.state.requests] == ["/api/v1/batches"] * 12
    output = parse((await client.files.content(done.output_file_id)).content)
    assert {line["custom_id"] for line in output} == {line["custom_id"] for line in lines}
    for line in output:
        schemas.validate("CreateChatCompletionResponse", line["response"]["body"])
    rows = await batch_rows(proxy, batch.id)
    assert booked_nano(rows) == billed_nano(emulator)
    # Booked at the batch price: half of what the same tokens cost interactively.
    model = emulator.state.models[MISTRAL]
    for row in rows:
        full = row.prompt_tokens * model.prices.prompt + row.completion_tokens * model.prices.completion
        assert to_nano(row.cost_usd) == to_nano(full * 0.5) and row.cost_source == "upstream"
    assert proxy.app[BATCHES].store is not None


@pytest.mark.parametrize("crash", ["id-noted", "id-lost", "never-created"])
async def test_an_openrouter_batch_survives_a_restart_of_the_proxy(make_proxy, emulator, tmp_path, crash) -> None:
    """Submitted upstream, then the proxy stops: the next one polls the same upstream batch to its end
    and books each line once. `id-lost`: as if the proxy died between creating the upstream batch and
    noting its id; the next one finds it in OpenRouter's list instead of submitting the lines again.
    `never-created`: as if it died before OpenRouter created it; the next one sends the lines."""
    desk = emulator.app[BATCH_DESK]
    desk.delay_s = 0.5
    ledger = tmp_path / "shared-ledger.sqlite3"
    extra = "batches: {upstream: openrouter, poll_s: 0.05}\n"
    first = await make_proxy(extra=extra, ledger_path=ledger)
    client = first.client()
    uploaded = await client.files.create(file=("or.jsonl", jsonl(chat_lines(5))), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await wait_for(lambda: len(desk.batches) == 1, 5, interval=0.02)
    await first.server.close()  # stops its runner and closes the ledger before the upstream batch ends
    assert emulator.state.bills == {}
    if crash != "id-noted":
        (upstream,) = desk.batches.values()
        if crash == "never-created":
            desk.batches.clear()
            emulator.state.requests.clear()
        with sqlite3.connect(ledger) as raw:
            raw.execute(
                "UPDATE batch_lines SET state = 'submitting', upstream_batch = ? WHERE batch_id = ?",
                (f"openrouter:?{MISTRAL}@{upstream.created_at - 1:.0f}", batch.id),
            )

    second = await make_proxy(extra=extra, ledger_path=ledger)
    done = await until_done(second.client(), batch.id)
    assert done.status == "completed" and done.request_counts.completed == 5
    assert len(desk.batches) == 1  # polled again, never submitted twice
    rows = await batch_rows(second, batch.id)
    assert len(rows) == 5 and booked_nano(rows) == billed_nano(emulator)


async def test_a_client_key_sees_only_its_own_files_and_batches(make_proxy, emulator) -> None:
    keys = "keys: [{name: alpha, key_env: ALPHA_KEY}, {name: beta, key_env: BETA_KEY}]\n"
    env = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "ALPHA_KEY": "a-1", "BETA_KEY": "b-2"}
    proxy = await make_proxy(extra=keys, env=env)
    alpha, beta = proxy.client(api_key="a-1"), proxy.client(api_key="b-2")
    uploaded = await alpha.files.create(file=("mine.jsonl", jsonl(chat_lines(2))), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        await beta.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        await beta.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = await alpha.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        await beta.batches.retrieve(batch.id)
    assert [b.id async for b in beta.batches.list()] == []
    assert [b.id async for b in alpha.batches.list()] == [batch.id]
    await until_done(alpha, batch.id)
    rows = await batch_rows(proxy, batch.id)
    assert {row.key_name for row in rows} == {"alpha"}  # its lines ran under its key: its budget
    with pytest.raises(openai.AuthenticationError):
        await proxy.client(api_key="wrong").batches.list()


@pytest.mark.realtime  # a body that stalls for longer than server.body_timeout_s on a real socket
async def test_an_upload_slower_than_the_body_timeout_is_a_408(make_proxy, emulator) -> None:
    proxy = await make_proxy(extra="server: {body_timeout_s: 0.3}\n")
    boundary = "orproxy-test-boundary"

    async def stalling():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        ).encode()
        await asyncio.sleep(2)
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(f"{proxy.url}/v1/files", data=stalling(), headers=headers) as response:
                status, body = response.status, await response.json()
        except aiohttp.ClientError:  # the proxy may close the socket under the rest of the upload
            pytest.fail("the proxy closed the connection instead of answering 408")
    assert status == 408 and body["error"]["code"] == "request_timeout"
