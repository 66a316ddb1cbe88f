"""Summarising bench/run.py's samples: per shape and target, the ratios against the pass-through,
and the issue's goals checked for the new code (and the previous commit's, when it ran)."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

from shapes import SHAPES

PROXIES = ("proxy", "previous")  # the code under test, and the previous commit's (--baseline-rev)
GOAL_CPU_RATIO = 1.33  # CPU us/request <= 1.33x the pass-through's (>= 0.75x its req/s)
GOAL_ADDED_P50_MS = 0.2
GOAL_BIG_FACTOR = 2.0  # added CPU for the big request <= 2x the added CPU for the small one
GOAL_CHUNK_RATIO = 1.3
GOAL_RSS_MB = 80.0


@dataclass
class Sample:
    target: str
    shape: str
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
    rss_mb: float  # the server's resident memory after the measurement
    overhead_us: dict[str, float | None]  # the proxy's own histogram: p50/p90/p99 over this measurement


def summarise(samples: list[Sample], targets: tuple[str, ...]) -> dict:
    def pick(phase: str, shape: str, target: str) -> list[Sample]:
        return [s for s in samples if s.phase == phase and s.shape == shape and s.target == target]

    summary: dict = {"shapes": {}}
    for name in dict.fromkeys(s.shape for s in samples):
        shape = SHAPES[name]
        rows = {}
        for target in targets:
            tp, lat = pick("throughput", name, target), pick("latency", name, target)
            if not tp:
                continue
            row = {
                "rps_mean": statistics.fmean(s.rps for s in tp),
                "rps_min": min(s.rps for s in tp),
                "rps_max": max(s.rps for s in tp),
                "cpu_us_per_req": statistics.fmean(s.server_cpu_us for s in tp),
                "server_busy": statistics.fmean(s.server_busy for s in tp),
                "emulator_busy": statistics.fmean(s.emulator_busy for s in tp),
                "errors": sum(s.errors for s in tp + lat),
                "rss_mb": max(s.rss_mb for s in tp + lat),
                "overhead_us": _median_overheads(tp),
            }
            if shape.chunks:
                row["cpu_us_per_chunk"] = row["cpu_us_per_req"] / shape.chunks
            if lat:
                row |= {
                    "p50_ms": statistics.median(s.p50_us for s in lat) / 1000,
                    "p90_ms": statistics.median(s.p90_us for s in lat) / 1000,
                    "p99_ms": statistics.median(s.p99_us for s in lat) / 1000,
                    "p50_ms_rounds": [s.p50_us / 1000 for s in lat],
                    "latency_overhead_us": _median_overheads(lat),
                }
            rows[target] = row
        part: dict = {"targets": rows}
        base = rows.get("passthrough")
        for target in PROXIES:
            row = rows.get(target)
            if row is None or base is None:
                continue
            # the ratio per round (neighbouring measurements), then their mean
            ratios = [
                p.rps / q.rps for p, q in zip(pick("throughput", name, target), pick("throughput", name, "passthrough"))
            ]
            part[target] = {
                "throughput_ratio": statistics.fmean(ratios),
                "throughput_ratio_rounds": ratios,
                "cpu_ratio": row["cpu_us_per_req"] / base["cpu_us_per_req"],
                "added_cpu_us": row["cpu_us_per_req"] - base["cpu_us_per_req"],
            }
            if "p50_ms" in row and "p50_ms" in base:
                part[target]["added_p50_ms"] = row["p50_ms"] - base["p50_ms"]
        summary["shapes"][name] = part
    summary["goals"] = {target: goals(summary["shapes"], target) for target in PROXIES}
    return summary


def _median_overheads(samples: list[Sample]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in ("p50", "p90", "p99"):
        values = [v for s in samples if (v := s.overhead_us.get(q)) is not None]
        out[q] = statistics.median(values) if values else None
    return out


def goals(shapes: dict, target: str) -> list[dict]:
    """Each goal of issue 13 for `target`: the figure, the bar, met or not (None: not measured)."""
    found: list[dict] = []

    def add(goal: str, value: float | None, bar: float, higher_is_better: bool = False) -> None:
        met = None if value is None else (value >= bar if higher_is_better else value <= bar)
        found.append({"goal": goal, "value": value, "bar": bar, "met": met})

    for name in ("small", "small-stream"):
        part = shapes.get(name, {}).get(target)
        add(f"{name}: CPU us/request / pass-through's", part and part["cpu_ratio"], GOAL_CPU_RATIO)
        add(f"{name}: req/s / pass-through's", part and part["throughput_ratio"], 0.75, higher_is_better=True)
        add(f"{name}: added p50 at 1 connection (ms)", part and part.get("added_p50_ms"), GOAL_ADDED_P50_MS)
    small, big = shapes.get("small", {}).get(target), shapes.get("big", {}).get(target)
    factor = big["added_cpu_us"] / small["added_cpu_us"] if small and big and small["added_cpu_us"] > 0 else None
    add("big: added CPU / small request's added CPU", factor, GOAL_BIG_FACTOR)
    long = shapes.get("long-stream", {}).get("targets", {})
    chunk = None
    if target in long and "passthrough" in long:
        chunk = long[target]["cpu_us_per_chunk"] / long["passthrough"]["cpu_us_per_chunk"]
    add("long-stream: CPU per relayed chunk / pass-through's", chunk, GOAL_CHUNK_RATIO)
    rss = [part["targets"][target]["rss_mb"] for part in shapes.values() if target in part["targets"]]
    add("RSS (MB, the most seen)", max(rss) if rss else None, GOAL_RSS_MB)
    return found


def print_report(summary: dict, args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.tool}, {args.connections} connections x {args.duration:g}s (throughput), 1 connection x "
        f"{args.latency_duration:g}s (latency), {args.rounds} rounds, pinned: {'yes' if args.pin else 'no'}, "
        f"load average {args.loadavg_before:.2f} before / {args.loadavg_after:.2f} after"
        + (f", previous = {args.baseline_rev}" if args.baseline_rev else "")
    )
    for name, part in summary["shapes"].items():
        print(f"\n== {name} ==")
        print(
            f"{'target':<12} {'req/s':>8} {'(min-max)':>13} {'cpu us/req':>10} {'busy':>5} {'emu':>4} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'overhead p50/p90/p99 us':>24} {'RSS MB':>7} {'errors':>6}"
        )
        for target, row in part["targets"].items():
            overhead = "/".join("-" if v is None else f"{v:.0f}" for v in row["overhead_us"].values())
            per_chunk = f"  ({row['cpu_us_per_chunk']:.2f} us/chunk)" if "cpu_us_per_chunk" in row else ""
            print(
                f"{target:<12} {row['rps_mean']:8.0f} {row['rps_min']:6.0f}-{row['rps_max']:<6.0f} "
                f"{row['cpu_us_per_req']:10.0f} {row['server_busy']:5.0%} {row['emulator_busy']:4.0%} "
                f"{row.get('p50_ms', float('nan')):7.3f} {row.get('p99_ms', float('nan')):7.3f} "
                f"{overhead:>24} {row['rss_mb']:7.1f} {row['errors']:6d}{per_chunk}"
            )
        for target in PROXIES:
            if target not in part:
                continue
            ratios = part[target]
            rounds = ", ".join(f"{r:.0%}" for r in ratios["throughput_ratio_rounds"])
            added = ratios.get("added_p50_ms")
            print(
                f"{target} / pass-through: req/s {ratios['throughput_ratio']:.0%} (rounds {rounds}), CPU "
                f"{ratios['cpu_ratio']:.2f}x ({ratios['added_cpu_us']:+.0f} us/request)"
                + (f", added p50 {added * 1000:+.0f} us" if added is not None else "")
            )
    for target, found in summary["goals"].items():
        if all(goal["value"] is None for goal in found):
            continue
        print(f"\n== goals: {target} ==")
        for goal in found:
            value = "-" if goal["value"] is None else f"{goal['value']:.2f}"
            verdict = {True: "meets", False: "MISSES", None: "not measured"}[goal["met"]]
            print(f"{goal['goal']:<52} {value:>8} (bar {goal['bar']:g}) {verdict}")
