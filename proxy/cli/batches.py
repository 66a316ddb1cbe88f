"""`orproxy batches [list|show ID|cancel ID]`: the batches kept in the ledger's database (the SQLite
file, or PostgreSQL with `ledger.backend: postgres`), read (and a cancel written) there directly,
so it works whether the proxy runs or not; a running proxy (any replica) picks a cancel up on its
next step (within a second) and starts no new line of that batch."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from proxy.batch.lifecycle import cancel, render
from proxy.config import Config, ConfigError, ConfigMissing, load_config
from proxy.money.batch_store import open_batch_store
from proxy.money.batch_store_sqlite import SqliteBatchStore
from proxy.money.ledger_api import LedgerUnavailable


def register(subparsers: argparse._SubParsersAction) -> None:
    batches = subparsers.add_parser("batches", help="batches (OpenAI's Batch API): list, show ID, cancel ID")
    batches.add_argument("action", nargs="?", choices=("list", "show", "cancel"), default="list")
    batches.add_argument("batch_id", nargs="?", help="show / cancel: the batch's id")
    batches.add_argument("--config", default="config.yaml")
    batches.add_argument("--ledger", help="ledger file (default: the config's ledger.path)")
    batches.add_argument("--limit", type=int, default=20, help="list: how many, newest first (default: %(default)s)")
    batches.add_argument("--json", action="store_true", help="print JSON instead of text")
    batches.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.action in ("show", "cancel") and not args.batch_id:
        print(f"orproxy batches {args.action}: give the batch's id", file=sys.stderr)
        return 2
    config: Config | None = None
    if args.ledger is None:
        try:
            config = load_config(args.config)
        except (ConfigMissing, ConfigError) as exc:
            print(f"orproxy batches: cannot read {args.config}: {exc}; or pass --ledger", file=sys.stderr)
            return 1
    path = Path(args.ledger or (config.ledger.path if config is not None else ""))
    if (config is None or config.ledger.backend == "sqlite") and not path.exists():
        print(f"orproxy batches: no ledger at {path} yet (it is created when the proxy first serves)", file=sys.stderr)
        return 1
    return asyncio.run(_run(config, path, args))


async def _run(config: Config | None, path: Path, args: argparse.Namespace) -> int:
    try:
        store = await (open_batch_store(config, os.environ) if config is not None else SqliteBatchStore.open(path))
    except LedgerUnavailable as exc:
        print(f"orproxy batches: {exc}", file=sys.stderr)
        return 1
    where = path if config is None or config.ledger.backend == "sqlite" else "the ledger database"
    try:
        if args.action == "list":
            found = await store.batches(max(1, args.limit))
            shown = [await render(store, batch) for batch in found]
            _print(shown, args.json, _line)
            return 0
        batch = await store.batch(args.batch_id)
        if batch is None:
            print(f"orproxy batches: no batch {args.batch_id} in {where}", file=sys.stderr)
            return 1
        if args.action == "cancel":
            cancelled = await cancel(store, batch, time.time())
            if cancelled is None:
                print(f"orproxy batches: {batch.id} has already ended ({batch.status})", file=sys.stderr)
                return 1
            batch = cancelled
        _print([await render(store, batch)], args.json, _detail)
        return 0
    finally:
        await store.close()


def _line(view: dict[str, Any]) -> str:
    counts = view["request_counts"]
    return (
        f"{view['id']}  {view['status']:<11}  {counts['completed']}/{counts['total']} done"
        f" ({counts['failed']} failed)  ${view['x_proxy']['cost_usd']:.6f}  {view['endpoint']}"
    )


def _detail(view: dict[str, Any]) -> str:
    extra = view["x_proxy"]
    lines = [_line(view)]
    for name in ("input_file_id", "output_file_id", "error_file_id", "created_at", "expires_at", "metadata"):
        if view.get(name) is not None:
            lines.append(f"  {name}: {view[name]}")
    if extra.get("paused_until"):
        lines.append(f"  paused until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(extra['paused_until']))} UTC")
    lines.append(f"  runs on: {extra['upstream']}; lines left: {extra['lines_left']}")
    for error in (view.get("errors") or {}).get("data", ()):
        lines.append(f"  line {error['line']}: {error['code']}: {error['message']}")
    return "\n".join(lines)


def _print(views: list[dict[str, Any]], as_json: bool, text: Any) -> None:
    if as_json:
        payload = views if len(views) != 1 or text is _line else views[0]
        sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for view in views:
        print(text(view))
    if not views:
        print("no batches")
