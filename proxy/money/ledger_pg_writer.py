"""The PostgreSQL ledger's writer: one task that takes everything queued (up to `max_batch` rows)
and sends it as one `executemany` of one prepared INSERT, which asyncpg pipelines (one round trip)
in one implicit transaction (all or nothing), so a burst costs one commit.

A batch that failed on the connection (a restarted server, a failover) is sent again, on a new
connection: rows are keyed by (request_id, ts) with `ON CONFLICT DO NOTHING`, so a batch whose
commit happened but whose answer was lost cannot count twice. A batch the server refused is sent
again row by row, so that one bad row does not cost the others theirs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

from proxy.money.ledger_pg_schema import insert_statement
from proxy.money.ledger_rows import LedgerClosed, LedgerRow, to_params

log = logging.getLogger("orproxy.ledger")
_RETRY_DELAYS_S = (0.05, 0.25, 1.0, 2.0)  # a lost connection: the batch is sent again after each
# InternalClientError: what asyncpg raises on a connection the server cut in the middle of a pipelined batch.
CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,  # the server is starting up, or shutting down (a failover)
)


@dataclass(slots=True)
class _Pending:
    row: LedgerRow | None  # None: a flush barrier, resolved with the batch it lands in
    future: asyncio.Future[None]
    error: BaseException | None = None  # this row's own failure, when its batch was written row by row


def _storable(row: LedgerRow) -> tuple:
    """The row's values as PostgreSQL TEXT can hold them: it refuses NUL characters and unpaired
    surrogates, which a client can put in a model name (SQLite keeps them). Replaced, not refused:
    the request cost money all the same."""
    values = to_params(row)
    if any(isinstance(v, str) and (not v.isascii() or "\x00" in v) for v in values):
        return tuple(_clean(v) if isinstance(v, str) else v for v in values)
    return values  # nearly always: ASCII without NUL, nothing to copy


def _clean(text: str) -> str:
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


class PgLedgerWriter:
    """Owns the queue and the task that writes it. `submit` queues a row (or, None, a flush
    barrier) and returns the future its commit resolves; `stop` queues the end, after which
    `stopped()` returns once everything queued before it is settled."""

    def __init__(self, pool: asyncpg.Pool, where: str, *, max_batch: int) -> None:
        self._pool = pool
        self._where = where
        self._max_batch = max_batch
        self._insert = insert_statement()
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()  # None: stop
        self.closed = False  # stopped, or cancelled: nothing more is queued
        self.commits = 0
        self.rows_written = 0
        self._task = asyncio.create_task(self._write_forever(), name="ledger-writer:postgres")

    def running(self) -> bool:
        return not self.closed and not self._task.done()

    def submit(self, row: LedgerRow | None) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(row, future))
        return future

    def stop(self) -> None:
        self.closed = True
        self._queue.put_nowait(None)

    async def stopped(self) -> None:
        await asyncio.wait([self._task])  # wait, not await: a cancelled writer must not fail close()

    async def _write_forever(self) -> None:
        batch: list[_Pending] = []
        try:
            stopping = False
            while not stopping:
                first = await self._queue.get()
                stopping = first is None
                batch = [] if first is None else [first]
                await asyncio.sleep(0)  # one loop turn: requests finishing together share the commit
                while not stopping and len(batch) < self._max_batch and not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is None:
                        stopping = True
                    else:
                        batch.append(item)
                if batch:
                    await self._write_batch(batch)
                batch = []
        except asyncio.CancelledError:
            self.closed = True
            error = LedgerClosed(f"ledger {self._where} writer was cancelled")
            for item in batch + _drain(self._queue):
                _settle(item.future, error)
            raise

    async def _write_batch(self, batch: list[_Pending]) -> None:
        rows = [item.row for item in batch if item.row is not None]
        error: BaseException | None = None
        if rows:
            params = [_storable(row) for row in rows]
            error = await self._insert_all(params)
            if error is not None and not isinstance(error, CONNECTION_ERRORS) and len(rows) > 1:
                # Refused by the server: one row must not cost the others theirs, so each goes alone.
                errors = [await self._insert_all([one]) for one in params]
                for item, failure in zip((item for item in batch if item.row is not None), errors):
                    item.error = failure
                error = None
            if error is not None:
                log.error("ledger %s: could not record %d request(s): %s", self._where, len(rows), error)
        for item in batch:
            failure = item.error if item.error is not None else error
            _settle(item.future, failure if item.row is not None else None)

    async def _insert_all(self, params: list[tuple]) -> BaseException | None:
        """Insert in one transaction; sent again on a new connection when the connection fails (the
        key makes a repeat harmless). Returns the error that stopped it, or None once committed."""
        for delay in (*_RETRY_DELAYS_S, None):
            try:
                await self._pool.executemany(self._insert, params)
            except CONNECTION_ERRORS as exc:
                if delay is None:
                    return exc
                log.warning("ledger %s: %s; sending %d row(s) again in %.2fs", self._where, exc, len(params), delay)
                await asyncio.sleep(delay)
            except Exception as exc:  # refused by the server
                if len(params) == 1:
                    log.error("ledger %s: could not record request %s: %s", self._where, params[0][1], exc)
                return exc
            else:
                self.commits += 1
                self.rows_written += len(params)
                return None
        raise AssertionError("unreachable")

    # --- reading -------------------------------------------------------------


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _drain(queue: asyncio.Queue[_Pending | None]) -> list[_Pending]:
    items = []
    while not queue.empty():
        item = queue.get_nowait()
        if item is not None:
            items.append(item)
    return items
