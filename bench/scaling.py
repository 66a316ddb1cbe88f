"""Issue 12's scaling figures: 1 worker on the local backends, 1 and 2 workers on Redis + PostgreSQL, in one run.

    python bench/scaling.py [--duration 10] [--connections 32] [--rounds 4] [--json out.json]

Starts the OpenRouter emulator and three proxies (`orproxy serve`, the bench config with a daily budget, so every
request reserves and settles):

* local   - 1 worker, `state.backend: local`, the SQLite ledger (in a temporary directory);
* shared1 - 1 worker, `state.backend: redis` + `ledger.backend: postgres`;
* shared2 - `--workers 2` (a supervisor and two workers on one port, SO_REUSEPORT), Redis + PostgreSQL.

Each shared configuration gets its own Redis key prefix (its keys deleted afterwards) and its own PostgreSQL database
(created here, dropped afterwards). After a discarded warm-up, wrk (bench/chat.lua) sends non-streamed chat requests
over --connections keep-alive connections for --duration seconds to each, in interleaved rounds (the order reversed
every other round). For each measurement it reads from /proc, before and after:

* the server's CPU time: the process and all its children (supervisor + workers), divided by the requests;
* the redis-server's CPU (its pid from INFO) and that of the PostgreSQL backends connected to the configuration's
  database (pids from pg_stat_activity): the CPU the shared backends cost outside the proxy;
* the emulator's CPU, and the whole machine's (/proc/stat), to see who was the bottleneck.

On a 2-core machine the load generator, the emulator, Redis and PostgreSQL share the cores with the server, so
2 workers cannot show their throughput there; CPU per request does not depend on who the bottleneck was, and
"capacity" (cores / CPU per request) is the throughput the server would reach if it had those cores to itself.
Goals (issue 12): Redis + PostgreSQL add at most 25% CPU per request over local; 2 workers reach at least 1.6x one
worker's throughput when the server is the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from run import API_KEY, BENCH, cpu_seconds, free_port, say

SLUG = "mistralai/mistral-7b-instruct"
BUDGET = "\nbudget: {daily_usd: 1000000}\n"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
CONFIGS = ("local", "shared1", "shared2")
LABELS = {
    "local": "1 worker, local state + SQLite",
    "shared1": "1 worker, Redis + PostgreSQL",
    "shared2": "2 workers, Redis + PostgreSQL",
}


def chat_body() -> str:
    message = {"role": "user", "content": "Say hello in one short sentence."}
    return json.dumps({"model": "cheap", "messages": [message], "max_tokens": 32}, separators=(",", ":"))


def psql(sql: str, dsn: str = PG_ADMIN) -> str:
    done = subprocess.run(
        ["psql", dsn, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"psql: {done.stderr.strip()}")
    return done.stdout.strip()


def children(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


@dataclass
class Config:
    name: str
    workers: int
    url: str
    process: subprocess.Popen
    log: Path
    database: str | None = None  # its own PostgreSQL database (shared configs)
    prefix: str | None = None  # its own Redis key prefix (shared configs)

    def pids(self) -> list[int]:
        """The server's processes: the proxy, or the supervisor and its workers."""
        return [self.process.pid, *children(self.process.pid)]

    def pg_pids(self) -> list[int]:
        if self.database is None:
            return []
        sql = f"SELECT pid FROM pg_stat_activity WHERE datname = '{self.database}'"
        return [int(pid) for pid in psql(sql).split()]


