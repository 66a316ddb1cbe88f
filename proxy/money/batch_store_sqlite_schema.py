"""The SQLite batch store's tables, beside the ledger's in its file, and opening the file for them:
its own connection (WAL, a busy timeout), the tables made if missing, and the columns added since
they were first shipped added to a file an older proxy made.
"""

from __future__ import annotations

from pathlib import Path

import aiosqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_files (
    id         TEXT PRIMARY KEY,
    purpose    TEXT    NOT NULL,
    filename   TEXT    NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    key_name   TEXT,
    content    BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id     TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    record BLOB NOT NULL,             -- the BatchRecord as JSON
    owner       TEXT,                 -- the runner that submits and polls its OpenRouter batches
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id       TEXT    NOT NULL,
    line           INTEGER NOT NULL,  -- 1-based line of the input file
    custom_id      TEXT    NOT NULL,
    body           BLOB    NOT NULL,
    state          TEXT    NOT NULL,  -- pending | running | answered | submitting | submitted | done
    request_id     TEXT,              -- the ledger row's request id, noted before the line is sent
    upstream_batch TEXT,              -- the OpenRouter batch it was submitted in
    result         BLOB,              -- LineResult as JSON, once done
    succeeded      INTEGER,
    owner          TEXT,              -- the runner that claimed it (running / answered)
    lease_until    REAL,              -- epoch seconds; renewed by its owner while it lives
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX IF NOT EXISTS batch_lines_state ON batch_lines (batch_id, state);
"""


# Columns added since the tables were first shipped (a file made by an older proxy gets them on open).
ADDED_COLUMNS = (("owner", "TEXT"), ("lease_until", "REAL"))  # to batch_lines and batches


async def open_batch_db(path: str | Path, busy_timeout_s: float) -> aiosqlite.Connection:
    """A connection to the file at `path` (made if missing) with the batch tables in it, up to date."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.executescript(SCHEMA)
        for table in ("batch_lines", "batches"):
            have = {row[1] for row in await db.execute_fetchall(f"PRAGMA table_info({table})")}
            for name, kind in ADDED_COLUMNS:
                if name not in have:
                    await db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    except BaseException:
        await db.close()
        raise
    return db
