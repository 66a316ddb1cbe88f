"""The reload probes of the `batches.*` keys (tests/ops/test_reload_every_key.py): each runs a batch
through the reloaded proxy over HTTP and checks what the new value changes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from proxy.emulator import Fault
from proxy.emulator.batches import BATCH_DESK
from proxy.http.appkeys import METRICS
from tests.support.timing import wait_for

MISTRAL = "mistralai/mistral-7b-instruct"
TERMINAL = ("completed", "failed", "expired", "cancelled")


def lines(count: int, model: str = "cheap") -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"probe-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"probe {i}"}]},
            }
        )
        + b"\n"
        for i in range(count)
    )


async def upload(live: Any, content: bytes) -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename="probe.jsonl", content_type="application/jsonl")
    return await live.http.post("/v1/files", data=form)


async def start(live: Any, count: int = 3, model: str = "cheap") -> dict[str, Any]:
    uploaded = await upload(live, lines(count, model))
    assert uploaded.status == 200, await uploaded.text()
    file_id = (await uploaded.json())["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    created = await live.http.post("/v1/batches", json=body)
    assert created.status == 200, await created.text()
    return await created.json()


async def retrieve(live: Any, batch_id: str) -> dict[str, Any]:
    return await (await live.http.get(f"/v1/batches/{batch_id}")).json()


async def finished(live: Any, batch_id: str, timeout: float = 10.0) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        batch = await retrieve(live, batch_id)
        return batch if batch["status"] in TERMINAL else None

    return await wait_for(ended, timeout, interval=0.02, message=f"batch {batch_id} did not finish")


async def run_batch(live: Any, count: int = 3, model: str = "cheap") -> dict[str, Any]:
    return await finished(live, (await start(live, count, model))["id"])


# --- probes ---------------------------------------------------------------------------------


async def one_line_at_a_time(live: Any) -> None:
    live.emulator.state.faults.set(MISTRAL, Fault(latency_s=0.1, times=None))
    started = time.monotonic()
    batch = await run_batch(live, 5)
    assert batch["status"] == "completed"
    assert time.monotonic() - started >= 0.45, "5 lines held 0.1 s each ran side by side"


async def spend_a_batch(live: Any) -> None:
    assert (await run_batch(live, 2))["status"] == "completed"


async def paused_by_the_share(live: Any) -> None:
    batch = await start(live, 3)

    async def paused() -> bool:
        return bool((await retrieve(live, batch["id"]))["x_proxy"]["paused_until"])

    await wait_for(paused, 5, interval=0.02, message="the batch did not pause on its budget share")
    assert (await retrieve(live, batch["id"]))["request_counts"]["completed"] == 0


async def cheapest_member_first(live: Any) -> None:
    live.emulator.state.requests.clear()
    assert (await run_batch(live, 2))["status"] == "completed"
    assert {r.model for r in live.recorded()} == {MISTRAL}  # the chain's first member is the dearer gpt-4o-mini


async def sent_to_openrouter_batches(live: Any) -> None:
    live.emulator.state.requests.clear()
    batch = await run_batch(live, 3)
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
    assert {r.path for r in live.recorded()} == {"/api/v1/batches"}
    assert len(live.emulator.app[BATCH_DESK].batches) == 1


async def waits_for_live_traffic(live: Any) -> None:
    live.emulator.state.faults.set("anthropic/claude-sonnet-4.5", Fault(latency_s=0.4, times=1))
    interactive = asyncio.create_task(live.chat("quality"))
    gauges = live.proxy.app[METRICS].gauges
    await wait_for(lambda: gauges.in_flight >= 1, 2, interval=0.005)
    live.emulator.state.requests.clear()
    batch = await start(live, 2)
    await asyncio.sleep(0.25)  # several runner steps while the interactive request is in flight
    assert [r for r in live.recorded() if r.model == MISTRAL] == [], "a batch line went out beside live traffic"
    status, _, _ = await interactive
    assert status == 200
    assert (await finished(live, batch["id"]))["status"] == "completed"


async def slow_openrouter_batch(live: Any) -> None:
    live.emulator.app[BATCH_DESK].delay_s = 0.3
    batch = await start(live, 2)
    # Polled every 0.05 s now (30 s before): it completes soon after the emulator's 0.3 s.
    assert (await finished(live, batch["id"], timeout=5))["status"] == "completed"


async def two_lines_at_most(live: Any) -> None:
    batch = await start(live, 3)
    assert batch["status"] == "failed"
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [(3, "too_many_lines")]


async def small_files_only(live: Any) -> None:
    response = await upload(live, b"x" * 4096)
    assert response.status == 413
