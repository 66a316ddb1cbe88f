"""Calls of the request path, sent together: script calls are queued and go to Redis in one
pipeline (one write, one read). A call that a request waits on (a reservation) is sent after the
current round of the event loop's callbacks, with everything queued by then; one that nobody waits
on (a settlement, once the answer is complete) waits up to `wait_s` for company, and nearly always
rides along with the next reservation.

On this kind of machine a round trip's cost is mostly its system calls (a loopback send that
wakes Redis), not Redis's work; so under load a request costs about one round trip, not two.
Calls keep their order: a settlement queued before a reservation is applied before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import NoScriptError, RedisError

_Call = tuple[str, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class PackedInC(Connection):
    """A TCP connection whose commands are packed by hiredis (in C): redis-py's asyncio connection
    packs in Python, argument by argument, which was the largest share of the client's CPU here."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # 'CONFIG GET' and the like: separate arguments
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(self.pack_command(*command)[0] for command in commands)]


class ScriptBatcher:
    def __init__(self, redis: Redis, scripts: Sequence[str]) -> None:
        self._redis = redis
        self._scripts = {text: redis.register_script(text) for text in scripts}
        self._queue: list[_Call] = []
        self._soon = False  # a flush is due after the current round of callbacks
        self._timer: asyncio.TimerHandle | None = None  # a flush is due when a deferred call's wait ends
        self._flushing: set[asyncio.Task[None]] = set()
        self.calls = 0  # script calls sent, and the round trips that carried them (for /admin/status)
        self.round_trips = 0

    def sha(self, text: str) -> str:
        sha = self._scripts[text].sha
        assert isinstance(sha, str)
        return sha

    def call(self, script: str, keys: Sequence[Any], args: Sequence[Any], wait_s: float = 0.0) -> asyncio.Future[Any]:
        """Run `script` (one of those given at construction) with a coming batch: after this round
        of the loop, or with `wait_s`, at the latest that much later."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        if not wait_s:
            if not self._soon:
                self._soon = True
                loop.call_soon(self._start)
        elif self._timer is None and not self._soon:
            self._timer = loop.call_later(wait_s, self._start)
        return future

    def _start(self) -> None:
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._queue:
            return
        batch, self._queue = self._queue, []
        self.calls += len(batch)
        self.round_trips += 1
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def drain(self) -> None:
        """Send what is queued now and wait for every batch on its way (shutdown)."""
        if self._queue:
            self._start()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)

    async def _flush(self, batch: list[_Call]) -> None:
        try:
            results = await self._send(batch)
            missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if missing:  # a Redis restarted since: load the scripts, and send those calls once more
                await self.load()
                for i, result in zip(missing, await self._send([batch[i] for i in missing]), strict=True):
                    results[i] = result
        except RedisError as exc:
            results = [exc] * len(batch)
        for (_, _, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _send(self, batch: Sequence[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                pipe.evalsha(self.sha(script), len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def load(self) -> None:
        for text in self._scripts:
            await self._redis.script_load(text)
