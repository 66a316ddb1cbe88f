"""Run the emulator standalone: python -m proxy.emulator --port 9000."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import orjson
from aiohttp import web

from .app import create_emulator_app


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m proxy.emulator", description="Run the OpenRouter emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--catalogue", type=Path, help="a /api/v1/models JSON file (default: the packaged snapshot)")
    parser.add_argument("--api-key", help="accept only this bearer key (default: any non-empty key)")
    parser.add_argument("--access-log", action="store_true", help="log every request (slows benchmarks)")
    return parser.parse_args(argv)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (absent on Windows)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    catalogue = orjson.loads(args.catalogue.read_bytes()) if args.catalogue else None
    app = create_emulator_app(catalogue=catalogue, api_key=args.api_key)
    logging.basicConfig(level=logging.INFO)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        loop=_new_loop(),
        access_log=logging.getLogger("aiohttp.access") if args.access_log else None,
        print=lambda *_: print(f"OpenRouter emulator on http://{args.host}:{args.port}/api/v1", flush=True),
    )


if __name__ == "__main__":
    main()
