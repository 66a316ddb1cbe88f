"""Run the emulator standalone: python -m proxy.emulator --port 9000."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import sys
from pathlib import Path

import orjson
from aiohttp import web

from .app import create_emulator_app
from .state import MAX_RECORDED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options, shared by `python -m proxy.emulator` and `orproxy emulator`."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--catalogue", type=Path, help="a /api/v1/models JSON file (default: the packaged snapshot)")
    parser.add_argument("--api-key", help="accept only this bearer key (default: any non-empty key)")
    parser.add_argument("--access-log", action="store_true", help="log every request (slows benchmarks)")
    parser.add_argument(
        "--max-bills",
        type=int,
        metavar="N",
        help="keep the newest bills past N, not all (long benchmarks; default: all, as the tests' audits need)",
    )
    parser.add_argument(
        "--max-recorded",
        type=int,
        default=MAX_RECORDED,
        metavar="N",
        help=f"requests kept for inspection (default {MAX_RECORDED}; a benchmark of big bodies wants few)",
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m proxy.emulator", description="Run the OpenRouter emulator.")
    add_arguments(parser)
    return parser.parse_args(argv)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (absent on Windows)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; a catalogue that cannot be read or a port that cannot be bound is one
    line on stderr and exit status 1."""
    try:
        catalogue = orjson.loads(args.catalogue.read_bytes()) if args.catalogue else None
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"emulator: cannot read the catalogue {args.catalogue}: {exc}", file=sys.stderr)
        return 1
    if (args.max_bills is not None and args.max_bills < 2) or args.max_recorded < 1:
        print("emulator: --max-bills must be at least 2 and --max-recorded at least 1", file=sys.stderr)
        return 2
    app = create_emulator_app(
        catalogue=catalogue, api_key=args.api_key, max_bills=args.max_bills, max_recorded=args.max_recorded
    )
    logging.basicConfig(level=logging.INFO)
    try:
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            loop=_new_loop(),
            access_log=logging.getLogger("aiohttp.access") if args.access_log else None,
            print=lambda *_: print(f"OpenRouter emulator on http://{args.host}:{args.port}/api/v1", flush=True),
        )
    except OSError as exc:
        taken = exc.errno == errno.EADDRINUSE
        why = "the port is already in use; pick another with --port" if taken else (exc.strerror or str(exc))
        print(f"emulator: cannot listen on {args.host}:{args.port}: {why}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
