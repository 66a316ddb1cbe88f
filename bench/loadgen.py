"""A small aiohttp load generator with wrk's output format, for machines without wrk (bench/run.py
falls back to it): python bench/loadgen.py URL CONNECTIONS SECONDS, with the body in the file
$BENCH_BODY_FILE, the key in $BENCH_KEY, and the summary written as JSON to $BENCH_OUT."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path


def loadgen(url: str, connections: int, duration: float) -> None:
    """A small aiohttp load generator with wrk's output format, for machines without wrk."""
    import aiohttp

    payload, out = Path(os.environ["BENCH_BODY_FILE"]).read_bytes(), os.environ["BENCH_OUT"]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {os.environ['BENCH_KEY']}"}
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}

    async def worker(session: aiohttp.ClientSession, deadline: float) -> None:
        while (start := time.perf_counter()) < deadline:
            try:
                async with session.post(url, data=payload, headers=headers) as response:
                    await response.read()
                    errors["status"] += response.status >= 400
            except (TimeoutError, aiohttp.ClientError):
                errors["read"] += 1
                continue
            latencies.append(time.perf_counter() - start)

    async def main() -> float:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), timeout=timeout) as s:
            began = time.perf_counter()
            await asyncio.gather(*(worker(s, began + duration) for _ in range(connections)))
            return time.perf_counter() - began

    try:
        import uvloop

        elapsed = uvloop.run(main())
    except ImportError:
        elapsed = asyncio.run(main())
    latencies.sort()
    n = max(1, len(latencies))

    def pct(p: float) -> int:
        return int(latencies[min(n - 1, int(p / 100 * n))] * 1e6) if latencies else 0

    Path(out).write_text(
        json.dumps(
            {
                "requests": len(latencies),
                "duration_us": int(elapsed * 1e6),
                "bytes": 0,
                "errors": errors,
                "latency_us": {
                    "min": pct(0),
                    "mean": statistics.fmean(latencies) * 1e6 if latencies else 0,
                    "p50": pct(50),
                    "p90": pct(90),
                    "p99": pct(99),
                    "max": pct(100),
                },
            }
        )
    )


if __name__ == "__main__":
    loadgen(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
