"""A PostgreSQL schema of its own for each test, on the server every machine of the project runs
(127.0.0.1:5432, trust, user postgres, database test), dropped afterwards."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

SERVER_DSN = os.environ.get("ORPROXY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def in_schema(schema: str) -> str:
    """The DSN whose connections use `schema` (asyncpg passes unknown DSN parameters as settings)."""
    return f"{SERVER_DSN}{'&' if '?' in SERVER_DSN else '?'}search_path={schema}"


@asynccontextmanager
async def scratch_schema() -> AsyncIterator[tuple[str, str]]:
    """Yield (schema, dsn) for a new, empty schema; drop it and everything in it afterwards."""
    schema = f"orproxy_test_{secrets.token_hex(6)}"
    try:
        admin = await asyncpg.connect(SERVER_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise AssertionError(
            f"the PostgreSQL tests need a server at {SERVER_DSN} (set ORPROXY_TEST_POSTGRES to another): {exc}"
        ) from exc
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield schema, in_schema(schema)
        finally:
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await admin.close()