@dataclass
class Sample:
    config: str
    round: int
    rps: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # supervisor + workers, per request
    redis_cpu_us: float
    pg_cpu_us: float
    emulator_cpu_us: float
    server_busy: float  # cores the server used
    worker_shares: list[float]  # each worker's part of the workers' CPU
    machine_busy: float  # fraction of all the machine's cores that were busy


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    emulator: subprocess.Popen | None = None
    redis_pid: int = 0
    configs: dict[str, Config] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=BENCH.parent,
                env={**os.environ, "BENCH_OPENROUTER_KEY": API_KEY},
            )
        return process, log

    def start(self) -> None:
        emu = free_port()
        upstream = f"http://127.0.0.1:{emu}/api/v1"
        argv = [sys.executable, "-m", "proxy.emulator", "--host", "127.0.0.1", "--port", str(emu)]
        self.emulator, _ = self.spawn("emulator", [*argv, "--api-key", API_KEY])
        base = (BENCH / "bench-config.yaml").read_text().replace("http://127.0.0.1:9000/api/v1", upstream) + BUDGET
        base += f"cache: {{path: {self.tmp / 'cache.sqlite3'}}}\n"
        for name in CONFIGS:
            text = base
            database = prefix = None
            if name == "local":
                text += f"ledger: {{path: {self.tmp / 'ledger.sqlite3'}}}\n"
            else:
                database = f"orproxy_scaling_{uuid.uuid4().hex[:10]}"
                psql(f"CREATE DATABASE {database}")
                prefix = f"orproxy-scaling:{uuid.uuid4().hex[:8]}:"
                dsn = f"postgresql://postgres@127.0.0.1:5432/{database}"
                text += f"ledger: {{backend: postgres, dsn: '{dsn}'}}\n"
                text += f"state: {{backend: redis, url: '{self.args.redis}', prefix: '{prefix}'}}\n"
            path = self.tmp / f"{name}.yaml"
            path.write_text(text)
            port = free_port()
            workers = 2 if name == "shared2" else 1
            argv = [sys.executable, "-m", "proxy", "serve", "--config", str(path), "--host", "127.0.0.1"]
            process, log = self.spawn(name, [*argv, "--port", str(port), "--workers", str(workers)])
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            self.configs[name] = Config(name, workers, url, process, log, database, prefix)
        for config in self.configs.values():
            self.wait_ready(config)

    def wait_ready(self, config: Config, timeout_s: float = 60.0) -> None:
        deadline, last = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline and config.process.poll() is None:
            request = urllib.request.Request(
                config.url,
                data=chat_body().encode(),
                method="POST",
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"{config.name} did not become ready ({last}); its log:\n{config.log.read_text()[-3000:]}")

    def stop(self) -> None:
        processes = [c.process for c in self.configs.values()] + ([self.emulator] if self.emulator else [])
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        redis = Redis.from_url(self.args.redis)
        try:
            for config in self.configs.values():
                if config.prefix:
                    keys = list(redis.scan_iter(match=config.prefix + "*", count=1000))
                    if keys:
                        redis.delete(*keys)
        finally:
            redis.close()
        for config in self.configs.values():
            if config.database:
                psql(f"DROP DATABASE IF EXISTS {config.database} WITH (FORCE)")

    def wrk(self, config: Config, duration: float) -> dict:
        out, body = self.tmp / "wrk.json", self.tmp / "body.json"
        out.unlink(missing_ok=True)
        body.write_text(chat_body())
        argv = ["wrk", "-t1", f"-c{self.args.connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s"]
        # chat.lua reads the body from $BENCH_BODY (older) or the file $BENCH_BODY_FILE (newer): give both
        env = {**os.environ, "BENCH_BODY": chat_body(), "BENCH_BODY_FILE": str(body), "BENCH_OUT": str(out)}
        env["BENCH_KEY"] = API_KEY
        argv += ["-s", str(BENCH / "chat.lua"), config.url]
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True, timeout=duration + 60)
        return json.loads(out.read_text())

    def warm_up(self, config: Config) -> None:
        """Discarded load; for a fleet, repeated until every worker takes its share (all of them are serving)."""
        for _ in range(5):
            workers = children(config.process.pid) if config.workers > 1 else []
            before = {pid: cpu_seconds(pid) for pid in workers}
            self.wrk(config, self.args.warmup)
            used = [cpu_seconds(pid) - before[pid] for pid in workers]
            if not workers or min(used) >= 0.25 * max(used):
                return
            say(f"  {config.name}: workers' CPU during warm-up {used}: not every worker is serving yet, again")
        raise RuntimeError(f"{config.name}: a worker took no share of the load; its log:\n{config.log.read_text()}")

    def measure(self, config: Config, number: int) -> Sample:
        assert self.emulator is not None
        pids, pg_pids = config.pids(), config.pg_pids()
        server0 = {pid: cpu_seconds(pid) for pid in pids}
        pg0 = {pid: cpu_seconds(pid) for pid in pg_pids}
        redis0, emu0, machine0, wall0 = (
            cpu_seconds(self.redis_pid),
            cpu_seconds(self.emulator.pid),
            machine_cpu(),
            time.monotonic(),
        )
        result = self.wrk(config, self.args.duration)
        wall = time.monotonic() - wall0
        if sorted(config.pids()) != sorted(pids):
            say(f"  {config.name}: its processes changed during the measurement (a worker restarted?): {pids}")
        server = {pid: cpu_seconds(pid) - server0[pid] for pid in pids}
        pg = sum(cpu_seconds(pid) - pg0.get(pid, 0.0) for pid in {*pg_pids, *config.pg_pids()})
        redis = cpu_seconds(self.redis_pid) - redis0 if config.prefix else 0.0
        emu = cpu_seconds(self.emulator.pid) - emu0
        busy1, total1 = machine_cpu()
        requests = max(1, result["requests"])
        workers = [server[pid] for pid in pids[1:]] if config.workers > 1 else []
        return Sample(
            config.name,
            number,
            result["requests"] / (result["duration_us"] / 1e6),
            result["requests"],
            sum(result["errors"].values()),
            result["latency_us"]["p50"] / 1000,
            result["latency_us"]["p99"] / 1000,
            sum(server.values()) * 1e6 / requests,
            redis * 1e6 / requests,
            pg * 1e6 / requests,
            emu * 1e6 / requests,
            sum(server.values()) / wall,
            [used / max(1e-9, sum(workers)) for used in workers],
            (busy1 - machine0[0]) / max(1, total1 - machine0[1]),
        )

    def run(self) -> list[Sample]:
        say(f"warm-up: {self.args.warmup:g}s per configuration (discarded)")
        for config in self.configs.values():
            self.warm_up(config)
        samples: list[Sample] = []
        for number in range(1, self.args.rounds + 1):
            order = CONFIGS if number % 2 else CONFIGS[::-1]
            for name in order:
                sample = self.measure(self.configs[name], number)
                samples.append(sample)
                say(
                    f"  round {number} {name:<8} {sample.rps:7.0f} req/s  server {sample.server_cpu_us:5.0f} us/req "
                    f"(busy {sample.server_busy:.2f} cores)  redis {sample.redis_cpu_us:4.0f}  "
                    f"pg {sample.pg_cpu_us:4.0f} us/req  machine {sample.machine_busy:.0%}"
                    + (f"  ERRORS {sample.errors}" if sample.errors else "")
                )
        return samples


