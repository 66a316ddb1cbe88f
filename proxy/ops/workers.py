"""`orproxy serve --workers N`: N worker processes on one port, under one supervisor.

Each worker is a whole proxy (`orproxy serve` with the hidden `--worker-dir`),
bound with SO_REUSEPORT so the kernel spreads connections over them. They share
budgets, breakers and the cache through Redis (`state.backend: redis`) and the
ledger through its database; the supervisor only keeps them running:

- a worker that dies is replaced, after a pause that grows while it keeps dying
  at once (a crash loop does not spin);
- SIGHUP is forwarded (each worker reloads its config);
- SIGTERM or SIGINT is forwarded as SIGTERM: each worker stops accepting,
  finishes its requests within `shutdown_timeout_s`, flushes its ledger and
  exits; the supervisor waits for all of them and exits 0;
- a worker that fails at the very first start (a taken port, a ledger that
  cannot open) stops the whole fleet with exit 1: restarting cannot help.

The supervisor also owns the directory of the fleet's metric files
(`proxy.ops.fleet`) and tells prometheus_client when a worker is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.ops.fleet import mark_process_dead

log = logging.getLogger("orproxy")

QUICK_EXIT_S = 3.0  # a worker gone this soon after its start did not get going
MAX_PAUSE_S = 30.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def fleet_refusal(workers: int, backend: str) -> str | None:
    """Why `--workers N` cannot run on this config, or None."""
    if workers > 1 and backend == "local":
        return (
            f"--workers {workers} needs state every worker shares: with `state.backend: local` each worker would "
            f"keep its own budget (so {workers}× the daily cap could be spent), its own breakers and cache. "
            "Set `state.backend: redis` (and `state.url` or `state.url_env`) in the config, or run one worker."
        )
    return None


@dataclass(slots=True)
class _Slot:
    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    pause_s: float = 0.0  # before the next restart; grows while the worker keeps dying at once
    starts: int = 0


class Supervisor:
    def __init__(self, worker_args: Sequence[str], count: int, shutdown_timeout_s: float) -> None:
        self._args = list(worker_args)  # `serve` and its options, without the worker flags
        self._slots = [_Slot(i) for i in range(count)]
        self._grace_s = shutdown_timeout_s + 5.0
        self._stopping = asyncio.Event()
        self.directory = Path(tempfile.mkdtemp(prefix="orproxy-fleet-"))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        for stop in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop, self._stopping.set)
        try:
            for slot in self._slots:
                await self._start(slot)
            log.info("orproxy supervisor (pid %d): %d workers", os.getpid(), len(self._slots))
            code = await self._watch()
            await self._stop_all()
            return code
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def _watch(self) -> int:
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                exits = {asyncio.ensure_future(s.process.wait()): s for s in self._slots if s.process is not None}
                done, _ = await asyncio.wait({stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
                for waiter in exits:
                    if waiter not in done:
                        waiter.cancel()
                for waiter in done - {stopping}:
                    slot = exits[waiter]
                    if not await self._replace(slot, waiter.result()):
                        return 1
            return 0
        finally:
            stopping.cancel()

    async def _replace(self, slot: _Slot, code: int) -> bool:
        """A worker exited on its own: start another, unless it never got going the first time."""
        assert slot.process is not None
        pid, slot.process = slot.process.pid, None
        mark_process_dead(pid, str(self.directory))
        lived = time.monotonic() - slot.started_at
        if slot.starts == 1 and lived < QUICK_EXIT_S and code > 0:  # its own exit: a signal is someone else's
            log.error("worker %d (pid %d) failed at start-up (exit %d): stopping the fleet", slot.index, pid, code)
            self._stopping.set()
            return False
        slot.pause_s = min(MAX_PAUSE_S, max(0.5, slot.pause_s * 2)) if lived < QUICK_EXIT_S else 0.0
        log.warning(
            "worker %d (pid %d) exited with %s after %.1f s: starting another%s",
            slot.index,
            pid,
            f"signal {-code}" if code < 0 else f"code {code}",
            lived,
            f" in {slot.pause_s:.1f} s" if slot.pause_s else "",
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), slot.pause_s)
        if not self._stopping.is_set():
            await self._start(slot)
        return True

    async def _start(self, slot: _Slot) -> None:
        args = [*self._args, "--worker-dir", str(self.directory), "--worker-index", str(slot.index)]
        slot.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *args, preexec_fn=_die_with_parent
        )
        slot.started_at = time.monotonic()
        slot.starts += 1

    def _forward(self, signum: int) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(signum)

    async def _stop_all(self) -> None:
        self._forward(signal.SIGTERM)
        running = [s.process for s in self._slots if s.process is not None]
        if not running:
            return
        _, late = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=self._grace_s)
        if late:
            log.error("%d workers still running %.0f s after SIGTERM: killing them", len(late), self._grace_s)
            for process in running:
                if process.returncode is None:
                    process.kill()
            await asyncio.gather(*(p.wait() for p in running))


def _die_with_parent() -> None:
    """In the worker, before exec (Linux): SIGTERM when the supervisor dies, even by SIGKILL, so no
    worker is left serving on its own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
