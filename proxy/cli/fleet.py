"""`orproxy serve --workers N`: checks the config can be shared, then runs the supervisor."""

from __future__ import annotations

import argparse
import asyncio
import sys

from proxy.config import Config
from proxy.ops.workers import Supervisor, fleet_refusal


def serve_fleet(args: argparse.Namespace, config: Config) -> int:
    if args.workers < 1:
        print(f"orproxy: --workers must be 1 or more, not {args.workers}", file=sys.stderr)
        return 2
    if args.demo:
        print("orproxy: --demo runs one process on in-process state: drop --workers", file=sys.stderr)
        return 2
    refusal = fleet_refusal(args.workers, config.state.backend)
    if refusal is not None:
        print(f"orproxy: {refusal}", file=sys.stderr)
        return 2
    worker_args = ["serve", "--config", str(args.config)]
    for flag, value in (("--host", args.host), ("--port", args.port)):
        if value is not None:
            worker_args += [flag, str(value)]
    supervisor = Supervisor(worker_args, args.workers, config.shutdown_timeout_s)
    return asyncio.run(supervisor.run())
