"""Redis for the state tests: the machine's own at 127.0.0.1:6379, a key prefix of each test's own,
its keys deleted afterwards (other tests and helpers share the server: never FLUSHALL)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import openai
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from tests.support.gateway import Proxy

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def _used_prefixes() -> Iterator[list[str]]:
    """Every prefix handed out, swept once more at the end: a proxy a test stopped after its
    prefix's own clean-up (fixtures end in reverse order) may still write a last settlement."""
    used: list[str] = []
    yield used
    client = SyncRedis.from_url(REDIS_URL)
    try:
        for prefix in used:
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def redis_prefix(_used_prefixes: list[str]) -> AsyncIterator[str]:
    prefix = f"orproxy-test:{uuid.uuid4().hex[:12]}:"
    _used_prefixes.append(prefix)
    yield prefix
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def state_block(prefix: str, url: str = REDIS_URL, on_state_error: str = "fail_closed", timeout_ms: int = 2000) -> str:
    return (
        f"state: {{backend: redis, url: '{url}', prefix: '{prefix}', on_state_error: {on_state_error}, "
        f"timeout_ms: {timeout_ms}}}\n"
    )


async def burst(replicas: Sequence[Proxy], body: dict[str, Any], count: int = 100) -> list[Any]:
    """`count` clients at once, spread over the replicas in turn: each answer, or the budget's 429."""
    clients = [proxy.client(timeout=10) for proxy in replicas]

    async def one(index: int) -> Any:
        try:
            return await clients[index % len(clients)].chat.completions.create(**body)
        except openai.RateLimitError as exc:
            return exc

    return await asyncio.gather(*(one(i) for i in range(count)))
