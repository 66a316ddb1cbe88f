"""The writing side both ledgers share (SQLite's, PostgreSQL's): a row is checked at the caller
and queued on the ledger's writer (a thread, a task), whose commit resolves the row's future;
`flush` and `close` wait on it. Each ledger says when it takes rows, how it stops taking them and
how it ends (`_taking`, `_stopped`, `_stop_taking`, `_finish`)."""

from __future__ import annotations

import asyncio
from typing import Protocol

from proxy.money.ledger_rows import LedgerClosed, LedgerRow, check_row


class QueueWriter(Protocol):
    commits: int  # groups committed (one transaction each)
    rows_written: int

    def submit(self, row: LedgerRow | None) -> asyncio.Future[None]: ...


class QueuedLedger:
    _writer: QueueWriter
    _shutdown: asyncio.Task[None] | None  # close()'s work, once begun

    @property
    def where(self) -> str:
        raise NotImplementedError

    async def record(self, row: LedgerRow) -> None:
        """Return once `row` is committed; raise LedgerClosed after close()."""
        await self.record_nowait(row)

    def record_nowait(self, row: LedgerRow) -> asyncio.Future[None]:
        """Queue `row` and return the future its commit resolves. Cancelling that future does not
        withdraw the row: a client that went away still costs money."""
        check_row(row)
        return self._enqueue(row)

    async def flush(self) -> None:
        """Wait until everything queued before this call is settled (committed, or failed)."""
        if self._stopped():
            if self._shutdown is not None:
                await asyncio.shield(self._shutdown)
            return
        await self._enqueue(None)

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the connections. Idempotent."""
        if self._shutdown is None:
            self._stop_taking()
            self._shutdown = asyncio.create_task(self._finish())
        await asyncio.shield(self._shutdown)

    @property
    def commits(self) -> int:
        """Groups committed (one transaction each); tests and metrics read it."""
        return self._writer.commits

    @property
    def rows_written(self) -> int:
        return self._writer.rows_written

    def _enqueue(self, row: LedgerRow | None) -> asyncio.Future[None]:
        if not self._taking():
            raise LedgerClosed(
                f"ledger {self.where} is closed; request {row.request_id if row else '(flush)'} was not recorded"
            )
        return self._writer.submit(row)

    # --- what each ledger says ----------------------------------------------------

    def _taking(self) -> bool:
        """Rows are taken (not closed, and the writer still runs)."""
        raise NotImplementedError

    def _stopped(self) -> bool:
        """close() has begun, or the writer has ended: a flush has nothing to wait for but that."""
        raise NotImplementedError

    def _stop_taking(self) -> None:
        """close()'s first step: take no more rows, tell the writer to end after what is queued."""
        raise NotImplementedError

    async def _finish(self) -> None:
        """close()'s end: wait for the writer, close the connections."""
        raise NotImplementedError
