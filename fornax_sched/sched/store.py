"""Where the scheduler's state lives: an embedded SQLite store by default.

The store is deliberately small and key-value shaped, so that an etcd store
can implement the same interface: named tables of JSON values by key, an
append-only log of lines, and ``apply(batch)``, which writes a batch of
changes atomically and returns only once they are durable.  A ctl write is
answered after its batch is applied: nothing acknowledged is lost.

SQLite runs in WAL mode with ``synchronous=FULL`` (each commit is fsynced),
on a thread of its own so the event loop keeps serving while it syncs.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

TABLES = ("placements", "nodes", "meta", "policies")
T = TypeVar("T")


class StoreError(Exception):
    """The store cannot be reached or written: the message says which and why."""


@dataclass
class Batch:
    """Changes that must land together (or not at all)."""

    puts: list[tuple[str, str, Any]] = field(default_factory=list)  # (table, key, JSON-able value)
    deletes: list[tuple[str, str]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def put(self, table: str, key: str, value: Any) -> Batch:
        _check_table(table)
        self.puts.append((table, key, value))
        return self

    def delete(self, table: str, key: str) -> Batch:
        _check_table(table)
        self.deletes.append((table, key))
        return self

    def note(self, line: str) -> Batch:
        self.log.append(line)
        return self

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes or self.log)


def _check_table(table: str) -> None:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")


class Store(Protocol):
    """What the scheduler needs of any store (SQLite here; etcd to come)."""

    async def apply(self, batch: Batch) -> None: ...

    async def load(self, table: str) -> dict[str, Any]: ...

    def scan(self, table: str, order: str = "", size: int = 5000) -> AsyncIterator[list[tuple[str, Any]]]: ...

    async def log_tail(self, n: int) -> list[tuple[float, str]]: ...

    async def close(self) -> None: ...


class SqliteStore:
    """A Store in one SQLite file."""

    def __init__(self, path: Path, *, log_keep: int = 100_000) -> None:
        self.path = Path(path)
        self.log_keep = log_keep
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fornax-store")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path, **kw: Any) -> SqliteStore:
        store = cls(path, **kw)
        await store._run(store._open)
        return store

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            for t in TABLES:
                db.execute(f"CREATE TABLE IF NOT EXISTS {t} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                       " at REAL NOT NULL, line TEXT NOT NULL)")
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open the store {self.path}: {e}") from None
        self._db = db

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the store {self.path} is closed")
        return self._db

    async def apply(self, batch: Batch) -> None:
        if batch:
            await self._run(lambda: self._apply(batch))

    def _apply(self, batch: Batch) -> None:
        db = self._conn()
        now = time.time()
        try:
            encoded = [(t, k, json.dumps(v, separators=(",", ":"))) for t, k, v in batch.puts]
        except (TypeError, ValueError) as e:
            raise StoreError(f"cannot store {e}") from None
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for t, k, v in encoded:
                    db.execute(f"INSERT INTO {t} (key, value) VALUES (?, ?) "
                               "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (k, v))
                for t, k in batch.deletes:
                    db.execute(f"DELETE FROM {t} WHERE key = ?", (k,))
                if batch.log:
                    db.executemany("INSERT INTO log (at, line) VALUES (?, ?)", [(now, line) for line in batch.log])
                    db.execute("DELETE FROM log WHERE seq <= (SELECT MAX(seq) FROM log) - ?", (self.log_keep,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store {self.path}: {e}") from None

    async def load(self, table: str) -> dict[str, Any]:
        _check_table(table)

        def read() -> dict[str, Any]:
            try:
                rows = self._conn().execute(f"SELECT key, value FROM {table}").fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the store {self.path}: {e}") from None
            return {k: json.loads(v) for k, v in rows}

        return await self._run(read)

    async def scan(self, table: str, order: str = "", size: int = 5000) -> AsyncIterator[list[tuple[str, Any]]]:
        """A table's rows, ``size`` at a time (ordered by the JSON field ``order``, if given), so
        that a large table is never decoded whole: loading 100,000 placements at once held three
        times the memory they end up taking."""
        _check_table(table)
        if order and not order.isidentifier():
            raise ValueError(f"bad order field {order!r}")
        sql = f"SELECT key, value FROM {table}" + (f" ORDER BY json_extract(value, '$.{order}')" if order else "")

        def first() -> sqlite3.Cursor:
            try:
                return self._conn().execute(sql)
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the store {self.path}: {e}") from None

        cur = await self._run(first)

        def more() -> list[tuple[str, Any]]:
            try:
                return [(k, json.loads(v)) for k, v in cur.fetchmany(size)]
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the store {self.path}: {e}") from None

        while rows := await self._run(more):
            yield rows

    async def log_tail(self, n: int) -> list[tuple[float, str]]:
        def read() -> list[tuple[float, str]]:
            try:
                rows = self._conn().execute("SELECT at, line FROM log ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the store {self.path}: {e}") from None
            return [(at, line) for at, line in reversed(rows)]

        return await self._run(read)

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(shut)
        self._pool.shutdown(wait=True)
