"""Batch storage: uploaded files, batches and each line's progress, in the ledger's database: its
SQLite file (`proxy.money.batch_store_sqlite`) or PostgreSQL (`proxy.money.batch_store_pg`);
`open_batch_store` picks by `ledger.backend`.

Behind a small interface (`BatchStore`). A line run by the proxy moves pending -> running (claimed
by one runner, its owner, and its request id noted, in one statement, before it is sent)
-> answered (its answer kept) -> done (once its ledger row is written); a line sent in an OpenRouter
batch moves pending -> submitting (noted before the upstream batch is created) -> submitted (its id
noted) -> done. The ledger's own table is read (never written) to know which lines were booked.

Ownership: a runner claims the lines it runs under its own id (`host:pid:token`), with a lease it
renews while it lives. Lines `running` or `answered` whose owner died are adopted by another runner
(`adopt`): on PostgreSQL once their lease has lapsed (any number of replicas share the database);
on SQLite (one machine: `serve --workers N` shares the file) as soon as the owner's process is gone,
or its lease has lapsed, so a restart after a crash recovers at once and a live worker's lines are
never taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import orjson

from proxy.config import Config
from proxy.core.batch import BatchRecord, FileRecord, InputLine, LineError, LineResult
from proxy.money.ledger_api import postgres_dsn

LEASE_S = 30.0  # a claimed line's lease: its owner renews it every third of this


class Adopted(NamedTuple):
    """A line taken over from a runner that died: its request id and, once answered, its answer."""

    line: InputLine
    request_id: str | None
    result: LineResult | None


class BatchStore(Protocol):
    async def add_file(self, record: FileRecord, content: bytes) -> None: ...
    async def file(self, file_id: str) -> FileRecord | None: ...
    async def file_content(self, file_id: str) -> bytes | None: ...
    async def delete_file(self, file_id: str) -> bool: ...
    async def create_batch(self, batch: BatchRecord, lines: Sequence[InputLine]) -> None: ...
    async def batch(self, batch_id: str) -> BatchRecord | None: ...
    async def batches(self, limit: int, after: str | None = None) -> list[BatchRecord]: ...
    async def active_batches(self) -> list[BatchRecord]: ...
    async def save_batch(self, batch: BatchRecord, expect: str | None = None) -> bool: ...
    async def lines(self, batch_id: str, state: str, limit: int) -> list[tuple[InputLine, str | None]]: ...
    async def unfinished(self, batch_id: str, states: Sequence[str]) -> bool: ...
    async def claim_lines(self, batch_id: str, limit: int, owner: str) -> list[InputLine]: ...
    async def renew(self, owner: str) -> int: ...
    async def adopt(self, batch_id: str, state: str, owner: str) -> list[Adopted]: ...
    async def hold(self, batch_id: str, owner: str) -> bool: ...
    async def retire(self, owner: str) -> None: ...
    async def release_line(self, batch_id: str, line: int) -> None: ...
    async def line_counts(self, batch_id: str) -> tuple[int, int, int]: ...
    async def mark_submitted(
        self, batch_id: str, lines: Sequence[int], upstream_batch: str, state: str = "submitted"
    ) -> None: ...
    async def submitted(self, batch_id: str, state: str = "submitted") -> dict[str, list[InputLine]]: ...
    async def known_upstream_batches(self) -> set[str]: ...
    async def answer_line(self, batch_id: str, line: int, result: LineResult) -> None: ...
    async def finish_lines(self, batch_id: str, done: Sequence[tuple[int, LineResult]]) -> None: ...
    async def results(self, batch_id: str) -> list[tuple[int, LineResult]]: ...
    async def billed(self, request_ids: Iterable[str]) -> set[str]: ...
    async def batch_cost(self, batch_id: str) -> float: ...
    async def batch_spend_since(self, start: float) -> float: ...
    async def prune(self, before: float) -> int: ...
    async def close(self) -> None: ...


async def open_batch_store(config: Config, env: Mapping[str, str], path: Path | None = None) -> BatchStore:
    """The store in the database of the ledger `config.ledger` describes (`path` overrides
    `ledger.path` for sqlite). Raises LedgerUnavailable (postgres) or OSError / sqlite3.Error."""
    if config.ledger.backend == "postgres":
        from proxy.money.batch_store_pg import PgBatchStore

        return await PgBatchStore.open(postgres_dsn(config, env))
    from proxy.money.batch_store_sqlite import SqliteBatchStore

    return await SqliteBatchStore.open(path or Path(config.ledger.path))


def adopted(found: Iterable[Sequence[Any]]) -> list[Adopted]:
    """Rows of (line, custom_id, body, request_id, result) as Adopted, in file order."""
    return sorted(
        (
            Adopted(
                InputLine(line, custom_id, orjson.loads(body)),
                request_id,
                LineResult(**orjson.loads(result)) if result is not None else None,
            )
            for line, custom_id, body, request_id, result in found
        ),
        key=lambda taken: taken.line.line,
    )


def file_row(record: FileRecord, content: bytes) -> tuple[Any, ...]:
    """A file's columns: id, purpose, filename, bytes, created_at, key_name, content."""
    return (record.id, record.purpose, record.filename, record.bytes, record.created_at, record.key_name, content)


def result_json(result: LineResult) -> dict[str, Any]:
    return {
        "custom_id": result.custom_id,
        "request_id": result.request_id,
        "status_code": result.status_code,
        "body": result.body,
        "error_code": result.error_code,
        "error_message": result.error_message,
        "extra": result.extra,
    }


def dump_batch(batch: BatchRecord) -> bytes:
    fields = {name: getattr(batch, name) for name in BatchRecord.__slots__}
    fields["errors"] = [error.to_object() for error in batch.errors]
    fields["metadata"] = dict(batch.metadata) if batch.metadata is not None else None
    return orjson.dumps(fields)


def load_batch(raw: bytes) -> BatchRecord:
    fields = orjson.loads(raw)
    fields["errors"] = tuple(
        LineError(e["line"], e["code"], e["message"], e.get("param")) for e in fields.get("errors") or ()
    )
    return BatchRecord(**fields)
