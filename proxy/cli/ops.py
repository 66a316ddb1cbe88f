"""`orproxy models` and `orproxy simulate`: argparse registration, and the run functions that do the IO
(config, catalogue cache, network, ledger, printing) around the pure code in catalogue.py and simulate.py."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from proxy.config import Config, ConfigError, load_config
from proxy.core.pricing import Catalogue, PriceBook
from proxy.core.routing import Router
from proxy.money.catalogue import (
    DEFAULT_CACHE,
    CatalogueFetchError,
    fetch_catalogue,
    load_catalogue_source,
    model_kinds,
    openrouter_base_url,
    write_cache,
)
from proxy.money.ledger_api import LedgerUnavailable, ledger_exists, on_file
from proxy.money.models_view import build_models_view, render_models
from proxy.money.simulate import (
    MixSimulation,
    Replay,
    SimulationError,
    parse_mix,
    read_ledger,
    replay_rows,
    simulate_mix,
)

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_CONFIG = "config.yaml"
EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `models` and `simulate` subcommands to orproxy's parser."""
    models = subparsers.add_parser("models", help="the model catalogue, or `models refresh` to fetch it")
    models.add_argument(
        "action",
        nargs="?",
        choices=("refresh",),
        help="refresh: fetch OpenRouter's /models (and its top-weekly order) into the local cache",
    )
    models.add_argument("--config", help=f"config file (default: {DEFAULT_CONFIG} when it exists)")
    models.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="catalogue cache file (default: %(default)s)")
    models.add_argument("--top-weekly", action="store_true", help="order by OpenRouter's top-weekly ranking")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.add_argument("--timeout", type=float, default=10.0, help="refresh: seconds to wait (default: %(default)s)")
    models.set_defaults(run=run_models)

    simulate = subparsers.add_parser(
        "simulate", help="what a traffic mix, or the ledger's real requests, would cost under a config"
    )
    simulate.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="the config to price with (with --from-ledger: the OTHER config to compare)",
    )
    simulate.add_argument("--requests-per-day", type=float, metavar="N")
    simulate.add_argument("--tokens-per-request", type=float, metavar="T", help="prompt + completion tokens")
    simulate.add_argument("--prompt-share", type=float, default=0.5, help="share of T that is prompt (default: 0.5)")
    simulate.add_argument("--mix", help="virtual model shares of the requests, e.g. cheap=0.6,balanced=0.3,quality=0.1")
    simulate.add_argument("--baseline", help="model to compare with (default: the config's pricing.savings_baseline)")
    simulate.add_argument(
        "--from-ledger", action="store_true", help="replay the ledger's requests of the last --days through --config"
    )
    simulate.add_argument("--days", type=float, default=30.0, help="with --from-ledger: days to replay (default: 30)")
    simulate.add_argument("--ledger", help="ledger file (default: the config's ledger.path)")
    simulate.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="catalogue cache file (default: %(default)s)"
    )
    simulate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    simulate.set_defaults(run=run_simulate)


# ------------------------------------------------------------------ shared


def _error(message: str) -> None:
    print(f"orproxy: {message}", file=sys.stderr)


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        _error(f"the config is invalid ({len(exc.issues)} problem{'s' * (len(exc.issues) != 1)}):")
        for issue in exc.issues:
            print(f"  {issue.render(exc.filename)}", file=sys.stderr)
        return None


def _print_json(payload: Any) -> None:
    sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")


def _console() -> Console:
    from rich.console import Console

    # Piped output has no terminal width to fit; do not squash the columns into ellipses.
    return Console(width=None if sys.stdout.isatty() else 200)


def _usd(value: float) -> str:
    size = abs(value)
    text = f"{size:,.2f}" if size >= 1 else f"{size:.4f}" if size >= 0.01 else f"{size:.6f}"
    return f"-${text}" if value < 0 else f"${text}"


# ------------------------------------------------------------------ models


def run_models(args: argparse.Namespace) -> int:
    config = None
    if args.config or Path(DEFAULT_CONFIG).exists():
        config = _load(args.config or DEFAULT_CONFIG)
        if config is None:
            return 1
    if args.action == "refresh":
        return _refresh(config, args.cache, args.timeout)
    source = load_catalogue_source(config, args.cache)
    view = build_models_view(config, source, top_weekly=args.top_weekly)
    if args.json:
        _print_json(asdict(view))
        return 0
    console = _console()
    console.print(render_models(view))
    if config is None:
        console.print("(no config: pass --config to see which virtual models use each model)")
    for note in view.notes:
        console.print(f"note: {note}", markup=False)
    return 0


