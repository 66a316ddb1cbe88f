"""The connection caps: past `server.max_connections` with every connection busy, a clear 503 in
OpenAI's JSON; a connection that never sent a request makes room for a new one."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from proxy.emulator import Fault
from proxy.http.server import connection_cap
from tests.support.gateway import proxy_config_text

MISTRAL = "mistralai/mistral-7b-instruct"
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
)
BODY = orjson.dumps({"model": "cheap", "messages": [{"role": "user", "content": "hi"}]})


async def send(proxy, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(data)
    return reader, writer


@pytest.mark.realtime  # a request held in flight by the emulator's real latency
async def test_past_the_cap_with_every_connection_busy_is_a_503(make_proxy, emulator, schemas):
    proxy = await make_proxy(config_text=proxy_config_text(emulator.url) + "server: {max_connections: 1}\n")
    emulator.state.faults.set(MISTRAL, Fault(latency_s=0.5, times=1))
    busy_reader, busy_writer = await send(proxy, REQUEST % (len(BODY), BODY))
    await asyncio.sleep(0.1)  # the request is in flight upstream
    reader, writer = await send(proxy, REQUEST % (len(BODY), BODY))
    refused = await asyncio.wait_for(reader.read(), 2)
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head and b"x-proxy-route: -: " in head
    error = orjson.loads(body)
    schemas.validate("ErrorResponse", error)
    assert error["error"]["code"] == "too_many_connections" and "server.max_connections" in error["error"]["message"]
    served = await asyncio.wait_for(busy_reader.readuntil(b"\r\n\r\n"), 3)
    assert served.startswith(b"HTTP/1.1 200")  # the busy one was not cut
    for w in (busy_writer, writer):
        w.close()


async def test_a_silent_connection_makes_room_for_a_request(make_proxy, emulator):
    proxy = await make_proxy(config_text=proxy_config_text(emulator.url) + "server: {max_connections: 2}\n")
    silent = [await send(proxy, b"") for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await send(proxy, REQUEST % (len(BODY), BODY))
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)).startswith(b"HTTP/1.1 200")
    assert await asyncio.wait_for(silent[0][0].read(), 2) == b""  # the oldest silent one was closed
    writer.close()
    for _, w in silent:
        w.close()


@pytest.mark.parametrize("configured, files, cap", [(1000, 1024, 480), (1000, 65536, 1000), (10, 1024, 10)])
def test_the_cap_fits_the_file_limit(configured, files, cap):
    assert connection_cap(configured, files) == cap