def summarise(samples: list[Sample], cores: int) -> dict:
    rows: dict[str, dict] = {}
    for name in CONFIGS:
        mine = [s for s in samples if s.config == name]
        cpu = statistics.median(s.server_cpu_us for s in mine)
        workers = 2 if name == "shared2" else 1
        rows[name] = {
            "label": LABELS[name],
            "rps_median": statistics.median(s.rps for s in mine),
            "rps_rounds": [s.rps for s in mine],
            "server_cpu_us_per_req": cpu,
            "redis_cpu_us_per_req": statistics.median(s.redis_cpu_us for s in mine),
            "pg_cpu_us_per_req": statistics.median(s.pg_cpu_us for s in mine),
            "emulator_cpu_us_per_req": statistics.median(s.emulator_cpu_us for s in mine),
            "server_busy_cores": statistics.median(s.server_busy for s in mine),
            "machine_busy": statistics.median(s.machine_busy for s in mine),
            # the throughput if the server had `workers` cores (at most the machine's) to itself
            "capacity_rps": min(workers, cores) / (cpu / 1e6),
            "p50_ms": statistics.median(s.p50_ms for s in mine),
            "p99_ms": statistics.median(s.p99_ms for s in mine),
            "errors": sum(s.errors for s in mine),
        }
    local, one, two = rows["local"], rows["shared1"], rows["shared2"]
    with_services = one["server_cpu_us_per_req"] + one["redis_cpu_us_per_req"] + one["pg_cpu_us_per_req"]
    # per round (neighbouring measurements), then the median
    ratios = [
        b.rps / a.rps
        for a, b in zip(
            [s for s in samples if s.config == "shared1"], [s for s in samples if s.config == "shared2"], strict=True
        )
    ]
    return {
        "configs": rows,
        "shared_over_local_cpu": one["server_cpu_us_per_req"] / local["server_cpu_us_per_req"] - 1,
        "shared_over_local_cpu_with_services": with_services / local["server_cpu_us_per_req"] - 1,
        "two_over_one_rps": statistics.median(ratios),
        "two_over_one_rps_rounds": ratios,
        "two_over_one_capacity": two["capacity_rps"] / one["capacity_rps"],
        "two_over_one_cpu": two["server_cpu_us_per_req"] / one["server_cpu_us_per_req"] - 1,
    }


