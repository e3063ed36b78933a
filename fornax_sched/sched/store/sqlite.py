"""The embedded store: the KV primitive in one SQLite file.

WAL mode with ``synchronous=FULL`` (each commit is fsynced; ``sync="normal"``
syncs at checkpoints only: a commit survives the scheduler's crash but not
the machine's, for a tenth of the cost on a slow disk), writes on a
thread of their own and reads on another connection and thread, so the
event loop keeps serving while SQLite syncs and a long scan reads one
snapshot while commits go on.  The file's revision lives in a row; each key
keeps the revision of its last change.  Leases are rows with an expiry
(wall clock, so they outlive a restart as they would in etcd), expired by
any transaction and by a timer.  Watches are served to this process from
the transactions it makes, with a short history to start from.  The lock
(a campaign) is ``flock`` on a file beside the store: the kernel drops it
when its process dies, however it dies, and it names its holder.

Opening refuses what is not a store instead of starting a new one on it: a
file of zero bytes, a file that is not SQLite, a SQLite file without our
tables.  ``fresh=True`` moves such a file aside and starts anew.  A store
from before the KV layout (tables placements, nodes, meta, policies, log)
is converted in place, in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .api import Compacted, StoreBusy, StoreError
from .kv import Change, Compare, Delete, Put, Range, Row

T = TypeVar("T")
SYNC_MODES = ("full", "normal")
MAGIC = b"SQLite format 3\x00"
OLD_TABLES = ("placements", "nodes", "meta", "policies")
HISTORY = 10_000  # transactions a watch may start back from
HISTORY_BYTES = 4 << 20  # ... and at most this much of their values, kept in memory


class _Feed:
    def __init__(self, kv: SqliteKV, prefix: str) -> None:
        self.kv = kv
        self.prefix = prefix
        self.queue: asyncio.Queue[list[Change] | None] = asyncio.Queue()

    def push(self, changes: list[Change]) -> None:
        mine = [c for c in changes if c.key.startswith(self.prefix)]
        if mine:
            self.queue.put_nowait(mine)

    def __aiter__(self) -> AsyncIterator[list[Change]]:
        return self._run()

    async def _run(self) -> AsyncIterator[list[Change]]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item

    async def close(self) -> None:
        self.kv._feeds.discard(self)
        self.queue.put_nowait(None)


class _Snapshot:
    def __init__(self, kv: SqliteKV) -> None:
        self.kv = kv
        self.revision = 0

    async def read(self, r: Range) -> list[Row]:
        return await self.kv._read(lambda: self.kv._select(self.kv._reader_db(), r))


class _Hold:
    def __init__(self, fd: int, identity: str, path: Path) -> None:
        self.fd = fd
        self.identity = identity
        self.path = path
        self.lost = asyncio.Event()
        self.guard: Compare | None = None

    async def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


class SqliteKV:
    """The KV primitive (kv.KV) in one SQLite file."""

    kind = "sqlite"
    max_bytes = 1 << 62  # no limit on a transaction's size

    def __init__(self, path: Path, *, max_ops: int = 1 << 30, clock: Callable[[], float] = time.time,
                 sync: str = "full") -> None:
        if sync not in SYNC_MODES:
            raise StoreError(f"sync={sync!r}: want {' or '.join(SYNC_MODES)}")
        self.path = Path(path)
        self.sync = sync
        self.where = str(self.path) + ("" if sync == "full" else f"?sync={sync}")
        self.max_ops = max_ops
        self.clock = clock
        self.created = False
        self._wpool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fornax-store-w")
        self._rpool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fornax-store-r")
        self._db: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None
        self._feeds: set[_Feed] = set()
        self._history: deque[tuple[int, list[Change], int]] = deque()
        self._history_bytes = 0
        self._revision = 0  # the last revision published to this process
        self._written = 0  # the last revision the writer thread committed
        self._leases = False  # whether any lease may be live (else transactions skip expiring them)
        self._expirer: asyncio.Task[None] | None = None
        self._reading = asyncio.Lock()  # one snapshot at a time on the reader connection
        self._closed = False

    # ------------------------------------------------------------ opening
    @classmethod
    async def open(cls, path: Path, *, create: bool = True, fresh: bool = False, **kw: Any) -> SqliteKV:
        kv = cls(path, **kw)
        await kv._write(lambda: kv._open(create, fresh))
        return kv

    def _open(self, create: bool, fresh: bool) -> None:
        path = self.path
        if fresh and path.exists():
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock()))
            for suffix in ("", "-wal", "-shm"):
                old = Path(f"{path}{suffix}")
                if old.exists():
                    old.rename(Path(f"{path}.replaced-{stamp}{suffix}"))
        existed = path.exists()
        if existed:
            self._check_file()
        elif not create:
            raise StoreError(f"there is no store at {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.sync.upper()}")
            db.execute("PRAGMA busy_timeout=5000")
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open the store {path}: {e}") from None
        self._db = db
        try:
            if "kv" not in tables:
                if existed and not (set(OLD_TABLES) <= tables):
                    raise StoreError(f"the store {path} is a SQLite file without a scheduler's tables "
                                     f"(it has {', '.join(sorted(tables)) or 'none'}): refusing to start afresh "
                                     "on it; start with --fresh to begin a new store (the file is kept aside)")
                self._create(db, migrate=existed)
                self.created = not existed
            self._revision = int(db.execute("SELECT value FROM info WHERE name='revision'").fetchone()[0])
            self._written = self._revision
            self._leases = bool(db.execute("SELECT 1 FROM leases LIMIT 1").fetchone())
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the store {path}: {e}") from None

    def _check_file(self) -> None:
        """Refuse a file that cannot be a store: SQLite would take an empty one as a new database."""
        path = self.path
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(len(MAGIC))
        except OSError as e:
            raise StoreError(f"cannot open the store {path}: {e.strerror or e}") from None
        if size == 0:
            raise StoreError(f"the store {path} is empty (0 bytes): its state is gone (a failed copy or a "
                             "truncation?); refusing to start afresh and forget what should run. Restore it, "
                             "or start with --fresh to begin a new store")
        if head != MAGIC:
            raise StoreError(f"the store {path} is not a SQLite file (damaged or truncated?): refusing to start; "
                             "restore it, or start with --fresh to begin a new store (the file is kept aside)")

    @staticmethod
    def _create(db: sqlite3.Connection, migrate: bool) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, rev INTEGER NOT NULL,"
                       " lease INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID")
            db.execute("CREATE TABLE leases (id INTEGER PRIMARY KEY AUTOINCREMENT, ttl REAL NOT NULL,"
                       " expires REAL NOT NULL)")
            db.execute("CREATE TABLE info (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("INSERT INTO info VALUES ('revision', ?)", ("1" if migrate else "0",))
            if migrate:  # the layout before the KV: one table per table, and a log table
                for t in OLD_TABLES:
                    db.execute(f"INSERT INTO kv (key, value, rev) SELECT 't/{t}/' || key, value, 1 FROM {t}")
                db.execute("INSERT INTO kv (key, value, rev) SELECT printf('l/%016d', seq),"
                           " json_object('at', at, 'line', line), 1 FROM log")
                import secrets

                ident = json.dumps({"cluster": secrets.token_hex(8), "created": time.time(), "format": 1,
                                    "migrated": True})
                db.execute("INSERT INTO kv (key, value, rev) VALUES ('i', ?, 1)", (ident,))
                for t in (*OLD_TABLES, "log"):
                    db.execute(f"DROP TABLE {t}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._expirer is not None:
            self._expirer.cancel()
        for f in list(self._feeds):
            await f.close()

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        def rshut() -> None:
            if self._rdb is not None:
                self._rdb.close()
                self._rdb = None

        await self._write(shut)
        await self._read(rshut)
        self._wpool.shutdown(wait=True)
        self._rpool.shutdown(wait=True)

    # ------------------------------------------------------------ threads
    async def _write(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._wpool, fn)

    async def _read(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._rpool, fn)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the store {self.path} is closed")
        return self._db

    def _reader_db(self) -> sqlite3.Connection:
        if self._rdb is None:
            if self._closed:
                raise StoreError(f"the store {self.path} is closed")
            try:
                self._rdb = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self._rdb.execute("PRAGMA busy_timeout=5000")
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the store {self.path}: {e}") from None
        return self._rdb

    # ------------------------------------------------------------ transactions
    async def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> int | None:
        rev, changes = await self._write(lambda: self._txn(list(compares), list(ops), self.clock()))
        if rev is not None:
            self._published(rev, changes)
        return rev

    def _txn(self, compares: list[Compare], ops: list[Put | Delete],
             now: float) -> tuple[int | None, list[Change]]:
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                rev = self._written + 1  # this connection, on this thread, is the only writer
                changes = self._expire(db, now, rev) if self._leases else []
                for c in compares:
                    row = db.execute("SELECT rev FROM kv WHERE key = ?", (c.key,)).fetchone()
                    if (row[0] if row else 0) != c.revision:
                        db.execute("ROLLBACK")
                        return None, []
                if not ops and not changes:
                    db.execute("ROLLBACK")
                    return rev - 1, []
                for op in ops:
                    if isinstance(op, Put):
                        if op.lease and not db.execute("SELECT 1 FROM leases WHERE id = ?", (op.lease,)).fetchone():
                            raise StoreError(f"lease {op.lease} has expired")
                        db.execute("INSERT INTO kv (key, value, rev, lease) VALUES (?, ?, ?, ?) ON CONFLICT(key) DO "
                                   "UPDATE SET value = excluded.value, rev = excluded.rev, lease = excluded.lease",
                                   (op.key, op.value, rev, op.lease))
                        changes.append(Change(op.key, op.value, rev))
                    elif op.end:
                        gone = db.execute("SELECT key FROM kv WHERE key >= ? AND key < ?",
                                          (op.key, op.end)).fetchall()
                        db.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (op.key, op.end))
                        changes += [Change(k, None, rev) for (k,) in gone]
                    elif db.execute("DELETE FROM kv WHERE key = ?", (op.key,)).rowcount:
                        changes.append(Change(op.key, None, rev))
                db.execute("UPDATE info SET value = ? WHERE name='revision'", (str(rev),))
                db.execute("COMMIT")
                self._written = rev
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (a full disk does)
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the store {self.path}: {e}") from None
        return rev, changes

    def _expire(self, db: sqlite3.Connection, now: float, rev: int) -> list[Change]:
        """Delete the keys of expired leases (within the caller's transaction)."""
        dead = [lid for (lid,) in db.execute("SELECT id FROM leases WHERE expires <= ?", (now,))]
        self._leases = bool(db.execute("SELECT 1 FROM leases WHERE expires > ? LIMIT 1", (now,)).fetchone())
        changes: list[Change] = []
        for lid in dead:
            keys = db.execute("SELECT key FROM kv WHERE lease = ?", (lid,)).fetchall()
            db.execute("DELETE FROM kv WHERE lease = ?", (lid,))
            db.execute("DELETE FROM leases WHERE id = ?", (lid,))
            changes += [Change(k, None, rev) for (k,) in keys]
        return changes

    def _published(self, rev: int, changes: list[Change]) -> None:
        self._revision = max(self._revision, rev)
        if changes:
            size = sum(len(c.key) + len(c.value or "") for c in changes)
            self._history.append((rev, changes, size))
            self._history_bytes += size
            while len(self._history) > HISTORY or self._history_bytes > HISTORY_BYTES:
                self._history_bytes -= self._history.popleft()[2]
            for f in list(self._feeds):
                f.push(changes)

    # ------------------------------------------------------------ reads
    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[_Snapshot]:
        async with self._reading:
            snap = _Snapshot(self)

            def begin() -> int:
                db = self._reader_db()
                try:
                    if db.in_transaction:  # a snapshot cut short as it began (a read's timeout): its end never ran
                        db.execute("ROLLBACK")
                    db.execute("BEGIN")
                    return int(db.execute("SELECT value FROM info WHERE name='revision'").fetchone()[0])
                except sqlite3.Error as e:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise StoreError(f"cannot read the store {self.path}: {e}") from None

            snap.revision = await self._read(begin)
            try:
                yield snap
            finally:
                def end() -> None:
                    db = self._rdb
                    if db is not None and db.in_transaction:
                        db.execute("COMMIT")

                with contextlib.suppress(sqlite3.Error, RuntimeError):
                    await self._read(end)

    def _select(self, db: sqlite3.Connection, r: Range) -> list[Row]:
        sql = ("SELECT key, value, rev, lease FROM kv WHERE key >= ? AND key < ? ORDER BY key"
               + (" DESC" if r.reverse else "") + (" LIMIT ?" if r.limit else ""))
        args: tuple[Any, ...] = (r.start, r.end, r.limit) if r.limit else (r.start, r.end)
        try:
            return [Row(k, v, rev, lease) for k, v, rev, lease in db.execute(sql, args)]
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the store {self.path}: {e}") from None

    # ------------------------------------------------------------ watches
    def subscribe(self, prefix: str, since: int) -> _Feed:
        feed = _Feed(self, prefix)
        if since < self._revision:
            oldest = self._history[0][0] if self._history else self._revision + 1
            if since + 1 < oldest:
                raise Compacted(f"the store {self.path} keeps no changes from revision {since} on "
                                f"(oldest kept: {oldest}): read it again", oldest)
            for rev, changes, _ in self._history:
                if rev > since:
                    feed.push(changes)
        self._feeds.add(feed)
        return feed

    # ------------------------------------------------------------ leases
    async def grant(self, ttl: float) -> int:
        now = self.clock()

        def add() -> int:
            db = self._conn()
            try:
                cur = db.execute("INSERT INTO leases (ttl, expires) VALUES (?, ?)", (ttl, now + ttl))
            except sqlite3.Error as e:
                raise StoreError(f"cannot write the store {self.path}: {e}") from None
            self._leases = True
            return int(cur.lastrowid or 0)

        lease = await self._write(add)
        if self._expirer is None or self._expirer.done():
            self._expirer = asyncio.get_running_loop().create_task(self._expire_loop(), name="store-leases")
        return lease

    async def keepalive(self, lease: int) -> bool:
        now = self.clock()

        def renew() -> bool:
            db = self._conn()
            try:
                return bool(db.execute("UPDATE leases SET expires = ? + ttl WHERE id = ? AND expires > ?",
                                       (now, lease, now)).rowcount)
            except sqlite3.Error as e:
                raise StoreError(f"cannot write the store {self.path}: {e}") from None

        return await self._write(renew)

    async def revoke(self, lease: int) -> None:
        def drop() -> tuple[int | None, list[Change]]:
            db = self._conn()
            try:
                db.execute("UPDATE leases SET expires = 0 WHERE id = ?", (lease,))
                self._leases = True
            except sqlite3.Error as e:
                raise StoreError(f"cannot write the store {self.path}: {e}") from None
            return self._txn([], [], self.clock())

        rev, changes = await self._write(drop)
        if rev is not None:
            self._published(rev, changes)

    async def _expire_loop(self) -> None:
        """Expire leases even when nothing else is written."""
        while not self._closed:
            await asyncio.sleep(0.25)
            with contextlib.suppress(StoreError):
                await self.txn([], [])
            has = await self._write(lambda: self._conn().execute("SELECT 1 FROM leases LIMIT 1").fetchone())
            if not has:
                return

    # ------------------------------------------------------------ the lock
    def _lock_path(self, name: str) -> Path:
        return Path(f"{self.path}.{name}.lock")

    async def lock(self, name: str, identity: str, ttl: float, wait: bool) -> _Hold:
        path = self._lock_path(name)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                if not wait:
                    raise StoreBusy(f"the store {self.path} is in use by another scheduler ({holder or 'unknown'}); "
                                    "two schedulers on one state would undo each other's work: stop that one "
                                    "first") from None
                await asyncio.sleep(0.2)
                continue
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            text = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}: {identity}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
            return _Hold(fd, identity, path)

    async def holder(self, name: str) -> str | None:
        path = self._lock_path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_fd(fd) or "unknown"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def _read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""
