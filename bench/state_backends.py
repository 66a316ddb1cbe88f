"""CPU per request of the proxy on `state.backend: local` against `redis`, measured in one run.

    python bench/state_backends.py [--requests 3000] [--connections 16] [--rounds 3] [--json out.json]

Starts the emulator and two proxies (`orproxy serve`, one worker each, the same bench config with a
daily budget so every request reserves and settles; one of them with `state: {backend: redis}` on the
machine's Redis at --redis and a key prefix of its own, deleted afterwards). Then, in rounds that
alternate which goes first, sends each the same number of non-streamed requests with a small aiohttp
load generator, and reads each proxy's own CPU time from /proc, and the redis-server's (its pid from
INFO). The goal (issue 12): Redis adds at most 25% CPU per request over local.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from redis import Redis
from run import API_KEY, BENCH, cpu_seconds, free_port, say
from shapes import PROMPT

BUDGET = "\nbudget: {daily_usd: 1000000}\nadmin: {key_env: BENCH_ADMIN_KEY}\n"


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=BENCH.parent,
        )


async def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


async def load(url: str, requests: int, connections: int) -> tuple[float, int]:
    """Send `requests` chat completions over `connections` connections; (seconds, errors)."""
    payload = json.dumps({"model": "cheap", "messages": PROMPT}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer unused"}
    left, errors = [requests], [0]

    async def worker(session: aiohttp.ClientSession) -> None:
        while left[0] > 0:
            left[0] -= 1
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()
                errors[0] += response.status != 200

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        return time.perf_counter() - began, errors[0]


async def admin_status(url: str) -> dict:
    """How the Redis proxy batched its calls to Redis (GET /admin/status)."""
    headers = {"Authorization": "Bearer bench"}
    async with aiohttp.ClientSession() as session, session.get(f"{url}/admin/status", headers=headers) as response:
        return (await response.json())["state"]["spend_book"]


async def main(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="orproxy-state-bench-"))
    prefix = f"orproxy-bench:{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(args.redis)
    redis_pid = int(redis.info("server")["process_id"])
    emu = free_port()
    upstream = f"http://127.0.0.1:{emu}/api/v1"
    procs = [start([sys.executable, "-m", "proxy.emulator", "--port", str(emu), "--api-key", API_KEY], tmp / "emu")]
    base = (BENCH / "bench-config.yaml").read_text().replace("http://127.0.0.1:9000/api/v1", upstream) + BUDGET
    proxies: dict[str, tuple[str, subprocess.Popen]] = {}
    try:
        for backend in ("local", "redis"):
            port = free_port()
            config = base + f"ledger: {{path: {tmp / backend}.sqlite3}}\n"
            if backend == "redis":
                config += f"state: {{backend: redis, url: '{args.redis}', prefix: '{prefix}'}}\n"
            path = tmp / f"{backend}.yaml"
            path.write_text(config)
            argv = [sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", str(port)]
            proc = start(argv, tmp / f"{backend}.log", {"BENCH_OPENROUTER_KEY": API_KEY, "BENCH_ADMIN_KEY": "bench"})
            procs.append(proc)
            proxies[backend] = (f"http://127.0.0.1:{port}", proc)
        await wait_ready(f"http://127.0.0.1:{emu}/api/v1/models")
        for url, _ in proxies.values():
            await wait_ready(f"{url}/healthz")
            await load(f"{url}/v1/chat/completions", 300, args.connections)  # warm-up, not counted
        samples: dict[str, list[dict]] = {name: [] for name in proxies}
        for round_ in range(args.rounds):
            order = list(proxies) if round_ % 2 == 0 else list(reversed(proxies))
            for name in order:
                url, proc = proxies[name]
                cpu0, redis0 = cpu_seconds(proc.pid), cpu_seconds(redis_pid)
                seconds, errors = await load(f"{url}/v1/chat/completions", args.requests, args.connections)
                cpu, redis_cpu = cpu_seconds(proc.pid) - cpu0, cpu_seconds(redis_pid) - redis0
                sample = {
                    "cpu_us_per_req": cpu / args.requests * 1e6,
                    "redis_cpu_us_per_req": redis_cpu / args.requests * 1e6,
                    "req_s": args.requests / seconds,
                    "errors": errors,
                }
                samples[name].append(sample)
                say(f"round {round_ + 1} {name:5}: {sample}")
        summary = {
            name: {key: statistics.median(s[key] for s in rows) for key in rows[0]} for name, rows in samples.items()
        }
        summary["redis"]["spend_book"] = await admin_status(proxies["redis"][0])
        local, shared = summary["local"]["cpu_us_per_req"], summary["redis"]["cpu_us_per_req"]
        summary["redis_over_local"] = {"proxy_cpu": shared / local - 1}
        return {"requests": args.requests, "connections": args.connections, "rounds": args.rounds, **summary}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        keys = list(redis.scan_iter(match=prefix + "*", count=1000))
        if keys:
            redis.delete(*keys)
        redis.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    print(json.dumps(result, indent=2))
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=2))
