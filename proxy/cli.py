"""The `orproxy` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

from .config import Config, ConfigError, load_config

log = logging.getLogger("orproxy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orproxy", description="A cost-aware OpenAI-compatible gateway for OpenRouter.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default="config.yaml", help="path to config.yaml (default: %(default)s)")
    serve.add_argument("--host", help="override listen.host")
    serve.add_argument("--port", type=int, help="override listen.port")
    serve.add_argument("--demo", action="store_true",
                       help="serve against the built-in OpenRouter emulator (no key, no network), "
                            "with one failing model so you can watch fallback")
    serve.set_defaults(run=_serve)

    check = sub.add_parser("check", help="validate a config file without starting anything")
    check.add_argument("config", nargs="?", default="config.yaml")
    check.set_defaults(run=_check)

    emulator = sub.add_parser("emulator", help="run the OpenRouter emulator on its own")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=9000)
    emulator.set_defaults(run=_emulator)
    return parser


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"orproxy: the config is invalid ({len(exc.issues)} problem{'s' * (len(exc.issues) != 1)}):",
              file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue.render(exc.filename)}", file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    print(f"{args.config}: OK ({len(config.models)} virtual models, {len(config.upstreams)} upstreams)")
    return 0


def _setup_logging(config: Config) -> None:
    logging.basicConfig(level=config.logging.level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. on Windows); asyncio's loop works, a little slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    _setup_logging(config)
    listen = config.listen.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    env = os.environ
    if args.demo:
        from .demo import start_demo
        config, env = loop.run_until_complete(start_demo(config))
    from .app import create_app
    app = create_app(config, env=env)
    log.info("orproxy listening on http://%s:%d/v1 (%d virtual models: %s)", listen.host, listen.port,
             len(config.models), ", ".join(config.models))
    web.run_app(app, host=listen.host, port=listen.port, access_log=None, handler_cancellation=True,
                print=None, loop=loop)
    return 0


def _emulator(args: argparse.Namespace) -> int:
    from .emulator.__main__ import main as emulator_main
    return emulator_main(["--host", args.host, "--port", str(args.port)]) or 0