def print_report(summary: dict, args: argparse.Namespace) -> None:
    print(
        f"\nwrk, {args.connections} connections x {args.duration:g}s, {args.rounds} rounds, {os.cpu_count()} CPUs, "
        f"load average {args.loadavg_before:.2f} before / {args.loadavg_after:.2f} after (medians of the rounds)"
    )
    print(
        f"{'configuration':<31} {'req/s':>6} {'server':>7} {'redis':>6} {'pg':>5} {'emu':>5} "
        f"{'busy':>5} {'machine':>7} {'capacity':>8} {'p50 ms':>6} {'p99 ms':>6} {'err':>4}"
    )
    print(f"{'':<31} {'':>6} {'CPU us/request':^26} {'cores':>5} {'busy':>7} {'req/s':>8}")
    for row in summary["configs"].values():
        print(
            f"{row['label']:<31} {row['rps_median']:6.0f} {row['server_cpu_us_per_req']:7.0f} "
            f"{row['redis_cpu_us_per_req']:6.0f} {row['pg_cpu_us_per_req']:5.0f} {row['emulator_cpu_us_per_req']:5.0f} "
            f"{row['server_busy_cores']:5.2f} {row['machine_busy']:7.0%} {row['capacity_rps']:8.0f} "
            f"{row['p50_ms']:6.2f} {row['p99_ms']:6.2f} {row['errors']:4d}"
        )
    over, services = summary["shared_over_local_cpu"], summary["shared_over_local_cpu_with_services"]
    print(
        f"\nRedis + PostgreSQL over local, CPU per request: server {over:+.0%}, with redis-server and the "
        f"PostgreSQL backends {services:+.0%} -> the proxy {'meets' if over <= 0.25 else 'MISSES'} the 25% goal"
    )
    rounds = ", ".join(f"{r:.2f}" for r in summary["two_over_one_rps_rounds"])
    print(
        f"2 workers / 1 worker: {summary['two_over_one_rps']:.2f}x req/s here (rounds {rounds}); CPU per request "
        f"{summary['two_over_one_cpu']:+.0%}; with a core each to themselves {summary['two_over_one_capacity']:.2f}x "
        f"-> {'meets' if summary['two_over_one_capacity'] >= 1.6 else 'MISSES'} the 1.6x goal (capacity)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per measurement (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk's keep-alive connections (default 32)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4, min 2)")
    parser.add_argument("--warmup", type=float, default=3, help="discarded warm-up seconds per configuration")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="the Redis the shared configs use")
    parser.add_argument("--json", type=Path, help="also write every sample and the summary here")
    args = parser.parse_args(argv)
    args.rounds = max(2, args.rounds)
    for tool in ("wrk", "psql"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is needed (Debian: apt-get install -y {'wrk' if tool == 'wrk' else 'postgresql-client'})"
            )
    args.loadavg_before = os.getloadavg()[0]
    if args.loadavg_before > 0.3:
        say(f"note: the 1-minute load average is {args.loadavg_before:.2f}: other work will show up as variance")
    redis = Redis.from_url(args.redis)
    with tempfile.TemporaryDirectory(prefix="orproxy-scaling-") as tmp:
        bench = Bench(args, Path(tmp), redis_pid=int(redis.info("server")["process_id"]))
        redis.close()
        try:
            bench.start()
            samples = bench.run()
        finally:
            bench.stop()
    args.loadavg_after = os.getloadavg()[0]
    summary = summarise(samples, os.cpu_count() or 1)
    print_report(summary, args)
    if args.json:
        document = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "cpus": os.cpu_count(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "summary": summary,
            "samples": [vars(s) for s in samples],
        }
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
