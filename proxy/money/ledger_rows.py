"""The ledger's rows and their storage format: the dataclasses, the SQLite schema and its
migrations, and the conversions between them (money as INTEGER nano-dollars).

Pure: no connection here. `proxy.ledger` owns the connection and the writer.
"""

from __future__ import annotations

import functools
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields

from proxy.core.reconcile import ESTIMATED_SOURCES as ESTIMATED

SCHEMA_VERSION = 6
COST_SOURCES = frozenset({"upstream", "catalogue", "override", "estimate", "cached", "reserved", "reconciled"})
# Rows whose cost is not the upstream's own figure yet: reconciliation looks them up.
ESTIMATED_SOURCES = tuple(sorted(ESTIMATED))
NANO_PER_USD = 1_000_000_000

SYNCHRONOUS_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
GROUP_COLUMNS = {"model": "model", "virtual": "virtual_model", "key": "key_name", "api": "api", "batch": "batch_id"}

SCHEMA_SQL = (
    """
CREATE TABLE IF NOT EXISTS requests (
    id                 INTEGER PRIMARY KEY,
    ts                 REAL    NOT NULL,   -- epoch seconds
    request_id         TEXT    NOT NULL,
    key_name           TEXT,
    requested_model    TEXT    NOT NULL,
    virtual_model      TEXT,
    model              TEXT,
    upstream           TEXT,
    provider           TEXT,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    cost_nusd          INTEGER NOT NULL,   -- nano-dollars
    cost_source        TEXT    NOT NULL,
    baseline_cost_nusd INTEGER NOT NULL,   -- nano-dollars
    latency_s          REAL    NOT NULL,
    ttft_s             REAL,
    status             INTEGER NOT NULL,
    attempts           INTEGER NOT NULL,
    streamed           INTEGER NOT NULL,
    generation_id      TEXT,
    cached             INTEGER NOT NULL,
    error              TEXT,
    saved_nusd         INTEGER NOT NULL DEFAULT 0,  -- what a cache hit saved, nano-dollars
    cached_tokens      INTEGER NOT NULL DEFAULT 0,  -- of prompt_tokens: read from the prompt cache
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,  -- of prompt_tokens: written to it
    estimate_nusd      INTEGER,                     -- a reconciled row: the estimate it was booked at first
    flags              TEXT,                        -- e.g. clamped:cost_usd (see proxy.core.bounds)
    reconcile_tries    INTEGER NOT NULL DEFAULT 0,  -- lookups of an estimated cost made so far
    api                TEXT    NOT NULL DEFAULT 'chat',  -- chat | responses | messages | embeddings | completions
    batch_id           TEXT,                        -- a batch line's batch (proxy.batch), else NULL
    custom_id          TEXT                         -- and its custom_id
);
-- A covering index: period spend (per key too) and pruning never touch the table. Every index
-- is a page written per commit: a (key_name, ts) twin of it served no query and went in version 6.
CREATE INDEX IF NOT EXISTS requests_ts_key_cost ON requests (ts, key_name, cost_nusd);
CREATE INDEX IF NOT EXISTS requests_request_id ON requests (request_id);
CREATE INDEX IF NOT EXISTS requests_batch ON requests (batch_id) WHERE batch_id IS NOT NULL;
"""
    + """
-- The rows reconciliation still has to look up: a handful, so a partial index finds them at start-up.
CREATE INDEX IF NOT EXISTS requests_unreconciled ON requests (ts)
    WHERE cost_source IN ('estimate', 'reserved') AND generation_id IS NOT NULL;
"""
)

