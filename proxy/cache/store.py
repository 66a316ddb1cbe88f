"""The response cache: exact-match answers for repeatable requests, kept in SQLite.

How the request path uses it (the caller owns every decision about HTTP):

    if policy.enabled and wants_cache(body, request.headers.get("X-Proxy-Cache")):
        key = cache_key(body, plan_chain)             # plan_chain: ["model@upstream", ...], in order
        answer = await cache.get(key)                 # counts a hit or a miss
        if answer is not None:                        # costs nothing: ledger row cached=True, cost 0,
            ...                                       # cost_source "cached"; answer.cost_usd = saved
            return json(answer.completion) or stream(replay_as_sse(answer))
        ... call upstream; on HTTP 200 with `choices`:
        await cache.put(key, CachedAnswer(completion, model, upstream, cost, prompt, completion, now))

- `wants_cache` and `cache_key` are pure (`proxy.cache.policy`). The header wins (`X-Proxy-Cache: on|off`, any
  case); without it, `temperature: 0` (0 or 0.0, never `false`) turns the cache on.
- The key is the sha256 of the request minus the fields that cannot change the answer
  (`stream`, `stream_options`, `user`, `metadata`, `model`, ...), keys sorted at every
  depth, plus the resolved chain. `model` is left out because the chain stands for it: two
  virtual names resolving to the same chain share entries, and a config edit that changes
  the chain changes the key. A streamed and a non-streamed request share one entry; a
  streamed hit is replayed as SSE by `proxy.cache.replay.replay_as_sse`.
- Only answers are cached, never errors: `put` refuses anything without `choices`, with an
  `error` key or a choice that finished with "error", as well as anything over
  `max_entry_bytes`. It returns whether it stored the entry.
- Expiry is decided when reading (`created_at + ttl_s`), so a TTL changed in the config
  applies to entries already stored; `purge_expired` (also run on open) frees their space.
- Size is bounded by `max_entries`, evicting the least recently used. Marking an entry used
  would cost a write per hit, so a hit only notes the time in memory, and only if the row
  was not marked in the last minute; the notes are written in one transaction before an
  eviction, once `_TOUCH_BATCH` have piled up, and on close. LRU order is therefore exact to
  about a minute, which is plenty for entries that live a day.
- The cache is an optimisation, so it never fails a request: a SQLite error in `get`/`put`
  is logged and becomes a miss / a skipped store, and after `close()` `get` misses and
  `put` does nothing (requests finishing during shutdown are unaffected). The entry count
  is kept in memory, so one process should own the file.
- The file (`CacheFile`) is state; the policy comes from the config snapshot. A
  `ResponseCache` is the file seen through one snapshot's `CachePolicy`; on a reload,
  `await cache.with_policy(new_policy)` gives the next snapshot its view (a smaller
  `max_entries` evicts at once), without reopening. A path of ":memory:" gives a
  process-local cache (tests, or a deployment without a disk).
- `hits`/`misses` count `get` results (for `orproxy_cache_hits_total` /
  `orproxy_cache_misses_total`); `entries` is the current number of entries.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiosqlite
import orjson

from proxy.cache.policy import CachedAnswer, CachePolicy, decode_answer, storable

log = logging.getLogger("orproxy.cache")

SCHEMA_VERSION = 1
_TOUCH_EVERY_S = 60.0  # a hit re-marks its row at most this often
_TOUCH_BATCH = 256  # pending marks written together once this many have piled up

# What a failing store raises: SQLite's errors, and aiosqlite's ValueError for a connection
# closed under a request that was already inside get/put during shutdown.
_STORE_ERRORS = (sqlite3.Error, ValueError)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key        TEXT    PRIMARY KEY,    -- cache_key(): sha256 hex
    created_at REAL    NOT NULL,       -- epoch seconds when stored; expiry is created_at + ttl_s
    last_used  REAL    NOT NULL,       -- epoch seconds of the last (noted) hit, for LRU eviction
    size       INTEGER NOT NULL,       -- bytes of payload
    payload    BLOB    NOT NULL        -- orjson of the CachedAnswer
);
CREATE INDEX IF NOT EXISTS responses_last_used ON responses (last_used);
CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at);
"""