def _refresh(config: Config | None, cache: Path, timeout_s: float) -> int:
    if timeout_s <= 0:
        _error(f"--timeout must be > 0, got {timeout_s:g}")
        return EXIT_USAGE
    try:
        document = asyncio.run(fetch_catalogue(openrouter_base_url(config), timeout_s=timeout_s))
    except CatalogueFetchError as exc:
        _error(f"{exc}; {load_catalogue_source(config, cache).describe()} stays in use")
        return 1
    try:
        write_cache(cache, document)
    except OSError as exc:
        _error(f"fetched the catalogue but cannot write {cache}: {exc.strerror}; pass --cache with a writable path")
        return 1
    order = "with" if document["top_weekly"] is not None else "without (OpenRouter did not answer it)"
    print(
        f"fetched {len(document['data'])} models from {document['source']} into {cache}, "
        f"{order} the top-weekly order, at {document['fetched_at']}"
    )
    if document.get("embeddings_source"):
        embedding = sum(model_kinds(Catalogue.parse(document)).get(m["id"]) == "embeddings" for m in document["data"])
        print(f"including {embedding} embedding models from {document['embeddings_source']}")
    if config is not None and config.pricing.catalogue:
        print(f"note: the config pins pricing.catalogue={config.pricing.catalogue}; it keeps pricing from that file")
    return 0


# ------------------------------------------------------------------ simulate


def run_simulate(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    router = Router(config)
    book = PriceBook(load_catalogue_source(config, args.cache).catalogue, config.pricing)
    try:
        if args.from_ledger:
            return _simulate_ledger(args, config, router, book)
        return _simulate_mix(args, router, book)
    except SimulationError as exc:
        _error(str(exc))
        return EXIT_USAGE


def _simulate_mix(args: argparse.Namespace, router: Router, book: PriceBook) -> int:
    missing = [
        flag
        for flag, value in (
            ("--requests-per-day", args.requests_per_day),
            ("--tokens-per-request", args.tokens_per_request),
            ("--mix", args.mix),
        )
        if value is None
    ]
    if missing:
        raise SimulationError(f"simulate needs {', '.join(missing)} (or --from-ledger to replay real requests)")
    result = simulate_mix(
        router,
        book,
        requests_per_day=args.requests_per_day,
        tokens_per_request=args.tokens_per_request,
        mix=parse_mix(args.mix),
        prompt_share=args.prompt_share,
        baseline=args.baseline,
    )
    if args.json:
        _print_json(asdict(result))
    else:
        _print_mix(result)
    return 0


def _print_mix(result: MixSimulation) -> None:
    from rich.table import Table

    console = _console()
    table = Table(
        title=f"{result.requests_per_day:,g} requests/day x {result.tokens_per_request:,g} tokens "
        f"({result.prompt_tokens_per_request:,g} prompt + {result.completion_tokens_per_request:,g} "
        "completion)",
        title_justify="left",
        caption=f"prices in USD per MILLION tokens; a month is {result.days_per_month} days",
        caption_justify="left",
    )
    for name in (
        "virtual model",
        "share",
        "primary model (chain)",
        "prompt $/M",
        "completion $/M",
        "requests/day",
        "$/request",
        "$/day",
        f"$/month ({result.days_per_month} d)",
    ):
        table.add_column(name, justify="left" if name.startswith(("virtual", "primary")) else "right")
    for line in result.lines:
        chain = (
            line.chain_owner if line.chain_owner == line.virtual_model else f"{line.virtual_model}>{line.chain_owner}"
        )
        table.add_row(
            line.virtual_model,
            f"{line.share:.0%}" if line.share * 100 == round(line.share * 100) else f"{line.share:.4g}",
            f"{line.model} ({chain}[0])",
            f"{line.prompt_usd_per_mtok:g}",
            f"{line.completion_usd_per_mtok:g}",
            f"{line.requests_per_day:,.6g}",
            _usd(line.cost_per_request_usd),
            _usd(line.daily_usd),
            _usd(line.monthly_usd),
        )
    table.add_section()
    table.add_row(
        "this config",
        "100%",
        "",
        "",
        "",
        f"{result.requests_per_day:,g}",
        "",
        _usd(result.daily_usd),
        _usd(result.monthly_usd),
        style="bold",
    )
    table.add_row(
        "baseline",
        "100%",
        result.baseline_model,
        "",
        "",
        f"{result.requests_per_day:,g}",
        _usd(result.baseline_cost_per_request_usd),
        _usd(result.baseline_daily_usd),
        _usd(result.baseline_monthly_usd),
    )
    console.print(table)
    console.print(_savings_sentence(result), markup=False)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)


