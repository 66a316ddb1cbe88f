"""The `orproxy` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from proxy.cli.batches import register as register_batches
from proxy.cli.ops import register as register_ops
from proxy.cli.serve import serve_one
from proxy.config import Config, ConfigError, ConfigMissing, load_config, located_error, parse_config
from proxy.ops.logs import queued_logging

if TYPE_CHECKING:
    from proxy.money.catalogue import CatalogueSource

EXAMPLE_CONFIG = "config.example.yaml"  # in proxy/data: what `orproxy init` writes

log = logging.getLogger("orproxy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orproxy", description="A cost-aware OpenAI-compatible gateway for OpenRouter."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default="config.yaml", help="path to config.yaml (default: %(default)s)")
    serve.add_argument("--host", help="override listen.host")
    serve.add_argument("--port", type=int, help="override listen.port")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="serve against the built-in OpenRouter emulator (no key, no network), "
        "with one failing model so you can watch fallback",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N worker processes on one port under a supervisor (needs `state.backend: redis`; default 1)",
    )
    serve.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)  # set by the supervisor, for its workers
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve)

    init = sub.add_parser("init", help="write the example config (commented) to start from")
    init.add_argument("path", nargs="?", default="config.yaml", help="where to write it (default: %(default)s)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(run=_init)

    check = sub.add_parser("check", help="validate a config file without starting anything")
    check.add_argument("config", nargs="?", default="config.yaml")
    check.set_defaults(run=_check)

    schema = sub.add_parser("schema", help="print the JSON Schema of config.yaml (for editors)")
    schema.set_defaults(run=_schema)

    explain = sub.add_parser("explain", help="show where a request would go, and why (nothing is sent)")
    explain.add_argument("--config", default="config.yaml")
    explain.add_argument("--model", required=True, help="the model the client asks for, e.g. auto")
    explain.add_argument("--task", help="the X-Task-Type header")
    explain.add_argument("--messages-file", help="a JSON file with the `messages` array (or a whole request body)")
    explain.add_argument("--max-tokens", type=int)
    explain.add_argument("--stream", action="store_true")
    explain.add_argument("--key", help="the client key's name, for its budget")
    explain.add_argument("--ledger", help="ledger file for today's spend (default: the config's ledger.path)")
    explain.set_defaults(run=_explain)

    report = sub.add_parser("report", help="what was spent and saved, from the ledger")
    report.add_argument("--config", default="config.yaml")
    report.add_argument("--period", choices=("day", "month"), default="day")
    report.add_argument("--by", choices=("model", "virtual", "key", "api", "batch"), default="model")
    report.add_argument("--ledger", help="ledger file (default: the config's ledger.path)")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.add_argument(
        "--demo", action="store_true", help="read the ledger `serve --demo` keeps apart (demo-<ledger.path>)"
    )
    report.set_defaults(run=_report)

    from proxy.emulator.__main__ import add_arguments as emulator_arguments

    emulator = sub.add_parser("emulator", help="run the OpenRouter emulator on its own")
    emulator_arguments(emulator)
    emulator.set_defaults(run=_emulator)
    register_ops(sub)
    register_batches(sub)
    return parser


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigMissing:
        print(
            f"orproxy: there is no config file at {path}; write the commented example there with "
            f"`orproxy init {path}`, or point --config at yours",
            file=sys.stderr,
        )
        return None
    except ConfigError as exc:
        _print_invalid(exc)
        return None


def _print_invalid(exc: ConfigError) -> None:
    print(
        f"orproxy: the config is invalid ({len(exc.issues)} problem{'s' * (len(exc.issues) != 1)}):",
        file=sys.stderr,
    )
    for issue in exc.issues:
        print(f"  {issue.render(exc.filename)}", file=sys.stderr)


def _load_priced(path: str) -> tuple[Config, CatalogueSource] | None:
    """The config and its price catalogue, or None (said on stderr) when either refuses the other."""
    return _priced(_load(path), path)


def _priced(config: Config | None, path: str) -> tuple[Config, CatalogueSource] | None:
    if config is None:
        return None
    from proxy.money.catalogue import catalogue_errors, load_catalogue_source

    source = load_catalogue_source(config)
    errors = catalogue_errors(config, source)
    if errors:
        _print_invalid(located_error(path, errors))
        return None
    return config, source


def _check(args: argparse.Namespace) -> int:
    loaded = _load_priced(args.config)
    if loaded is None:
        return 1
    config, source = loaded
    from proxy.money.catalogue import catalogue_warnings

    warnings = catalogue_warnings(config, source.catalogue)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{args.config}: OK ({len(config.models)} virtual models, {len(config.upstreams)} upstreams"
        f"{f', {len(warnings)} warnings' if warnings else ''}; prices from {source.describe()})"
    )
    return 0


def _schema(args: argparse.Namespace) -> int:
    from proxy.config import config_json_schema

    sys.stdout.write(orjson.dumps(config_json_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _explain(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    body: dict = {"model": args.model, "messages": [{"role": "user", "content": ""}]}
    if args.messages_file:
        try:
            loaded = orjson.loads(Path(args.messages_file).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            print(f"orproxy: cannot read {args.messages_file}: {exc}", file=sys.stderr)
            return 1
        body.update(loaded if isinstance(loaded, dict) else {"messages": loaded})
        body["model"] = args.model
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    if args.stream:
        body["stream"] = True
    headers = {"X-Task-Type": args.task} if args.task else {}
    decision = asyncio.run(_offline_explain(config, body, headers, args))
    if decision is None:
        return 1
    sys.stdout.write(orjson.dumps(decision, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


async def _offline_explain(config: Config, body: dict, headers: dict, args: argparse.Namespace) -> dict | None:
    """As the proxy would decide now, with the same catalogue and the same policy it builds, minus
    the live state (cooldowns, rate limits) only the running proxy knows."""
    from proxy.core.budget import SpendCounters
    from proxy.core.errors import InvalidRequest
    from proxy.core.explain import explain
    from proxy.core.policy import Policy
    from proxy.core.routing import UnknownModel
    from proxy.money.accounting import recorded_spend
    from proxy.money.catalogue import load_catalogue_source
    from proxy.money.ledger_api import ledger_exists, on_file, open_ledger

    now = time.time()
    counters = SpendCounters(config.budget.timezone, now)
    path = Path(args.ledger or config.ledger.path)
    if args.ledger:
        config = on_file(config, path)
    if ledger_exists(config, path):
        ledger = await open_ledger(config, os.environ, path=path, prune=False)
        try:
            counters.load(*await recorded_spend(ledger, counters.calendar))
        finally:
            await ledger.close()
    policy = Policy.build(config, load_catalogue_source(config).catalogue, os.environ, counters)
    try:
        return explain(policy, body, headers, key=args.key, blocked=None, now=now)
    except UnknownModel as exc:
        print(f"orproxy: unknown model '{exc.requested}'; valid: {', '.join(exc.valid)}", file=sys.stderr)
        return None
    except InvalidRequest as exc:  # an embeddings model: explain decides for chat bodies
        print(f"orproxy: {exc.message}", file=sys.stderr)
        return None


def example_config_text() -> str:
    from importlib import resources

    return (resources.files("proxy") / "data" / EXAMPLE_CONFIG).read_text(encoding="utf-8")


def _init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"orproxy: {path} exists already; pass --force to overwrite it", file=sys.stderr)
        return 1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(example_config_text(), encoding="utf-8")
    except OSError as exc:
        print(f"orproxy: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}: edit it, then `orproxy serve --config {path}` (or try `--demo` first, no key needed)")
    return 0


def _serve_config(args: argparse.Namespace) -> Config | None:
    """The config to serve. In demo mode without a config file (outside a checkout, after `pip
    install`), the packaged example, with its data paths under the working directory."""
    if args.demo and args.config == "config.yaml" and not Path(args.config).exists():
        from proxy.config import resolve_paths

        print(
            "orproxy: no config.yaml here: the demo runs on the packaged example (`orproxy init` writes it out)",
            file=sys.stderr,
        )
        return resolve_paths(parse_config(example_config_text(), f"<packaged {EXAMPLE_CONFIG}>"), Path.cwd())
    return _load(args.config)


def _serve(args: argparse.Namespace) -> int:
    loaded = _priced(_serve_config(args), args.config)
    if loaded is None:
        return 1
    config = loaded[0]
    # Every line goes through a queue to a writer thread: the event loop never formats a line nor
    # waits on stderr. Leaving the block writes out what is queued: no line is lost at shutdown.
    with queued_logging(config.logging.level, sys.stderr):
        logging.getLogger("orproxy").setLevel(config.logging.level)  # what a reload changes
        if args.workers != 1:
            from proxy.cli.fleet import serve_fleet

            return serve_fleet(args, config)
        return serve_one(config, args)


def _report(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from proxy.money.ledger_api import LedgerUnavailable, ledger_exists, on_file
    from proxy.ops.demo import demo_path

    path = Path(args.ledger or (demo_path(config.ledger.path) if args.demo else config.ledger.path))
    if args.demo or args.ledger:  # a file: the demo's ledger is always SQLite
        config = on_file(config, path)
    if not ledger_exists(config, path):
        demo = Path(demo_path(config.ledger.path))
        hint = (
            f"; only the demo has run here, and it keeps its spend apart in {demo}: `orproxy report --demo`"
            if not args.demo and not args.ledger and demo.exists()
            else " (it is created when the proxy first serves)"
        )
        print(f"orproxy: no ledger at {path} yet{hint}", file=sys.stderr)
        return 1
    try:
        report = asyncio.run(_build_report(path, config, args.period, args.by))
    except LedgerUnavailable as exc:
        print(f"orproxy: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        from rich.console import Console

        from proxy.money.reports import render

        # Piped output has no terminal width to fit; do not squash the columns into ellipses.
        Console(width=None if sys.stdout.isatty() else 200).print(render(report))
    return 0


async def _build_report(path: Path, config: Config, period: str, by: str) -> dict:
    from proxy.money.ledger_api import open_ledger
    from proxy.money.reports import spend_report

    ledger = await open_ledger(config, os.environ, path=path, prune=False)
    try:
        return await spend_report(ledger, period, by, config.budget.timezone, time.time())  # type: ignore[arg-type]
    finally:
        await ledger.close()


def _emulator(args: argparse.Namespace) -> int:
    from proxy.emulator.__main__ import run

    return run(args)
