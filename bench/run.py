"""Proxy vs a bare aiohttp pass-through vs the emulator direct, measured in one run.

    python bench/run.py [--duration 10] [--connections 32] [--rounds 2] [--json out.json]

Starts the OpenRouter emulator, bench/passthrough.py and the proxy (`orproxy serve`) as separate
one-worker processes on free loopback ports, then measures them interleaved (round 1: direct,
pass-through, proxy; round 2 in reverse order; ...) after a discarded warm-up:

* throughput: requests/s with --connections keep-alive connections, non-streamed and streamed;
* latency: one connection, requests back to back: p50/p90/p99;
* CPU: each server's own CPU time per request (from /proc), which does not depend on who the bottleneck was.

The bar (see bench/README.md): proxy throughput >= 70% of the pass-through's; added p50 a fraction of a ms.
The load generator is wrk (bench/chat.lua); without wrk a small aiohttp load generator is used instead.
Everything is bounded in time and every child is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
API_KEY = "bench-key"
SLUG = "mistralai/mistral-7b-instruct"
PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
TARGETS = ("direct", "passthrough", "proxy")
MODES = ("non-stream", "stream")
LOADGEN_CPU, SERVER_CPU = "0", "1"  # with --pin: wrk + emulator share CPU 0, the server under test owns CPU 1
# Unpinned is the default: on the 2-vCPU VM this was written on, pinning made every hop a cross-CPU
# wake-up of an idle vCPU, which raised CPU per request by ~50% and the variance with it (see README).
CLK_TCK = os.sysconf("SC_CLK_TCK")


def body(model: str, stream: bool) -> str:
    return json.dumps({"model": model, "messages": PROMPT, "max_tokens": 32, "stream": stream}, separators=(",", ":"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux only; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Server:
    name: str
    url: str
    model: str
    process: subprocess.Popen
    log: Path


@dataclass
class Sample:
    target: str
    mode: str
    phase: str  # throughput | latency
    round: int
    rps: float
    p50_us: int
    p90_us: int
    p99_us: int
    errors: int
    requests: int
    server_cpu_us: float  # CPU time of the server under test per request
    emulator_cpu_us: float
    server_busy: float  # fraction of one core the server under test used
    emulator_busy: float


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    servers: dict[str, Server] = field(default_factory=dict)

    # ------------------------------------------------------------------ processes

    def pinned(self, cpu: str, argv: list[str]) -> list[str]:
        return ["taskset", "-c", cpu, *argv] if self.args.pin else argv

    def spawn(self, name: str, argv: list[str], url: str, model: str, env: dict[str, str] | None = None) -> None:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
            )
        self.servers[name] = Server(name, url, model, process, log)

    def start(self) -> None:
        py = sys.executable
        emu, passthrough, proxy = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{emu}/api/v1"
        self.spawn(
            "direct",
            self.pinned(
                LOADGEN_CPU,
                [py, "-m", "proxy.emulator", "--host", "127.0.0.1", "--port", str(emu), "--api-key", API_KEY],
            ),
            f"{upstream}/chat/completions",
            SLUG,
        )
        self.spawn(
            "passthrough",
            self.pinned(
                SERVER_CPU,
                [
                    py,
                    str(BENCH / "passthrough.py"),
                    "--port",
                    str(passthrough),
                    "--upstream",
                    f"{upstream}/chat/completions",
                    "--api-key",
                    API_KEY,
                ],
            ),
            f"http://127.0.0.1:{passthrough}/v1/chat/completions",
            SLUG,
        )
        config = (BENCH / "bench-config.yaml").read_text().replace("http://127.0.0.1:9000/api/v1", upstream)
        config += f"\nledger: {{path: {self.tmp / 'ledger.sqlite3'}}}\n"  # a fresh ledger, outside the repo
        config_path = self.tmp / "bench-config.yaml"
        config_path.write_text(config)
        self.spawn(
            "proxy",
            self.pinned(
                SERVER_CPU,
                [py, "-m", "proxy", "serve", "--config", str(config_path), "--host", "127.0.0.1", "--port", str(proxy)],
            ),
            f"http://127.0.0.1:{proxy}/v1/chat/completions",
            "cheap",
            {"BENCH_OPENROUTER_KEY": API_KEY},
        )
        for server in self.servers.values():
            self.wait_ready(server)

    def wait_ready(self, server: Server, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                break
            request = urllib.request.Request(
                server.url,
                data=body(server.model, False).encode(),
                method="POST",
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200 and b'"choices"' in response.read():
                        return
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"{server.name} did not become ready ({last}); its log:\n{server.log.read_text()[-3000:]}")

    def stop(self) -> None:
        for server in self.servers.values():
            if server.process.poll() is None:
                server.process.terminate()
        for server in self.servers.values():
            try:
                server.process.wait(5)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(5)

    # ------------------------------------------------------------------ measuring

    def load(self, server: Server, mode: str, connections: int, duration: float) -> dict:
        out = self.tmp / "result.json"
        out.unlink(missing_ok=True)
        payload = body(server.model, mode == "stream")
        if self.args.tool == "wrk":
            argv = [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "--timeout",
                "10s",
                "-s",
                str(BENCH / "chat.lua"),
                server.url,
            ]
        else:
            argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--_loadgen",
                server.url,
                str(connections),
                str(duration),
            ]
        env = {**os.environ, "BENCH_BODY": payload, "BENCH_OUT": str(out), "BENCH_KEY": API_KEY}
        subprocess.run(
            self.pinned(LOADGEN_CPU, argv), env=env, stdout=subprocess.DEVNULL, check=True, timeout=duration + 30
        )
        return json.loads(out.read_text())

    def measure(self, target: str, mode: str, phase: str, number: int, connections: int, duration: float) -> Sample:
        server, emulator = self.servers[target], self.servers["direct"]
        cpu0, emu0, wall0 = cpu_seconds(server.process.pid), cpu_seconds(emulator.process.pid), time.monotonic()
        result = self.load(server, mode, connections, duration)
        wall = time.monotonic() - wall0
        cpu, emu = cpu_seconds(server.process.pid) - cpu0, cpu_seconds(emulator.process.pid) - emu0
        requests = max(1, result["requests"])
        lat = result["latency_us"]
        return Sample(
            target,
            mode,
            phase,
            number,
            result["requests"] / (result["duration_us"] / 1e6),
            lat["p50"],
            lat["p90"],
            lat["p99"],
            sum(result["errors"].values()),
            result["requests"],
            cpu * 1e6 / requests,
            emu * 1e6 / requests,
            cpu / wall,
            emu / wall,
        )

    def run(self) -> list[Sample]:
        a = self.args
        say(f"warm-up: {a.warmup:g}s per target and mode (discarded)")
        for mode in MODES:
            for target in TARGETS:
                self.load(self.servers[target], mode, a.connections, a.warmup)
        samples: list[Sample] = []
        for phase, connections, duration in (
            ("throughput", a.connections, a.duration),
            ("latency", 1, a.latency_duration),
        ):
            for number in range(1, a.rounds + 1):
                order = TARGETS if number % 2 else TARGETS[::-1]  # A/B/A/B with the position bias cancelled
                for mode in MODES:
                    for target in order:
                        sample = self.measure(target, mode, phase, number, connections, duration)
                        samples.append(sample)
                        say(
                            f"  {phase:<10} round {number} {mode:<10} {target:<11} {sample.rps:8.0f} req/s  "
                            f"p50 {sample.p50_us / 1000:6.2f} ms  cpu {sample.server_cpu_us:5.0f} us/req"
                            + (f"  ERRORS {sample.errors}" if sample.errors else "")
                        )
        return samples


# ---------------------------------------------------------------------- report


def summarise(samples: list[Sample]) -> dict:
    def pick(phase: str, mode: str, target: str) -> list[Sample]:
        return [s for s in samples if s.phase == phase and s.mode == mode and s.target == target]

    summary: dict = {}
    for mode in MODES:
        rows = {}
        for target in TARGETS:
            tp, lat = pick("throughput", mode, target), pick("latency", mode, target)
            rows[target] = {
                "rps_mean": statistics.fmean(s.rps for s in tp),
                "rps_min": min(s.rps for s in tp),
                "rps_max": max(s.rps for s in tp),
                "cpu_us_per_req": statistics.fmean(s.server_cpu_us for s in tp),
                "latency_cpu_us_per_req": statistics.fmean(s.server_cpu_us for s in lat),
                "server_busy": statistics.fmean(s.server_busy for s in tp),
                "emulator_busy": statistics.fmean(s.emulator_busy for s in tp),
                "p50_ms": statistics.median(s.p50_us for s in lat) / 1000,
                "p90_ms": statistics.median(s.p90_us for s in lat) / 1000,
                "p99_ms": statistics.median(s.p99_us for s in lat) / 1000,
                "p50_ms_rounds": [s.p50_us / 1000 for s in lat],
                "errors": sum(s.errors for s in tp + lat),
            }
        # the ratio per round (neighbouring measurements), then their mean and spread
        ratios = [
            p.rps / q.rps for p, q in zip(pick("throughput", mode, "proxy"), pick("throughput", mode, "passthrough"))
        ]
        proxy, passthrough, direct = rows["proxy"], rows["passthrough"], rows["direct"]
        summary[mode] = {
            "targets": rows,
            "throughput_ratio": statistics.fmean(ratios),
            "throughput_ratio_rounds": ratios,
            "meets_70pct": statistics.fmean(ratios) >= 0.70,
            "added_p50_ms_vs_passthrough": proxy["p50_ms"] - passthrough["p50_ms"],
            "added_p50_ms_vs_direct": proxy["p50_ms"] - direct["p50_ms"],
            "added_cpu_us_vs_passthrough": proxy["cpu_us_per_req"] - passthrough["cpu_us_per_req"],
            # what the ratio would be if the server under test were the only bottleneck
            "cpu_capacity_ratio": passthrough["cpu_us_per_req"] / proxy["cpu_us_per_req"],
        }
    return summary


def print_report(summary: dict, args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.tool}, {args.connections} connections x {args.duration:g}s (throughput), 1 connection x "
        f"{args.latency_duration:g}s (latency), {args.rounds} rounds, pinned: {'yes' if args.pin else 'no'}, "
        f"load average {args.loadavg_before:.2f} before / {args.loadavg_after:.2f} after"
    )
    for mode, part in summary.items():
        print(f"\n== {mode} ==")
        print(
            f"{'target':<12} {'req/s':>8} {'(min-max)':>13} {'cpu us/req':>10} {'busy':>5} {'emu busy':>8} "
            f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'errors':>6}"
        )
        for target, row in part["targets"].items():
            print(
                f"{target:<12} {row['rps_mean']:8.0f} {row['rps_min']:6.0f}-{row['rps_max']:<6.0f} "
                f"{row['cpu_us_per_req']:10.0f} {row['server_busy']:5.0%} {row['emulator_busy']:8.0%} "
                f"{row['p50_ms']:7.3f} {row['p90_ms']:7.3f} {row['p99_ms']:7.3f} {row['errors']:6d}"
            )
        rounds = ", ".join(f"{r:.0%}" for r in part["throughput_ratio_rounds"])
        verdict = "meets" if part["meets_70pct"] else "MISSES"
        print(
            f"proxy / pass-through throughput: {part['throughput_ratio']:.0%} (rounds: {rounds})"
            f" -> {verdict} the 70% bar"
        )
        print(
            f"proxy added p50 latency: {part['added_p50_ms_vs_passthrough'] * 1000:+.0f} us vs pass-through, "
            f"{part['added_p50_ms_vs_direct'] * 1000:+.0f} us vs direct; "
            f"added CPU {part['added_cpu_us_vs_passthrough']:+.0f} us/request vs pass-through "
            f"(CPU-bound capacity ratio {part['cpu_capacity_ratio']:.0%})"
        )


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- fallback load generator


def loadgen(url: str, connections: int, duration: float) -> None:
    """A small aiohttp load generator with wrk's output format, for machines without wrk."""
    import aiohttp

    payload, out = os.environ["BENCH_BODY"].encode(), os.environ["BENCH_OUT"]
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


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per throughput measurement (default 10)")
    parser.add_argument(
        "--latency-duration",
        type=float,
        default=None,
        help="seconds per single-connection latency measurement (default: half of --duration)",
    )
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections for throughput (32)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per target (default 2, min 2)")
    parser.add_argument("--warmup", type=float, default=2, help="discarded warm-up seconds per target and mode")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin with taskset: load generator + emulator on CPU 0, the servers under test on "
        "CPU 1 (default: unpinned; see README)",
    )
    parser.add_argument(
        "--tool",
        choices=("wrk", "aiohttp"),
        default=None,
        help="load generator (default: wrk when installed, else aiohttp)",
    )
    parser.add_argument("--json", type=Path, help="also write every sample and the summary here")
    args = parser.parse_args(argv)
    args.rounds = max(2, args.rounds)
    if args.latency_duration is None:
        args.latency_duration = max(2.0, args.duration / 2)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_loadgen":
        loadgen(argv[1], int(argv[2]), float(argv[3]))
        return 0
    args = parse_args(argv)
    if args.tool is None:
        args.tool = "wrk" if shutil.which("wrk") else "aiohttp"
        if args.tool == "aiohttp":
            say(
                "wrk is not installed (Debian/Ubuntu: apt-get install -y wrk; macOS: brew install wrk); "
                "falling back to the slower aiohttp load generator, which may itself be the bottleneck."
            )
    if args.pin and (not shutil.which("taskset") or (os.cpu_count() or 1) < 2):
        say("taskset or a second CPU is missing: running unpinned")
        args.pin = False
    load = os.getloadavg()[0]
    if load > 0.3:
        say(
            f"note: the 1-minute load average is {load:.2f} before starting; other work on this machine "
            "will show up as variance"
        )
    args.loadavg_before = load
    with tempfile.TemporaryDirectory(prefix="orproxy-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            bench.start()
            say(f"started: {', '.join(f'{s.name} pid {s.process.pid} {s.url}' for s in bench.servers.values())}")
            samples = bench.run()
        finally:
            bench.stop()
    args.loadavg_after = os.getloadavg()[0]
    summary = summarise(samples)
    print_report(summary, args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "cpus": os.cpu_count(),
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "summary": summary,
                    "samples": [vars(s) for s in samples],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
