"""Instructions per request under callgrind: a figure other work on the machine does not move.

    python bench/instructions.py [--baseline-rev 2bb227c] [--shapes small,big] [--requests 400]

Runs the emulator normally and each server under test (the pass-through, the proxy of this
checkout, and with --baseline-rev the proxy of that revision from a temporary `git worktree`)
under `valgrind --tool=callgrind`, one at a time. For each shape it sends a warm-up, zeroes the
counters (`callgrind_control -z`), sends --requests requests from 8 connections, dumps
(`callgrind_control -d`) and divides the instructions of all the server's threads by the
requests (long streams: by 1/40 as many requests, and per relayed chunk too).

What it does not see: time in the kernel (syscalls, context switches, wake-ups between threads)
and waits for the GIL. Use it to compare Python-level work between revisions; bench/run.py's CPU
per request, on a quiet machine, is the whole cost. Needs valgrind (apt-get install valgrind);
a run of all shapes takes 10 to 20 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from shapes import SHAPES

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
KEY = "bench-key"
SLUG = "mistralai/mistral-7b-instruct"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def fire(url: str, body: str, count: int, connections: int = 8) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    sent = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:

        async def worker() -> None:
            nonlocal sent
            while sent < count:
                sent += 1
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url} answered {response.status}")

        await asyncio.gather(*(worker() for _ in range(connections)))


def instructions(dump: str) -> int:
    for line in Path(dump).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def measure(name: str, argv: list[str], cwd: Path, url: str, model: str, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"callgrind.{name}"
    log = (tmp / f"{name}.log").open("w")
    env = {**os.environ, "BENCH_OPENROUTER_KEY": KEY, "PYTHONPATH": str(cwd)}
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *argv],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    results: dict = {}
    try:
        deadline = time.monotonic() + 600  # imports are slow under valgrind
        while True:
            try:
                asyncio.run(fire(url, SHAPES["small"].body(model), 1, 1))
                break
            except (OSError, aiohttp.ClientError, RuntimeError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start; see {log.name}") from None
                time.sleep(0.5)
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            count = args.requests if not shape.chunks else max(4, args.requests // 40)
            body = shape.body(model)
            asyncio.run(fire(url, body, max(20, count // 5)))  # warm-up
            subprocess.run(["callgrind_control", "-z", str(process.pid)], capture_output=True, check=True)
            asyncio.run(fire(url, body, count))
            before = set(glob.glob(f"{out}.{process.pid}*"))
            subprocess.run(["callgrind_control", "-d", str(process.pid)], capture_output=True, check=True)
            dump = max(set(glob.glob(f"{out}.{process.pid}*")) - before, key=os.path.getmtime)
            per_request = instructions(dump) / count
            results[shape_name] = per_request
            chunk = f", {per_request / shape.chunks / 1e3:.1f} k/chunk" if shape.chunks else ""
            print(f"{name:<12} {shape_name:<12} {per_request / 1e6:8.3f} M instructions/request{chunk}", flush=True)
    finally:
        process.terminate()
        process.wait(120)
        log.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--baseline-rev", metavar="REV")
    args = parser.parse_args()
    args.shapes = [s for s in args.shapes.split(",") if s]
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="orproxy-instructions-") as name:
        tmp = Path(name)
        emu = free_port()
        upstream = f"http://127.0.0.1:{emu}/api/v1"
        emulator = subprocess.Popen(
            [
                py,
                "-m",
                "proxy.emulator",
                "--port",
                str(emu),
                "--api-key",
                KEY,
                "--max-bills",
                "20000",
                "--max-recorded",
                "100",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        worktree = tmp / "previous"
        try:
            time.sleep(1.5)
            port = free_port()
            passthrough = [py, str(BENCH / "passthrough.py"), "--port", str(port), "--upstream"]
            passthrough += [f"{upstream}/chat/completions", "--api-key", KEY]
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            measure("passthrough", passthrough, ROOT, url, SLUG, args, tmp)
            checkouts = {"proxy": ROOT}
            if args.baseline_rev:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline_rev],
                    check=True,
                    capture_output=True,
                )
                checkouts["previous"] = worktree
            for target, checkout in checkouts.items():
                config = (BENCH / "bench-config.yaml").read_text().replace("http://127.0.0.1:9000/api/v1", upstream)
                config_path = tmp / f"{target}.yaml"
                config_path.write_text(config + f"\nledger: {{path: {tmp / f'{target}.sqlite3'}}}\n")
                port = free_port()
                serve = [py, "-m", "proxy", "serve", "--config", str(config_path), "--port", str(port)]
                measure(target, serve, checkout, f"http://127.0.0.1:{port}/v1/chat/completions", "cheap", args, tmp)
        finally:
            emulator.terminate()
            emulator.wait(10)
            if worktree.exists():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
