"""Real parts of a scaled deployment for the tests: proxy replicas (real processes), nginx in front
of them, a PostgreSQL database and a Redis key prefix of their own, and a Redis server a test may
stop and start again."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import free_port, require_tool, start_proxy, wait_until_up

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def psql(sql: str, dsn: str = PG_ADMIN) -> str:
    """One statement through Debian's psql client: unaligned, tuples only."""
    done = subprocess.run(
        ["psql", dsn, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise AssertionError(f"psql failed: {done.stderr}")
    return done.stdout.strip()


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A database of its own (its DSN), dropped afterwards with whatever still holds it."""
    name = f"orproxy_test_{uuid.uuid4().hex[:12]}"
    psql(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def redis_cli(*args: str, port: int = 6379) -> str:
    done = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"redis-cli {args}: {done.stderr}")
    return done.stdout.strip()


def redis_keys(prefix: str, port: int = 6379) -> list[str]:
    found = redis_cli("--scan", "--pattern", f"{prefix}*", port=port)
    return [key for key in found.splitlines() if key]


@contextlib.contextmanager
def redis_prefix(port: int = 6379) -> Iterator[str]:
    """A key prefix of its own; its keys are deleted afterwards (never anyone else's)."""
    prefix = f"orproxy-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        for key in redis_keys(prefix, port):
            redis_cli("DEL", key, port=port)


@dataclass
class RedisServer:
    """A redis-server of the test's own, on a free port, that the test may stop and start again."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = require_tool("redis-server", "redis-server")
        self.process = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.directory),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            with contextlib.suppress(AssertionError):
                if redis_cli("PING", port=self.port) == "PONG":
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"redis-server on port {self.port} did not come up")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()  # as a crash would: no save, no goodbye
            await self.process.wait()
        self.process = None


@dataclass
class Replica:
    port: int
    process: asyncio.subprocess.Process
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_replicas(config: Path, directory: Path, count: int) -> list[Replica]:
    """`count` proxy processes on one config (each its own port), all answering /healthz."""
    replicas: list[Replica] = []
    try:
        for index in range(count):
            port = free_port()
            log = directory / f"replica-{index}.log"
            replicas.append(Replica(port, await start_proxy(config, log, port), log))
        await asyncio.gather(*(wait_until_up(r.url, r.process, r.log) for r in replicas))
    except BaseException:  # none left running when one does not come up
        for replica in replicas:
            if replica.process.returncode is None:
                replica.process.kill()
                await replica.process.wait()
        raise
    return replicas


async def stop_replicas(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.process.returncode is None:
            replica.process.send_signal(signal.SIGTERM)
    for replica in replicas:
        try:
            await asyncio.wait_for(replica.process.wait(), 20)
        except TimeoutError:
            replica.process.kill()
            await replica.process.wait()


NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 2048; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream orproxy {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://orproxy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 60s;
            proxy_next_upstream error;
        }}
    }}
}}
"""


@contextlib.asynccontextmanager
async def nginx_in_front(replicas: list[Replica], directory: Path) -> AsyncIterator[str]:
    """nginx balancing over the replicas, as deploy/scale/nginx.conf does; yields its URL."""
    binary = require_tool("nginx", "nginx-light")
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{r.port} max_fails=0;" for r in replicas)
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, servers=servers, port=port))
    process = await asyncio.create_subprocess_exec(
        binary, "-c", str(conf), "-p", str(directory), "-e", str(directory / "nginx-error.log"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_up(url, process, directory / "nginx-error.log")
        yield url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGQUIT)  # nginx's graceful stop
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
