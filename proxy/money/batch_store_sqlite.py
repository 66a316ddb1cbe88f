"""The batch store in the ledger's SQLite file (`ledger.backend: sqlite`, the default): the
`BatchStore` of `proxy.money.batch_store`, on its own connection to the file, beside the ledger's
`requests` table (read, never written). `serve --workers N` shares the file: a runner's lines are
adopted by another only once its process is gone (this machine's) or its lease has lapsed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from proxy.core.batch import ACTIVE, TERMINAL, BatchRecord, FileRecord, InputLine, LineResult
from proxy.money.batch_store import (
    LEASE_S,
    Adopted,
    adopted,
    dump_batch,
    file_row,
    load_batch,
    result_json,
)
from proxy.money.batch_store_sqlite_schema import open_batch_db
from proxy.money.ledger_rows import from_nano


class SqliteBatchStore:
    """The store on its own connection to the ledger's file (WAL: the ledger's writer and this one
    take turns; neither blocks the other's readers)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path, busy_timeout_s: float = 10.0) -> SqliteBatchStore:
        return cls(await open_batch_db(path, busy_timeout_s))

    async def close(self) -> None:
        await self._db.close()

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._lock:
            return list(await self._db.execute_fetchall(sql, params))

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        found = await self._all(sql, params)
        return found[0] if found else None

    async def _write(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Run the statements in one transaction; the rows each changed. One statement is its own
        transaction (autocommit): one trip to the connection's thread, the write lock held only
        for it, so the ledger's writer (another connection to the file) hardly ever waits on it."""
        if len(statements) == 1:
            async with self._lock, self._db.execute(*statements[0]) as cursor:
                return [cursor.rowcount]
        changed = []
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    async with self._db.execute(sql, params) as cursor:
                        changed.append(cursor.rowcount)
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
        return changed

    # --- files -------------------------------------------------------------------------
    async def add_file(self, record: FileRecord, content: bytes) -> None:
        await self._write(
            [
                (
                    "INSERT INTO batch_files (id, purpose, filename, bytes, created_at, key_name, content) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    file_row(record, content),
                )
            ]
        )

    async def file(self, file_id: str) -> FileRecord | None:
        row = await self._one(
            "SELECT id, purpose, filename, bytes, created_at, key_name FROM batch_files WHERE id = ?", (file_id,)
        )
        return FileRecord(*row) if row else None

    async def file_content(self, file_id: str) -> bytes | None:
        row = await self._one("SELECT content FROM batch_files WHERE id = ?", (file_id,))
        return bytes(row[0]) if row else None

    async def delete_file(self, file_id: str) -> bool:
        (changed,) = await self._write([("DELETE FROM batch_files WHERE id = ?", (file_id,))])
        return changed > 0

    # --- batches -----------------------------------------------------------------------
    async def create_batch(self, batch: BatchRecord, lines: Sequence[InputLine]) -> None:
        statements: list[tuple[str, Sequence[Any]]] = [
            ("INSERT INTO batches (id, status, record) VALUES (?, ?, ?)", (batch.id, batch.status, dump_batch(batch)))
        ]
        statements += [
            (
                "INSERT INTO batch_lines (batch_id, line, custom_id, body, state) VALUES (?, ?, ?, ?, 'pending')",
                (batch.id, line.line, line.custom_id, orjson.dumps(line.body)),
            )
            for line in lines
        ]
        await self._write(statements)

    async def batch(self, batch_id: str) -> BatchRecord | None:
        row = await self._one("SELECT record FROM batches WHERE id = ?", (batch_id,))
        return load_batch(row[0]) if row else None

    async def batches(self, limit: int, after: str | None = None) -> list[BatchRecord]:
        """Newest first; `after`: the last id of the previous page."""
        if after is None:
            found = await self._all("SELECT record FROM batches ORDER BY id DESC LIMIT ?", (limit,))
        else:
            found = await self._all("SELECT record FROM batches WHERE id < ? ORDER BY id DESC LIMIT ?", (after, limit))
        return [load_batch(row[0]) for row in found]

    async def active_batches(self) -> list[BatchRecord]:
        marks = ", ".join("?" * len(ACTIVE))
        found = await self._all(f"SELECT record FROM batches WHERE status IN ({marks}) ORDER BY id", ACTIVE)
        return [load_batch(row[0]) for row in found]

    async def save_batch(self, batch: BatchRecord, expect: str | None = None) -> bool:
        """Write the batch; with `expect`, only if its stored status is still that one (a cancel
        from another process or request is never overwritten by a stale copy)."""
        sql, params = (
            "UPDATE batches SET status = ?, record = ? WHERE id = ?",
            [batch.status, dump_batch(batch), batch.id],
        )
        if expect is not None:
            sql += " AND status = ?"
            params.append(expect)
        (changed,) = await self._write([(sql, params)])
        return changed > 0

    # --- lines -------------------------------------------------------------------------
    async def lines(self, batch_id: str, state: str, limit: int) -> list[tuple[InputLine, str | None]]:
        """Lines in `state`, in file order, with the request id noted for each (None: none yet)."""
        found = await self._all(
            "SELECT line, custom_id, body, request_id FROM batch_lines WHERE batch_id = ? AND state = ? "
            "ORDER BY line LIMIT ?",
            (batch_id, state, limit),
        )
        return [
            (InputLine(line, custom_id, orjson.loads(body)), request_id) for line, custom_id, body, request_id in found
        ]

    async def unfinished(self, batch_id: str, states: Sequence[str]) -> bool:
        """Whether any line is in one of `states`, read in one statement: asked state by state, a line
        moving between two of them (claimed, released, adopted) could be missed by both questions."""
        marks = ", ".join("?" * len(states))
        found = await self._all(
            f"SELECT 1 FROM batch_lines WHERE batch_id = ? AND state IN ({marks}) LIMIT 1", (batch_id, *states)
        )
        return bool(found)

    async def claim_lines(self, batch_id: str, limit: int, owner: str) -> list[InputLine]:
        """Take up to `limit` pending lines, in file order, for `owner`: each is noted running under
        the request id `{batch_id}-{line}`, in one statement (a line is claimed once)."""
        found = await self._all(
            "UPDATE batch_lines SET state = 'running', request_id = batch_id || '-' || line, owner = ?, "
            "lease_until = ? WHERE batch_id = ? AND state = 'pending' AND line IN (SELECT line FROM batch_lines "
            "WHERE batch_id = ? AND state = 'pending' ORDER BY line LIMIT ?) RETURNING line, custom_id, body",
            (owner, time.time() + LEASE_S, batch_id, batch_id, limit),
        )
        return sorted((InputLine(line, custom_id, orjson.loads(body)) for line, custom_id, body in found), key=_number)

    async def renew(self, owner: str) -> int:
        """Extend the lease of every line `owner` runs (and of the batches it holds); how many lines."""
        lease = time.time() + LEASE_S
        changed = await self._write(
            [
                (
                    "UPDATE batch_lines SET lease_until = ? WHERE owner = ? AND state IN ('running', 'answered')",
                    (lease, owner),
                ),
                ("UPDATE batches SET lease_until = ? WHERE owner = ?", (lease, owner)),
            ]
        )
        return changed[0]

    async def retire(self, owner: str) -> None:
        """A runner that stopped cleanly ends its leases: what it left is adopted at once."""
        await self._write(
            [
                ("UPDATE batch_lines SET lease_until = 0 WHERE owner = ?", (owner,)),
                ("UPDATE batches SET lease_until = 0 WHERE owner = ?", (owner,)),
            ]
        )

    async def hold(self, batch_id: str, owner: str) -> bool:
        """Whether `owner` is the one runner that submits and polls this batch's OpenRouter batches:
        it held it already, or nobody did, or its holder stopped."""
        now = time.time()
        row = await self._one("SELECT owner, lease_until FROM batches WHERE id = ?", (batch_id,))
        if row is None:
            return False
        holder, lease = row
        free = holder is None or holder == owner or (lease or 0.0) < now or not _alive(holder)
        if not free:
            return False
        (changed,) = await self._write(
            [
                (
                    "UPDATE batches SET owner = ?, lease_until = ? WHERE id = ? AND owner IS ?",
                    (owner, now + LEASE_S, batch_id, holder),
                )
            ]
        )
        return changed > 0

    async def adopt(self, batch_id: str, state: str, owner: str) -> list[Adopted]:
        """Lines in `state` (running / answered) a stopped runner left behind (its process is gone,
        or its lease lapsed; or an older proxy's, with no owner), now `owner`'s."""
        now = time.time()
        others = await self._all(
            "SELECT owner, max(lease_until) FROM batch_lines WHERE batch_id = ? AND state = ? AND owner != ? "
            "GROUP BY owner",
            (batch_id, state, owner),
        )
        dead = [other for other, lease in others if (lease or 0.0) < now or not _alive(other)]
        marks = ", ".join("?" * len(dead))
        found = await self._all(
            "UPDATE batch_lines SET owner = ?, lease_until = ? WHERE batch_id = ? AND state = ? "
            f"AND (owner IS NULL OR owner IN ({marks})) RETURNING line, custom_id, body, request_id, result",
            (owner, now + LEASE_S, batch_id, state, *dead),
        )
        return adopted(found)

    async def release_line(self, batch_id: str, line: int) -> None:
        """A line that was not sent after all (refused by the budget before any upstream call)."""
        await self._write(
            [
                (
                    "UPDATE batch_lines SET state = 'pending', request_id = NULL, owner = NULL "
                    "WHERE batch_id = ? AND line = ?",
                    (batch_id, line),
                )
            ]
        )

    async def mark_submitted(
        self, batch_id: str, lines: Sequence[int], upstream_batch: str, state: str = "submitted"
    ) -> None:
        """Lines in an upstream batch (`submitted`), or about to be sent in one (`submitting`,
        `upstream_batch` then says where and when), in one statement."""
        marks = ", ".join("?" * len(lines))
        await self._write(
            [
                (
                    f"UPDATE batch_lines SET state = ?, upstream_batch = ? WHERE batch_id = ? AND line IN ({marks})",
                    (state, upstream_batch, batch_id, *lines),
                )
            ]
        )

    async def submitted(self, batch_id: str, state: str = "submitted") -> dict[str, list[InputLine]]:
        found = await self._all(
            "SELECT upstream_batch, line, custom_id, body FROM batch_lines "
            "WHERE batch_id = ? AND state = ? ORDER BY line",
            (batch_id, state),
        )
        groups: dict[str, list[InputLine]] = {}
        for upstream, line, custom_id, body in found:
            groups.setdefault(upstream, []).append(InputLine(line, custom_id, orjson.loads(body)))
        return groups

    async def known_upstream_batches(self) -> set[str]:
        """Every upstream batch some line was submitted in (`upstream:id`)."""
        found = await self._all("SELECT DISTINCT upstream_batch FROM batch_lines WHERE state IN ('submitted', 'done')")
        return {row[0] for row in found if row[0]}

    async def answer_line(self, batch_id: str, line: int, result: LineResult) -> None:
        """Keep a line's answer before it is booked: a crash between the two leaves it `answered`,
        and the next start books it (unless its ledger row was written) instead of losing it. Only
        a running line: one adopted meanwhile (reported interrupted) stays as it is."""
        await self._write(
            [
                (
                    "UPDATE batch_lines SET state = 'answered', result = ? "
                    "WHERE batch_id = ? AND line = ? AND state = 'running'",
                    (orjson.dumps(result_json(result)), batch_id, line),
                )
            ]
        )

    async def finish_lines(self, batch_id: str, done: Sequence[tuple[int, LineResult]]) -> None:
        """Keep the lines' results and count them on the batch, in one transaction. A line already
        done is left as it is (and not counted again)."""
        if not done:
            return
        statements = [
            (
                "UPDATE batch_lines SET state = 'done', result = ?, succeeded = ?, "
                "request_id = coalesce(?, request_id) WHERE batch_id = ? AND line = ? AND state != 'done'",
                (orjson.dumps(result_json(result)), int(result.succeeded), result.request_id, batch_id, line),
            )
            for line, result in done
        ]
        await self._write(statements)

    async def results(self, batch_id: str) -> list[tuple[int, LineResult]]:
        found = await self._all(
            "SELECT line, result FROM batch_lines WHERE batch_id = ? AND state = 'done' ORDER BY line", (batch_id,)
        )
        return [(line, LineResult(**orjson.loads(result))) for line, result in found]

    async def line_counts(self, batch_id: str) -> tuple[int, int, int]:
        """(lines done, of which succeeded, lines not done)."""
        row = await self._one(
            "SELECT sum(state = 'done'), sum(coalesce(succeeded, 0)), sum(state != 'done') FROM batch_lines "
            "WHERE batch_id = ?",
            (batch_id,),
        )
        return (row[0] or 0, row[1] or 0, row[2] or 0) if row else (0, 0, 0)

    async def prune(self, before: float) -> int:
        """Forget batches that ended and were created before `before` (their lines too), and files
        uploaded before it that no running batch reads; how many batches went."""
        terminal = ", ".join("?" * len(TERMINAL))
        old = f"SELECT id FROM batches WHERE status IN ({terminal}) AND json_extract(record, '$.created_at') < ?"
        running = f"SELECT json_extract(record, '$.input_file_id') FROM batches WHERE status NOT IN ({terminal})"
        changed = await self._write(
            [
                (f"DELETE FROM batch_lines WHERE batch_id IN ({old})", (*TERMINAL, before)),
                (f"DELETE FROM batches WHERE id IN ({old})", (*TERMINAL, before)),
                (f"DELETE FROM batch_files WHERE created_at < ? AND id NOT IN ({running})", (before, *TERMINAL)),
            ]
        )
        return changed[1]

    # --- what the ledger says ----------------------------------------------------------
    async def billed(self, request_ids: Iterable[str]) -> set[str]:
        ids = list(request_ids)
        if not ids:
            return set()
        marks = ", ".join("?" * len(ids))
        found = await self._all(f"SELECT request_id FROM requests WHERE request_id IN ({marks})", ids)
        return {row[0] for row in found}

    async def batch_cost(self, batch_id: str) -> float:
        row = await self._one("SELECT sum(cost_nusd) FROM requests WHERE batch_id = ?", (batch_id,))
        return from_nano(row[0] if row else None)

    async def batch_spend_since(self, start: float) -> float:
        row = await self._one("SELECT sum(cost_nusd) FROM requests WHERE batch_id IS NOT NULL AND ts >= ?", (start,))
        return from_nano(row[0] if row else None)


def _alive(owner: str) -> bool:
    """Whether a runner's process may still run: False only for a process of this machine that is
    gone (another machine's, or one this process cannot see, counts as alive: its lease decides)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _number(line: InputLine) -> int:
    return line.line
