"""OpenAI's Files and Batches routes (`/v1/files...`, `/v1/batches...`, also under `/api/v1`): upload
a JSONL file of requests, start a batch over it (the whole file is checked first: a bad line fails
the batch in `validating`, naming its line, and nothing runs), poll it, cancel it, download its
output and error files. With client keys configured, a key sees only its own files and batches,
and its batch lines run under its name (its budget, its model list)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from proxy.batch.lifecycle import cancel, new_id, render
from proxy.batch.runner import APIS_BY_NAME, BatchRunner
from proxy.config import Config
from proxy.core.apis import Api
from proxy.core.batch import (
    COMPLETION_WINDOWS,
    ENDPOINTS,
    FAILED,
    IN_PROGRESS,
    MAX_ERRORS_SHOWN,
    VALIDATING,
    BatchRecord,
    FileRecord,
    expiry_of,
    parse_input,
)
from proxy.core.errors import BodyTooLarge, InvalidRequest, ProxyError, ServiceUnavailable
from proxy.core.keys import ClientKey
from proxy.core.routing import UnknownModel
from proxy.http.api import model_not_found
from proxy.http.appkeys import ACCOUNTANT, METRICS, RUNTIME, STATE
from proxy.http.body import RequestTimeout, read_body
from proxy.http.errors import openai_errors
from proxy.money.batch_store import BatchStore, open_batch_store
from proxy.ops.runtime import Runtime

JSON = "application/json"
READ_CHUNK = 1 << 16


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


@dataclass(slots=True)
class BatchSlot:
    """The batch store and runner, opened with the ledger at start-up (None before and after)."""

    store: BatchStore | None = None
    runner: BatchRunner | None = None

    def parts(self) -> tuple[BatchStore, BatchRunner]:
        if self.store is None or self.runner is None:
            raise ServiceUnavailable("The batch store is not open (the proxy is starting or stopping).")
        return self.store, self.runner


BATCHES = web.AppKey("batches", BatchSlot)


def register(router: web.UrlDispatcher) -> None:
    for prefix in ("/v1", "/api/v1"):
        router.add_post(f"{prefix}/files", openai_errors(upload_file))
        router.add_get(f"{prefix}/files/{{file_id}}", openai_errors(retrieve_file))
        router.add_get(f"{prefix}/files/{{file_id}}/content", openai_errors(file_content))
        router.add_delete(f"{prefix}/files/{{file_id}}", openai_errors(delete_file))
        router.add_post(f"{prefix}/batches", openai_errors(create_batch))
        router.add_get(f"{prefix}/batches", openai_errors(list_batches))
        router.add_get(f"{prefix}/batches/{{batch_id}}", openai_errors(retrieve_batch))
        router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", openai_errors(cancel_batch))


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type=JSON)


def _client(request: web.Request) -> tuple[Runtime, ClientKey]:
    runtime = request.app[RUNTIME].current
    return runtime, runtime.policy.keys.authenticate(request.headers.get("Authorization"))


def _mine(owner: str | None, client: ClientKey) -> bool:
    return client.name is None or owner == client.name


# --- files -------------------------------------------------------------------------------------


async def upload_file(request: web.Request) -> web.Response:
    runtime, client = _client(request)
    store, _ = request.app[BATCHES].parts()
    limit = runtime.config.batches.max_file_bytes
    if not request.content_type.startswith("multipart/"):
        raise InvalidRequest("Upload the file as multipart/form-data with `file` and `purpose`.", param="file")
    timeout_s = runtime.config.server.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            purpose, filename, content = await _read_upload(request, limit)
    except TimeoutError:
        raise RequestTimeout(f"The upload did not arrive within {timeout_s:g} s (server.body_timeout_s).") from None
    if purpose != "batch":
        raise InvalidRequest("This proxy stores files for batches only: set purpose to 'batch'.", param="purpose")
    if content is None:
        raise InvalidRequest("The upload has no `file` part.", param="file")
    now = request.app[ACCOUNTANT].now()
    record = FileRecord(new_id("file-", now), purpose, filename, len(content), int(now), client.name)
    await store.add_file(record, bytes(content))
    return _json(record.to_object())


async def _read_upload(request: web.Request, limit: int) -> tuple[str | None, str, bytearray | None]:
    """The multipart form's `purpose` and `file` (its name and bytes), the file at most `limit` bytes."""
    reader = await request.multipart()
    purpose: str | None = None
    filename, content = "upload.jsonl", None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = (await part.read(decode=True)).decode("utf-8", "replace").strip()
        elif part.name == "file":
            filename = (part.filename or filename)[:256]
            content = bytearray()
            while chunk := await part.read_chunk(READ_CHUNK):
                content.extend(chunk)
                if len(content) > limit:
                    raise BodyTooLarge(f"The file is larger than {limit} bytes (batches.max_file_bytes).", param="file")
    return purpose, filename, content


async def _file(request: web.Request) -> tuple[BatchStore, FileRecord]:
    _, client = _client(request)
    store, _ = request.app[BATCHES].parts()
    file_id = request.match_info["file_id"]
    record = await store.file(file_id)
    if record is None or not _mine(record.key_name, client):
        raise NotFound(f"No such file: {file_id[:100]}", param="file_id")
    return store, record


async def retrieve_file(request: web.Request) -> web.Response:
    _, record = await _file(request)
    return _json(record.to_object())


async def file_content(request: web.Request) -> web.Response:
    store, record = await _file(request)
    content = await store.file_content(record.id)
    return web.Response(
        body=content or b"", content_type="application/jsonl" if content else "application/octet-stream"
    )


async def delete_file(request: web.Request) -> web.Response:
    store, record = await _file(request)
    deleted = await store.delete_file(record.id)
    return _json({"id": record.id, "object": "file", "deleted": deleted})


