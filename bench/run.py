"""Proxy vs a bare aiohttp pass-through vs the emulator direct (and the previous commit's proxy),
measured in one run, for the request shapes real traffic has.

    python bench/run.py [--duration 10] [--connections 32] [--rounds 2] [--baseline-rev 2bb227c]
                        [--shapes small,small-stream,big,long-stream] [--json out.json]

Starts the OpenRouter emulator, bench/passthrough.py and the proxy (`orproxy serve`) as separate
one-worker processes on free loopback ports (with --baseline-rev, also the proxy of that git
revision, checked out in a temporary `git worktree`), then measures them interleaved (round 1:
direct, pass-through, proxy, previous; round 2 in reverse order; ...) after a discarded warm-up,
for each shape (bench/shapes.py): small (non-streamed and streamed), big (a 50 kB prompt with 20
tools) and long-stream (1,000 chunks):

* throughput: requests/s with --connections keep-alive connections;
* latency (small shapes): one connection, requests back to back: p50/p90/p99;
* CPU: each server's own CPU time per request (from /proc), which does not depend on who the
  bottleneck was; for long streams, per relayed chunk;
* the proxy's own overhead histogram (`orproxy_overhead_seconds`, scraped from /metrics around
  each measurement): its p50/p90/p99 next to wrk's;
* RSS of each server after each measurement.

The goals (issue 13, see bench/README.md) are checked at the end for the new code and the previous
commit. The load generator is wrk (bench/chat.lua); without wrk a small aiohttp load generator is
used instead. Everything is bounded in time and every child (and the worktree) is removed in `finally`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from report import Sample, print_report, summarise
from shapes import SHAPES, Shape, overhead_buckets, quantile

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
API_KEY = "bench-key"
SLUG = "mistralai/mistral-7b-instruct"
LOADGEN_CPU, SERVER_CPU = "0", "1"  # with --pin: wrk + emulator share CPU 0, the server under test owns CPU 1
# Unpinned is the default: on the 2-vCPU VM this was written on, pinning made every hop a cross-CPU
# wake-up of an idle vCPU, which raised CPU per request by ~50% and the variance with it (see README).
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 1e6


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


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (0 elsewhere)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_MB
    except OSError:
        return 0.0


@dataclass
class Server:
    name: str
    url: str
    model: str
    process: subprocess.Popen
    log: Path
    metrics: str | None = None  # the proxy's /metrics


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    servers: dict[str, Server] = field(default_factory=dict)
    worktree: Path | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(name for name in ("direct", "passthrough", "proxy", "previous") if name in self.servers)

    # ------------------------------------------------------------------ processes

    def pinned(self, cpu: str, argv: list[str]) -> list[str]:
        return ["taskset", "-c", cpu, *argv] if self.args.pin else argv

    def spawn(
        self,
        name: str,
        argv: list[str],
        url: str,
        model: str,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        metrics: str | None = None,
    ) -> None:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
            )
        self.servers[name] = Server(name, url, model, process, log, metrics)

    def start(self) -> None:
        py = sys.executable
        emu, passthrough = free_port(), free_port()
        upstream = f"http://127.0.0.1:{emu}/api/v1"
        self.spawn(
            "direct",
            self.pinned(
                LOADGEN_CPU,
                # --max-bills: a long run's bills would grow the emulator past a GB
                [
                    py,
                    "-m",
                    "proxy.emulator",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(emu),
                    "--api-key",
                    API_KEY,
                    "--max-bills",
                    "20000",
                    "--max-recorded",
                    "100",
                ],
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
        self.spawn_proxy("proxy", ROOT, upstream)
        if self.args.baseline_rev:
            self.worktree = self.tmp / "previous"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(self.worktree), self.args.baseline_rev],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.spawn_proxy("previous", self.worktree, upstream)
        for server in self.servers.values():
            self.wait_ready(server)

    def spawn_proxy(self, name: str, checkout: Path, upstream: str) -> None:
        """`orproxy serve` from `checkout` (`python -m proxy` from there imports that tree's package)."""
        port = free_port()
        config = (BENCH / "bench-config.yaml").read_text().replace("http://127.0.0.1:9000/api/v1", upstream)
        config += f"\nledger: {{path: {self.tmp / f'{name}-ledger.sqlite3'}}}\n"  # a fresh ledger, outside the repo
        config_path = self.tmp / f"{name}-config.yaml"
        config_path.write_text(config)
        self.spawn(
            name,
            self.pinned(
                SERVER_CPU,
                [
                    sys.executable,
                    "-m",
                    "proxy",
                    "serve",
                    "--config",
                    str(config_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
            ),
            f"http://127.0.0.1:{port}/v1/chat/completions",
            "cheap",
            {"BENCH_OPENROUTER_KEY": API_KEY, "PYTHONPATH": str(checkout)},
            cwd=checkout,
            metrics=f"http://127.0.0.1:{port}/metrics",
        )

    def wait_ready(self, server: Server, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                break
            request = urllib.request.Request(
                server.url,
                data=SHAPES["small"].body(server.model).encode(),
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
        if self.worktree is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(self.worktree)],
                capture_output=True,
                timeout=60,
            )

    # ------------------------------------------------------------------ measuring

    def load(self, server: Server, shape: Shape, connections: int, duration: float) -> dict:
        out = self.tmp / "result.json"
        out.unlink(missing_ok=True)
        body_file = self.tmp / "body.json"
        body_file.write_text(shape.body(server.model))
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
            argv = [sys.executable, str(BENCH / "loadgen.py"), server.url, str(connections), str(duration)]
        env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_OUT": str(out), "BENCH_KEY": API_KEY}
        subprocess.run(
            self.pinned(LOADGEN_CPU, argv), env=env, stdout=subprocess.DEVNULL, check=True, timeout=duration + 30
        )
        return json.loads(out.read_text())

    def scrape(self, server: Server) -> dict[float, float]:
        if server.metrics is None:
            return {}
        try:
            with urllib.request.urlopen(server.metrics, timeout=5) as response:
                return overhead_buckets(response.read().decode())
        except (OSError, urllib.error.URLError):
            return {}

    def measure(self, target: str, shape: Shape, phase: str, number: int, connections: int, duration: float) -> Sample:
        server, emulator = self.servers[target], self.servers["direct"]
        buckets = self.scrape(server)
        cpu0, emu0, wall0 = cpu_seconds(server.process.pid), cpu_seconds(emulator.process.pid), time.monotonic()
        result = self.load(server, shape, connections, duration)
        wall = time.monotonic() - wall0
        cpu, emu = cpu_seconds(server.process.pid) - cpu0, cpu_seconds(emulator.process.pid) - emu0
        after = self.scrape(server)
        overhead = {f"p{q}": quantile(q / 100, buckets, after) for q in (50, 90, 99)}
        requests = max(1, result["requests"])
        lat = result["latency_us"]
        return Sample(
            target,
            shape.name,
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
            rss_mb(server.process.pid),
            {q: None if v is None else v * 1e6 for q, v in overhead.items()},
        )

    def run(self) -> list[Sample]:
        a = self.args
        shapes = [SHAPES[name] for name in a.shapes]
        targets = self.targets
        say(f"warm-up: {a.warmup:g}s per target and shape (discarded)")
        for shape in shapes:
            for target in targets:
                self.load(self.servers[target], shape, a.connections, a.warmup)
        samples: list[Sample] = []
        for phase, connections, duration in (
            ("throughput", a.connections, a.duration),
            ("latency", 1, a.latency_duration),
        ):
            for number in range(1, a.rounds + 1):
                order = targets if number % 2 else targets[::-1]  # A/B/A/B with the position bias cancelled
                for shape in shapes:
                    if phase == "latency" and not shape.latency:
                        continue
                    for target in order:
                        sample = self.measure(target, shape, phase, number, connections, duration)
                        samples.append(sample)
                        p50 = sample.overhead_us["p50"]
                        say(
                            f"  {phase:<10} round {number} {shape.name:<12} {target:<11} {sample.rps:8.0f} req/s  "
                            f"p50 {sample.p50_us / 1000:6.2f} ms  cpu {sample.server_cpu_us:6.0f} us/req"
                            + (f"  overhead p50 {p50:4.0f} us" if p50 is not None else "")
                            + f"  rss {sample.rss_mb:5.1f} MB"
                            + (f"  ERRORS {sample.errors}" if sample.errors else "")
                        )
        return samples


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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
    parser.add_argument("--warmup", type=float, default=2, help="discarded warm-up seconds per target and shape")
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
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"comma-separated request shapes to measure (default: all of {', '.join(SHAPES)})",
    )
    parser.add_argument(
        "--baseline-rev",
        metavar="REV",
        help="also run the proxy of this git revision (e.g. the previous commit), from a temporary "
        "`git worktree`, as the target `previous`",
    )
    parser.add_argument("--json", type=Path, help="also write every sample and the summary here")
    args = parser.parse_args(argv)
    args.shapes = [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = [name for name in args.shapes if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    args.rounds = max(2, args.rounds)
    if args.latency_duration is None:
        args.latency_duration = max(2.0, args.duration / 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
            targets = bench.targets
        finally:
            bench.stop()
    args.loadavg_after = os.getloadavg()[0]
    summary = summarise(samples, targets)
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