COLUMNS = (
    "ts",
    "request_id",
    "key_name",
    "requested_model",
    "virtual_model",
    "model",
    "upstream",
    "provider",
    "prompt_tokens",
    "completion_tokens",
    "cost_nusd",
    "cost_source",
    "baseline_cost_nusd",
    "latency_s",
    "ttft_s",
    "status",
    "attempts",
    "streamed",
    "generation_id",
    "cached",
    "error",
    "saved_nusd",
    "cached_tokens",
    "cache_write_tokens",
    "estimate_nusd",
    "flags",
    "reconcile_tries",
    "api",
    "batch_id",
    "custom_id",
)
# Schema migrations: version -> the statements that take a file from it to the next version.
MIGRATIONS = {
    1: "ALTER TABLE requests ADD COLUMN saved_nusd INTEGER NOT NULL DEFAULT 0;",
    2: """
ALTER TABLE requests ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN estimate_nusd INTEGER;
ALTER TABLE requests ADD COLUMN flags TEXT;
ALTER TABLE requests ADD COLUMN reconcile_tries INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS requests_unreconciled ON requests (ts)
    WHERE cost_source IN ('estimate', 'reserved') AND generation_id IS NOT NULL;
""",
    3: "ALTER TABLE requests ADD COLUMN api TEXT NOT NULL DEFAULT 'chat';",
    4: """
ALTER TABLE requests ADD COLUMN batch_id TEXT;
ALTER TABLE requests ADD COLUMN custom_id TEXT;
CREATE INDEX IF NOT EXISTS requests_batch ON requests (batch_id) WHERE batch_id IS NOT NULL;
""",
    # No query reads by key first: (ts, key_name, cost_nusd) answers them all; one page less per commit.
    5: "DROP INDEX IF EXISTS requests_key_ts_cost;",
}
INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
# SQLite caps the host parameters of one statement (32766 since 3.32, 999 before).
ROWS_PER_STATEMENT = (32766 if sqlite3.sqlite_version_info >= (3, 32) else 999) // len(COLUMNS)


@functools.lru_cache(maxsize=64)
def insert_many(count: int) -> str:
    one = f"({', '.join('?' * len(COLUMNS))})"
    return f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES {', '.join([one] * count)}"


SELECT_ROWS = f"SELECT {', '.join(COLUMNS)} FROM requests WHERE ts >= ? AND ts < ? ORDER BY ts, id"


class LedgerError(RuntimeError):
    """Base of the ledger's own errors."""


class LedgerClosed(LedgerError):
    """The ledger was closed (or its writer stopped); the row was not recorded."""


class LedgerSchemaError(LedgerError):
    """The file was written by a newer proxy whose schema this one does not know."""


@dataclass(frozen=True, slots=True)
class LedgerRow:
    ts: float
    request_id: str
    key_name: str | None
    requested_model: str
    virtual_model: str | None
    model: str | None
    upstream: str | None
    provider: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cost_source: str
    baseline_cost_usd: float
    latency_s: float
    ttft_s: float | None
    status: int
    attempts: int
    streamed: bool
    generation_id: str | None = None
    cached: bool = False
    error: str | None = None
    saved_usd: float = 0.0  # a cache hit: what the answer cost when it was first bought
    cached_tokens: int = 0  # of prompt_tokens, read from the provider's prompt cache
    cache_write_tokens: int = 0  # of prompt_tokens, written to it
    estimate_usd: float | None = None  # a reconciled row: the estimate it was first booked at
    flags: str | None = None  # figures clamped when the row was built
    reconcile_tries: int = 0
    api: str = "chat"  # the client API the request came in by
    batch_id: str | None = None  # a batch line: its batch and custom_id
    custom_id: str | None = None


@dataclass(frozen=True, slots=True)
class Reconciled:
    """The upstream's own figures for one generation, replacing a row's estimate."""

    cost_usd: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    baseline_cost_usd: float


@dataclass(frozen=True, slots=True)
class SummaryRow:
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    avg_cost_usd: float
    max_cost_usd: float
    baseline_cost_usd: float
    savings_usd: float
    savings_pct: float | None  # 0-100 of the baseline; None when there is no baseline cost
    cache_hits: int = 0  # requests answered from the response cache
    cache_saved_usd: float = 0.0  # what those answers cost when they were bought