def _savings_sentence(result: MixSimulation) -> str:
    pct = "" if result.savings_pct is None else f" ({abs(result.savings_pct):.1f}% of the baseline)"
    if result.savings_daily_usd >= 0:
        return (
            f"saves {_usd(result.savings_daily_usd)}/day, {_usd(result.savings_monthly_usd)}/month{pct} "
            f"against {result.baseline_model} alone"
        )
    return (
        f"costs {_usd(-result.savings_daily_usd)}/day, {_usd(-result.savings_monthly_usd)}/month MORE{pct} "
        f"than {result.baseline_model} alone"
    )


def _simulate_ledger(args: argparse.Namespace, config: Config, router: Router, book: PriceBook) -> int:
    if args.mix or args.requests_per_day is not None or args.tokens_per_request is not None:
        raise SimulationError(
            "--from-ledger replays real requests: drop --mix, --requests-per-day and "
            "--tokens-per-request (or drop --from-ledger to simulate a mix)"
        )
    path = args.ledger or config.ledger.path
    if args.ledger:
        config = on_file(config, path)
    if not ledger_exists(config, Path(path)):
        _error(f"no ledger at {path}: pass --ledger with the running proxy's ledger file")
        return 1
    if config.ledger.backend == "postgres":
        path = "ledger.backend: postgres"
    try:
        rows, start, end = asyncio.run(read_ledger(config, os.environ, days=args.days, now=time.time()))
    except LedgerUnavailable as exc:
        _error(str(exc))
        return 1
    replay = replay_rows(rows, router, book, start=start, end=end)
    if args.json:
        _print_json(_replay_json(replay, args.config, path, args.days))
    else:
        _print_replay(replay, args.config, path, args.days)
    return 0


def _replay_json(replay: Replay, config_path: str, ledger_path: str, days: float) -> dict[str, Any]:
    data = asdict(replay)
    data.update(
        config=config_path,
        ledger=ledger_path,
        days=days,
        difference_usd=replay.difference_usd,
        difference_pct=replay.difference_pct,
    )
    for group, source in zip(data["groups"], replay.groups):
        group["difference_usd"] = source.difference_usd
    return data


def _print_replay(replay: Replay, config_path: str, ledger_path: str, days: float) -> None:
    from rich.table import Table

    console = _console()
    table = Table(
        title=f"{replay.requests:,} requests of the last {days:g} days from {ledger_path}, "
        f"actual vs what-if under {config_path}",
        title_justify="left",
    )
    table.add_column("requested model")
    for name in ("requests", "prompt tok", "completion tok", "actual $", "what-if $", "difference $", "difference %"):
        table.add_column(name, justify="right")
    table.add_column("what-if route (chain: primary)")
    for g in replay.groups:
        diff = g.difference_usd
        table.add_row(
            g.requested_model,
            f"{g.requests:,}",
            f"{g.prompt_tokens:,}",
            f"{g.completion_tokens:,}",
            _usd(g.actual_usd),
            "unroutable" if g.what_if_usd is None else _usd(g.what_if_usd),
            "-" if diff is None else _usd(diff),
            f"{100 * diff / g.actual_usd:+.1f}" if diff is not None and g.actual_usd else "-",
            ", ".join(g.routed_to),
        )
    table.add_section()
    pct = replay.difference_pct
    table.add_row(
        "total (routable)",
        f"{replay.requests - replay.unroutable_requests:,}",
        "",
        "",
        _usd(replay.actual_usd),
        _usd(replay.what_if_usd),
        _usd(replay.difference_usd),
        "-" if pct is None else f"{pct:+.1f}",
        "",
        style="bold",
    )
    console.print(table)
    for note in replay.notes:
        console.print(f"note: {note}", markup=False)