# --- batches -----------------------------------------------------------------------------------


async def create_batch(request: web.Request) -> web.Response:
    runtime, client = _client(request)
    store, runner = request.app[BATCHES].parts()
    body = await read_body(request, runtime.config.max_body_bytes, runtime.config.server.body_timeout_s)
    endpoint, window = body.get("endpoint"), body.get("completion_window")
    if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}.", param="endpoint")
    if not isinstance(window, str) or window not in COMPLETION_WINDOWS:
        raise InvalidRequest(
            f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}.", param="completion_window"
        )
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or len(metadata) > 16
        or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items())
    ):
        raise InvalidRequest("metadata must map at most 16 keys to strings of 512 characters.", param="metadata")
    file_id = body.get("input_file_id")
    record = await store.file(file_id) if isinstance(file_id, str) else None
    if record is None or not _mine(record.key_name, client) or record.purpose != "batch":
        raise NotFound(f"No such input file: {str(file_id)[:100]}", param="input_file_id")
    content = await store.file_content(record.id) or b""
    api = APIS_BY_NAME[ENDPOINTS[endpoint]]
    check = functools.partial(_check_line, api, client, runtime)
    settings = runtime.config.batches
    # Off the event loop: a file of 50,000 lines takes a while to parse and route.
    lines, errors = await asyncio.to_thread(parse_input, content, endpoint, max_lines=settings.max_lines, check=check)
    now = request.app[ACCOUNTANT].now()
    batch = BatchRecord(
        id=new_id("batch_", now),
        endpoint=endpoint,
        input_file_id=record.id,
        completion_window=window,
        status=VALIDATING,
        created_at=int(now),
        expires_at=expiry_of(now, window),
        key_name=client.name,
        metadata=metadata,
        upstream=settings.upstream,
    )
    if errors:
        batch = replace(batch, status=FAILED, failed_at=int(now), errors=tuple(errors[:MAX_ERRORS_SHOWN]))
        await store.create_batch(batch, [])
    else:
        batch = replace(batch, status=IN_PROGRESS, in_progress_at=int(now), total=len(lines))
        await store.create_batch(batch, lines)
        runner.wake()
    return _json(await render(store, batch))


def _check_line(api: Api, client: ClientKey, runtime: Runtime, body: dict[str, Any]) -> None:
    """A line's body as the API, the client's key and the routing would take it (nothing reserved)."""
    api.check(body)
    client.check_model(body["model"])
    try:
        runtime.policy.router.plan(body["model"], api.features(body, {}))
    except UnknownModel as exc:
        raise model_not_found(exc, runtime) from None


async def _batch(request: web.Request) -> tuple[BatchStore, BatchRunner, BatchRecord]:
    _, client = _client(request)
    store, runner = request.app[BATCHES].parts()
    batch_id = request.match_info["batch_id"]
    batch = await store.batch(batch_id)
    if batch is None or not _mine(batch.key_name, client):
        raise NotFound(f"No such batch: {batch_id[:100]}", param="batch_id")
    return store, runner, batch


async def retrieve_batch(request: web.Request) -> web.Response:
    store, _, batch = await _batch(request)
    return _json(await render(store, batch))


async def list_batches(request: web.Request) -> web.Response:
    _, client = _client(request)
    store, _ = request.app[BATCHES].parts()
    try:
        limit = min(100, max(1, int(request.query.get("limit", "20"))))
    except ValueError:
        raise InvalidRequest("limit must be an integer from 1 to 100.", param="limit") from None
    after = request.query.get("after")
    found: list[BatchRecord] = []
    cursor = after
    while len(found) <= limit:  # a key's own batches, skipping others' (one page of the store at a time)
        page = await store.batches(limit + 1, cursor)
        found += [b for b in page if _mine(b.key_name, client)]
        if len(page) <= limit:
            break
        cursor = page[-1].id
    data = [await render(store, b) for b in found[:limit]]
    return _json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(found) > limit,
        }
    )


async def cancel_batch(request: web.Request) -> web.Response:
    """Stops new lines at once; lines in flight finish and are kept, as are finished results."""
    store, runner, batch = await _batch(request)
    cancelling = await cancel(store, batch, request.app[ACCOUNTANT].now())
    if cancelling is None:
        raise Conflict(f"Cannot cancel a batch with status {batch.status}.", param="batch_id")
    runner.wake()
    return _json(await render(store, cancelling))


async def halt_batches(app: web.Application) -> None:
    runner = app[BATCHES].runner
    if runner is not None:
        runner.halt()


def batch_context(config: Config, env: Mapping[str, str], ledger_path: Path):
    """The batch store (in the ledger's database, `ledger.backend`'s, opened after the ledger made
    its tables) and the runner, for the app's lifetime; at shutdown the runner lets lines in flight
    finish first."""
    shutdown_timeout_s = config.shutdown_timeout_s

    async def context(app: web.Application) -> AsyncIterator[None]:
        store = await open_batch_store(config, env, ledger_path)
        state = app[STATE]
        metrics = app[METRICS]
        runner = BatchRunner(store, app[ACCOUNTANT], app[RUNTIME], state, metrics.gauges, metrics)
        slot = app[BATCHES]
        slot.store, slot.runner = store, runner
        task = asyncio.create_task(runner.run(), name="batch-runner")
        try:
            yield
        finally:
            await runner.stop(shutdown_timeout_s)
            # The loop ends after its current step (a submission to OpenRouter is noted, not cut).
            done, _ = await asyncio.wait([task], timeout=shutdown_timeout_s)
            if not done:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            slot.store = slot.runner = None
            await store.close()

    return context