class CacheSchemaError(RuntimeError):
    """The file was written by a newer proxy whose cache schema this one does not know."""


# --- storage ----------------------------------------------------------------


class CacheFile:
    """Answers in one SQLite file: the state. Every call that depends on the config takes the
    policy of the caller's snapshot. Build with `await CacheFile.open(path)`, end with `close()`."""

    def __init__(self, db: aiosqlite.Connection, path: Path, clock: Callable[[], float], entries: int) -> None:
        self._db = db
        self._path = path
        self._clock = clock
        self._entries = entries
        # Writes are serialised so the in-memory entry count and eviction stay exact;
        # reads go straight to the connection (aiosqlite runs one statement at a time anyway).
        self._write_lock = asyncio.Lock()
        self._touched: dict[str, float] = {}  # key -> time of a hit not yet written to last_used
        self._closed = False
        self.hits = 0
        self.misses = 0

    @classmethod
    async def open(
        cls, path: str | Path, *, clock: Callable[[], float] = time.time, busy_timeout_s: float = 5.0
    ) -> CacheFile:
        in_memory = str(path) == ":memory:"
        path = Path(path)
        if not in_memory:
            path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(":memory:" if in_memory else path, isolation_level=None)
        try:
            await _prepare(db, path, in_memory, busy_timeout_s)
            ((entries,),) = await db.execute_fetchall("SELECT count(*) FROM responses")
        except BaseException:
            await db.close()
            raise
        return cls(db, path, clock, entries)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def entries(self) -> int:
        return self._entries

    async def evict(self, policy: CachePolicy) -> None:
        """Drop the least recently used entries beyond `policy.max_entries`."""
        async with self._write_lock:
            if not self._closed:
                await self._evict_beyond_limit(policy)

    async def get(self, key: str, policy: CachePolicy) -> CachedAnswer | None:
        """The stored answer, or None when absent or expired (an expired row is deleted)."""
        if self._closed or not policy.enabled:
            return None
        now = self._clock()
        try:
            found = await self._lookup(key, now, policy.ttl_s)
        except _STORE_ERRORS as exc:
            log.warning("cache %s: read failed, treating %s as a miss: %s", self._path, key[:12], exc)
            found = None
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        answer, last_used = found
        if now - last_used >= _TOUCH_EVERY_S:
            self._touched[key] = now
            if len(self._touched) >= _TOUCH_BATCH:
                try:
                    async with self._write_lock:
                        await self._write_touches()
                except _STORE_ERRORS as exc:  # only LRU precision is lost
                    log.warning("cache %s: could not record recent hits: %s", self._path, exc)
        return answer

    async def _lookup(self, key: str, now: float, ttl_s: float) -> tuple[CachedAnswer, float] | None:
        found = await self._db.execute_fetchall(
            "SELECT created_at, last_used, payload FROM responses WHERE key = ?", (key,)
        )
        if not found:
            return None
        ((created_at, last_used, payload),) = found
        if created_at + ttl_s <= now:
            await self._delete(key, created_at)
            return None
        try:
            return decode_answer(payload), last_used
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("cache %s: dropping unreadable entry %s: %s", self._path, key[:12], exc)
            await self._delete(key, created_at)
            return None

    async def put(self, key: str, answer: CachedAnswer, policy: CachePolicy) -> bool:
        """Store a successful answer under `key`; return False when it was refused or not stored."""
        if self._closed or not policy.enabled:
            return False
        payload, why = storable(answer, policy)
        if payload is None:
            log.debug("cache %s: not storing %s: %s", self._path, key[:12], why)
            return False
        now = self._clock()
        row = (now, now, len(payload), payload, key)
        try:
            async with self._write_lock:
                async with self._db.execute(
                    "INSERT OR IGNORE INTO responses (created_at, last_used, size, payload, key) "
                    "VALUES (?, ?, ?, ?, ?)",
                    row,
                ) as cursor:
                    inserted = cursor.rowcount == 1
                if inserted:
                    self._entries += 1
                else:  # two misses for the same request raced; the later answer wins
                    await _exec(
                        self._db,
                        "UPDATE responses SET created_at = ?, last_used = ?, size = ?, payload = ? WHERE key = ?",
                        row,
                    )
                self._touched.pop(key, None)
                await self._evict_beyond_limit(policy)
        except _STORE_ERRORS as exc:
            log.warning("cache %s: could not store %s: %s", self._path, key[:12], exc)
            return False
        return True

    async def purge_expired(self, policy: CachePolicy) -> int:
        """Delete every expired entry; return how many."""
        if self._closed:
            return 0
        cutoff = self._clock() - policy.ttl_s
        async with self._write_lock:
            async with self._db.execute("DELETE FROM responses WHERE created_at <= ?", (cutoff,)) as cursor:
                deleted = max(cursor.rowcount, 0)
            await self._recount()
        if deleted:
            log.info("cache %s: purged %d expired entr%s", self._path, deleted, "y" if deleted == 1 else "ies")
        return deleted

    async def clear(self) -> int:
        """Delete every entry; return how many."""
        if self._closed:
            return 0
        async with self._write_lock:
            async with self._db.execute("DELETE FROM responses") as cursor:
                deleted = max(cursor.rowcount, 0)
            self._touched.clear()
            await self._recount()
        return deleted

    async def close(self) -> None:
        """Write pending LRU marks and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            async with self._write_lock:
                await self._write_touches()
        except _STORE_ERRORS as exc:  # only LRU precision is lost
            log.warning("cache %s: could not record recent hits on close: %s", self._path, exc)
        finally:
            await self._db.close()

    # --- under _write_lock ----------------------------------------------------

    async def _delete(self, key: str, created_at: float) -> None:
        async with self._write_lock:
            # created_at too: a fresh answer stored meanwhile under the same key must survive.
            async with self._db.execute(
                "DELETE FROM responses WHERE key = ? AND created_at = ?", (key, created_at)
            ) as cursor:
                self._entries -= max(cursor.rowcount, 0)
            self._touched.pop(key, None)

    async def _evict_beyond_limit(self, policy: CachePolicy) -> None:
        excess = self._entries - policy.max_entries
        if excess <= 0:
            return
        await self._write_touches()  # so recent hits count before choosing what to drop
        async with self._db.execute(
            "DELETE FROM responses WHERE key IN (SELECT key FROM responses ORDER BY last_used, created_at LIMIT ?)",
            (excess,),
        ) as cursor:
            self._entries -= max(cursor.rowcount, 0)

    async def _write_touches(self) -> None:
        if not self._touched:
            return
        marks = [(used, key) for key, used in self._touched.items()]
        self._touched.clear()
        await _exec(self._db, "BEGIN")
        try:
            # max(): a mark noted before the row was replaced must not age the new row.
            async with self._db.executemany("UPDATE responses SET last_used = max(last_used, ?) WHERE key = ?", marks):
                pass
            await self._db.commit()
        except BaseException:
            if self._db.in_transaction:
                await self._db.rollback()
            raise

    async def _recount(self) -> None:
        ((self._entries,),) = await self._db.execute_fetchall("SELECT count(*) FROM responses")


async def _prepare(db: aiosqlite.Connection, path: Path, in_memory: bool, busy_timeout_s: float) -> None:
    await _exec(db, f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    ((mode,),) = await db.execute_fetchall("PRAGMA journal_mode = WAL")
    if mode.lower() != "wal" and not in_memory:
        log.warning("cache %s: SQLite refused WAL (journal_mode=%s); stores will be slower", path, mode)
    # A cache may lose its last stores in a power cut; it must not pay an fsync per store.
    await _exec(db, "PRAGMA synchronous = NORMAL")
    ((version,),) = await db.execute_fetchall("PRAGMA user_version")
    if version > SCHEMA_VERSION:
        raise CacheSchemaError(
            f"response cache {path} has schema version {version}, but this proxy knows only up to "
            f"{SCHEMA_VERSION}; run a newer proxy, or point cache.path at another file (or delete it: "
            f"it only holds cached answers)"
        )
    if version < SCHEMA_VERSION:
        script = f"BEGIN IMMEDIATE;\n{_SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
        try:
            async with db.executescript(script):
                pass
        except BaseException:
            if db.in_transaction:
                await db.rollback()
            raise


async def _exec(db: aiosqlite.Connection, sql: str, params: Sequence = ()) -> None:
    async with db.execute(sql, params):
        pass
