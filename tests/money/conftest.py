"""Fixtures of the money tests: a PostgreSQL schema of its own per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.postgres import scratch_schema


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    """A DSN whose connections land in an empty schema of this test's own, dropped afterwards."""
    async with scratch_schema() as (_, dsn):
        yield dsn
