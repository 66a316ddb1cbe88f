"""The ledger's writer: a dedicated thread with its own SQLite connection, committing rows in
groups and waking the event loop once per group.

The event loop never waits on the disk. Each row is put on the thread's queue as it comes (a
put wakes the thread only when it is waiting there). The thread takes everything queued (up to
`max_batch` rows), writes it in ONE transaction (a single multi-row INSERT, atomic in autocommit
mode; `BEGIN IMMEDIATE` ... `COMMIT` around several when the group is larger than one statement
may be), then makes one `call_soon_threadsafe` that resolves every future of the group: their
rows are in the WAL, so a SIGKILL afterwards loses none of them. While a commit is in progress
(SQLite releases the GIL), the next rows gather on the queue, so the rows per commit grow with
the load by themselves. (Rows were once handed over at the end of each turn of the loop, with a
`call_soon`: a turn of the loop more for every request, for grouping the delay below does better.)

Each SQLite call releases the GIL and must take it back from the busy loop thread (up to the
interpreter's switch interval, 5 ms): one statement per group keeps that to one round.

Group commit under load (`commit_delay_s`, PostgreSQL's commit_delay/commit_siblings): a commit
costs about the same for one row as for a dozen (a WAL frame per page the row touches, locks,
two GIL hand-overs and the thread's wake-ups), so when other requests are in flight (`busy()`
says how many requests the process is serving, the rows' own included), the thread waits up to
`commit_delay_s` for them to join the group before it commits. With nothing else in flight (one
client, requests back to back) it commits at once: the delay never adds to an idle proxy's latency.
While the load lasts, the thread does not wait to be woken for the next group either: it sleeps the
delay and takes the rows queued meanwhile, so a put finds nobody waiting and costs the
loop no wake-up of the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.money.ledger_rows import ROWS_PER_STATEMENT, LedgerRow, insert_many, to_params

log = logging.getLogger("orproxy.ledger")


@dataclass(slots=True)
class Pending:
    row: LedgerRow | None  # None: a flush barrier, resolved with the group it lands in
    future: asyncio.Future[None]


_STOP = object()  # the last item: write what came before it, close the connection, end the thread


def connect(path: Path, synchronous: str, busy_timeout_s: float) -> sqlite3.Connection:
    """The writer's own connection (blocking: call it off the loop). `isolation_level=None`: the
    writer issues BEGIN/COMMIT itself; `check_same_thread=False`: opened here, used by the thread."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        db.execute(f"PRAGMA synchronous = {synchronous}")  # per connection, unlike journal_mode
    except BaseException:
        db.close()
        raise
    return db


class LedgerWriter:
    """Owns the thread and its connection. `submit` is called on the event loop; `stop` queues
    the end, after which `stopped` resolves once everything queued before it is settled."""

    def __init__(
        self,
        db: sqlite3.Connection,
        path: Path,
        *,
        max_batch: int,
        loop: asyncio.AbstractEventLoop,
        commit_delay_s: float = 0.0,
        busy: Callable[[], int] | None = None,
    ) -> None:
        self._db = db
        self._path = path
        self._max_batch = max_batch
        self._loop = loop
        self._delay_s = commit_delay_s if busy is not None else 0.0
        self._busy = busy  # read on the thread: how many requests the process is serving
        self._jobs: queue.SimpleQueue[Pending | object] = queue.SimpleQueue()
        self.stopped: asyncio.Future[None] = loop.create_future()
        self.commits = 0  # groups committed (one transaction each)
        self.rows_written = 0
        # A daemon: if the loop is dropped without close(), the process can still exit. Rows it
        # had not committed then were never acknowledged either (their futures never resolved).
        self._thread = threading.Thread(target=self._run, name=f"ledger-writer:{path.name}", daemon=True)
        self._thread.start()

    def submit(self, row: LedgerRow | None) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self._loop.create_future()
        self._jobs.put(Pending(row, future))
        return future

    def stop(self) -> None:
        """Queue the end, after the rows queued before it (the thread writes them first)."""
        self._jobs.put(_STOP)

    def join(self) -> None:
        """Blocking: wait for the thread to end (after `stop`)."""
        self._thread.join()

    # --- the thread ------------------------------------------------------------

    def _run(self) -> None:
        jobs = self._jobs
        stopping = False
        keep_up = False  # the last group came under load: the next is collected, not waited to be woken for
        try:
            while not stopping:
                group: list[Pending] = []
                rows = 0
                item = self._next(keep_up)
                lingered = keep_up  # after a delay already: what is there now is the group
                while True:
                    if item is _STOP:
                        stopping = True
                        break
                    assert isinstance(item, Pending)
                    group.append(item)
                    rows += item.row is not None
                    if rows >= self._max_batch:
                        break
                    try:
                        item = jobs.get_nowait()
                    except queue.Empty:
                        if lingered or not self._others_in_flight(rows):
                            break
                        lingered = True
                        time.sleep(self._delay_s)  # the GIL is free meanwhile: the loop goes on
                        try:
                            item = jobs.get_nowait()
                        except queue.Empty:
                            break
                for start in range(0, len(group), self._max_batch):  # flush barriers are not rows: it may exceed
                    part = group[start : start + self._max_batch]
                    self._wake(_settle_group, part, self._write(part))
                keep_up = self._others_in_flight(rows)
        finally:
            self._db.close()
            self._wake(_resolve, self.stopped)

    def _next(self, keep_up: bool) -> Pending | object:
        """The next row. Under load (`keep_up`) the thread sleeps the delay and takes what came
        meanwhile: the loop's puts find nobody waiting, so they wake no thread (a futex call and a
        context switch each). When nothing came, or nothing else is in flight, it waits."""
        if keep_up:
            time.sleep(self._delay_s)
            try:
                return self._jobs.get_nowait()
            except queue.Empty:
                pass
        return self._jobs.get()

    def _others_in_flight(self, rows: int) -> bool:
        """Requests besides the group's own are being served: worth waiting for (commit_delay_s)."""
        return self._delay_s > 0 and self._busy is not None and self._busy() > rows

    def _write(self, group: list[Pending]) -> BaseException | None:
        """Commit the group's rows in one transaction; the error that failed them, if any (the
        whole group fails together: a transaction is all or nothing). A bad disk never ends the
        thread: the next group is tried afresh."""
        rows = [item.row for item in group if item.row is not None]
        if not rows:
            return None
        db = self._db
        try:
            if len(rows) <= ROWS_PER_STATEMENT:  # one statement: its own atomic transaction
                db.execute(insert_many(len(rows)), [value for row in rows for value in to_params(row)])
            else:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for start in range(0, len(rows), ROWS_PER_STATEMENT):
                        chunk = rows[start : start + ROWS_PER_STATEMENT]
                        db.execute(insert_many(len(chunk)), [value for row in chunk for value in to_params(row)])
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
        except Exception as exc:
            log.error("ledger %s: could not record %d request(s): %s", self._path, len(rows), exc)
            return exc
        self.commits += 1
        self.rows_written += len(rows)
        return None

    def _wake(self, callback: Callable[..., None], *args: object) -> None:
        """One wake-up of the event loop; none when it is gone (nobody is waiting then)."""
        with contextlib.suppress(RuntimeError):  # the loop was closed without close(): the process is ending
            self._loop.call_soon_threadsafe(callback, *args)


def _settle_group(group: list[Pending], error: BaseException | None) -> None:
    for item in group:
        if item.future.done():  # the caller gave up waiting; its row was still handled
            continue
        if error is None or item.row is None:
            item.future.set_result(None)
        else:
            item.future.set_exception(error)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