# The most one row can hold in nano-dollars without overflowing SQLite's 64-bit INTEGER, with room
# to sum a year of such rows; rows are clamped far below it (proxy.core.bounds.MAX_ROW_USD).
MAX_USD = 1e6


def to_nano(usd: float) -> int:
    return round(usd * NANO_PER_USD)


def from_nano(nano: int | None) -> float:
    return (nano or 0) / NANO_PER_USD


def check_row(row: LedgerRow) -> None:
    # Rejected here, at the caller, because one bad row inside a batch would fail
    # the whole transaction and every other caller in it (a NaN even becomes NULL
    # in SQLite and trips NOT NULL).
    if row.cost_source not in COST_SOURCES:
        raise ValueError(
            f"ledger row {row.request_id}: cost_source {row.cost_source!r} is not one of {sorted(COST_SOURCES)}"
        )
    for name in ("ts", "cost_usd", "baseline_cost_usd", "latency_s", "saved_usd"):
        value = getattr(row, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"ledger row {row.request_id}: {name} must be a finite number >= 0, got {value!r}")
    for name in ("cost_usd", "baseline_cost_usd", "saved_usd"):
        if getattr(row, name) > MAX_USD:  # past it, nano-dollars overflow SQLite's INTEGER
            raise ValueError(f"ledger row {row.request_id}: {name} is past ${MAX_USD:g}: {getattr(row, name)!r}")


def to_params(row: LedgerRow) -> tuple:
    return (
        row.ts,
        row.request_id,
        row.key_name,
        row.requested_model,
        row.virtual_model,
        row.model,
        row.upstream,
        row.provider,
        row.prompt_tokens,
        row.completion_tokens,
        to_nano(row.cost_usd),
        row.cost_source,
        to_nano(row.baseline_cost_usd),
        row.latency_s,
        row.ttft_s,
        row.status,
        row.attempts,
        int(row.streamed),
        row.generation_id,
        int(row.cached),
        row.error,
        to_nano(row.saved_usd),
        row.cached_tokens,
        row.cache_write_tokens,
        None if row.estimate_usd is None else to_nano(row.estimate_usd),
        row.flags,
        row.reconcile_tries,
        row.api,
        row.batch_id,
        row.custom_id,
    )


def from_record(values: Sequence) -> LedgerRow:
    by_name = dict(zip(COLUMNS, values))
    by_name["cost_usd"] = from_nano(by_name.pop("cost_nusd"))
    by_name["baseline_cost_usd"] = from_nano(by_name.pop("baseline_cost_nusd"))
    by_name["streamed"] = bool(by_name["streamed"])
    by_name["cached"] = bool(by_name["cached"])
    by_name["saved_usd"] = from_nano(by_name.pop("saved_nusd"))
    estimate = by_name.pop("estimate_nusd")
    by_name["estimate_usd"] = None if estimate is None else from_nano(estimate)
    return LedgerRow(**{f.name: by_name[f.name] for f in fields(LedgerRow)})


def summary_row(
    group: str,
    requests: int,
    prompt: int | None,
    completion: int | None,
    cost: int | None,
    largest: int | None,
    baseline: int | None,
    hits: int | None = 0,
    saved: int | None = 0,
) -> SummaryRow:
    cost_usd, baseline_usd = from_nano(cost), from_nano(baseline)
    savings_nusd = (baseline or 0) - (cost or 0)
    return SummaryRow(
        group=group,
        requests=requests,
        prompt_tokens=prompt or 0,
        completion_tokens=completion or 0,
        cost_usd=cost_usd,
        avg_cost_usd=cost_usd / requests if requests else 0.0,
        max_cost_usd=from_nano(largest),
        baseline_cost_usd=baseline_usd,
        savings_usd=from_nano(savings_nusd),
        savings_pct=100.0 * savings_nusd / baseline if baseline else None,
        cache_hits=hits or 0,
        cache_saved_usd=from_nano(saved),
    )
