"""What every ledger backend offers, and the one place that opens the configured one.

`ledger.backend: sqlite` (the default) is one file for one process (`proxy.money.ledger`);
`ledger.backend: postgres` is one database for every worker and replica (`proxy.money.ledger_pg`).
Every reader (the proxy's spend seeding, `/admin/spend`, reconciliation, pruning, `orproxy report`,
`orproxy explain`, `simulate --from-ledger`) holds a `LedgerStore`, never a backend's class.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from proxy.config import Config
from proxy.money.ledger_rows import LedgerRow, Reconciled, SummaryRow

GroupBy = Literal["model", "virtual", "key", "api", "batch"]


class LedgerStore(Protocol):
    """Spend records, one row per client request. `record()` returns once the row is committed."""

    @property
    def where(self) -> str: ...  # for messages: the file, or the database (no password)

    async def record(self, row: LedgerRow) -> None: ...

    def record_nowait(self, row: LedgerRow) -> asyncio.Future[None]: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    async def spend_between(self, start: float, end: float | None = None, *, key_name: str | None = None) -> float: ...

    async def spend_by_key_between(self, start: float, end: float | None = None) -> dict[str, float]: ...

    async def summary(self, start: float, end: float, by: GroupBy) -> list[SummaryRow]: ...

    async def totals(self, start: float, end: float) -> SummaryRow: ...

    async def rows(self, start: float | None = None, end: float | None = None) -> list[LedgerRow]: ...

    async def unreconciled(self, since: float, upstreams: Sequence[str], max_tries: int) -> list[LedgerRow]: ...

    async def reconcile(self, request_id: str, generation_id: str, correction: Reconciled) -> bool: ...

    async def note_reconcile_try(self, request_id: str, generation_id: str) -> bool: ...

    async def prune(self, now: float | None = None, *, retention_days: int | None = None) -> int: ...


class LedgerUnavailable(RuntimeError):
    """The configured ledger cannot be reached or opened; the message names the config key to fix."""


def redacted(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def postgres_dsn(config: Config, env: Mapping[str, str]) -> str:
    """`ledger.dsn`, or the value of the variable `ledger.dsn_env` names."""
    settings = config.ledger
    if settings.dsn is not None:
        return settings.dsn
    assert settings.dsn_env is not None  # the schema requires one of them for postgres
    dsn = env.get(settings.dsn_env, "")
    if not dsn:
        raise LedgerUnavailable(
            f"ledger.dsn_env names {settings.dsn_env}, which is not set: export it "
            "(postgresql://user@host:5432/db) or set ledger.dsn"
        )
    return dsn


def on_file(config: Config, path: str | Path) -> Config:
    """`config` with its ledger the SQLite file at `path` (the demo's ledger, a `--ledger FILE`)."""
    ledger = config.ledger.model_copy(update={"backend": "sqlite", "path": str(path), "dsn": None, "dsn_env": None})
    return config.model_copy(update={"ledger": ledger})


def ledger_exists(config: Config, path: Path | None = None) -> bool:
    """Whether there is something to read: a postgres ledger always is (its table is made on open)."""
    return config.ledger.backend == "postgres" or (path or Path(config.ledger.path)).exists()


async def open_ledger(
    config: Config,
    env: Mapping[str, str],
    *,
    path: Path | None = None,
    clock: Callable[[], float] = time.time,
    prune: bool = True,
    busy: Callable[[], int] | None = None,
) -> LedgerStore:
    """Open the ledger `config.ledger` describes (`path` overrides `ledger.path` for sqlite).
    Tools that only read pass prune=False. `busy`: how many requests the process is serving (the
    sqlite writer's group commit waits `ledger.commit_delay_ms` for them only when there are
    others). Raises LedgerUnavailable naming the key to fix."""
    settings = config.ledger
    if settings.backend == "postgres":
        from proxy.money.ledger_pg import PgLedger

        return await PgLedger.open(
            postgres_dsn(config, env), retention_days=settings.retention_days, clock=clock, prune=prune
        )
    import sqlite3

    from proxy.money.ledger import Ledger

    where = path or Path(settings.path)
    try:
        return await Ledger.open(
            where,
            retention_days=settings.retention_days,
            synchronous=settings.synchronous,
            clock=clock,
            prune=prune,
            commit_delay_s=settings.commit_delay_ms / 1000.0,
            busy=busy,
        )
    except (OSError, sqlite3.Error) as exc:
        raise LedgerUnavailable(
            f"cannot open the ledger at {where} (ledger.path): {exc}; "
            "check that its directory exists or can be created, and is writable"
        ) from exc
