"""The store, written once over a small transactional key-value primitive.

A store kind (SQLite, etcd) implements ``KV``: transactions of compares and
puts/deletes with a limit on their size, consistent reads, a feed of
changes, leases and a lock.  ``KVStore`` builds the scheduler's ``Store`` on
it, so that every kind behaves the same and passes one conformance suite:

- tables and the log as key ranges (``t/TABLE/KEY``, ``l/SEQ``);
- commits from concurrent writers grouped into one transaction;
- batches larger than the kind's transaction limits (operations and bytes) committed in steps that
  are still all or nothing: the operations are staged under ``s/ID/`` (which
  no reader looks at), one small transaction then writes the commit marker
  ``c/ID`` (under the batch's conditions: the commit point), and the
  operations are rolled forward in pieces.  Until the marker goes, readers
  see the staged batch laid over the rows and watches deliver it as one
  change; a writer that opens the store finishes what another left;
- a bounded log (the oldest lines are deleted in the transaction that adds new ones);
- leadership: every transaction of a leader carries the compare that
  guards its leadership, so once it is deposed nothing it sends commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from .api import TABLES, Batch, Conflict, Event, Item, LogLine, NotLeader, StoreError, check_table

FORMAT = 1
IDENTITY = "i"
PROBE = "h"  # written by a probe of the store (see KVStore.probe); no reader looks at it
CHUNK = 256 << 10  # bytes of staged operations per key
LINE_MAX = 2000  # characters a log line keeps in the store


# ---------------------------------------------------------------- the primitive


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    end: str = ""  # with end: every key in [key, end)


@dataclass(frozen=True, slots=True)
class Compare:
    """The key's revision must be ``revision`` (0: the key must not exist)."""

    key: str
    revision: int


@dataclass(frozen=True, slots=True)
class Range:
    start: str
    end: str
    limit: int = 0
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    value: str
    revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    value: str | None  # None: deleted
    revision: int


class Snapshot(Protocol):
    revision: int

    async def read(self, r: Range) -> list[Row]: ...


class Feed(Protocol):
    """Changes after a revision, one list per transaction."""

    def __aiter__(self) -> AsyncIterator[list[Change]]: ...

    async def close(self) -> None: ...


class Hold(Protocol):
    """A held lock: ``guard`` (if any) goes into every transaction of the holder."""

    identity: str
    lost: asyncio.Event
    guard: Compare | None

    async def release(self) -> None: ...


class KV(Protocol):
    kind: str
    where: str
    max_ops: int  # operations one transaction may hold
    max_bytes: int  # bytes of keys and values one transaction may hold
    created: bool  # the store did not exist before this open

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> int | None:
        """Apply ops atomically if every compare holds: the new revision, or None (nothing written)."""
        ...

    def snapshot(self) -> AbstractAsyncContextManager[Snapshot]: ...

    def subscribe(self, prefix: str, since: int) -> Feed: ...

    async def grant(self, ttl: float) -> int: ...

    async def keepalive(self, lease: int) -> bool: ...

    async def revoke(self, lease: int) -> None: ...

    async def lock(self, name: str, identity: str, ttl: float, wait: bool) -> Hold: ...

    async def holder(self, name: str) -> str | None: ...

    async def close(self) -> None: ...


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _prefix(p: str) -> Range:
    return Range(p, prefix_end(p))


def _row_key(table: str, key: str) -> str:
    return f"t/{table}/{key}"


def _log_key(seq: int) -> str:
    return f"l/{seq:016d}"


def _size(op: Put | Delete) -> int:
    """Bytes an operation takes in a transaction (keys and values as UTF-8, and a little framing)."""
    if isinstance(op, Put):
        return len(op.key.encode()) + len(op.value.encode()) + 16
    return len(op.key.encode()) + len(op.end.encode()) + 16


# One encoder for every row: json.dumps with options of its own builds a new encoder a call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode(value: Any) -> str:
    try:
        return _encode(value)
    except (TypeError, ValueError) as e:
        raise StoreError(f"cannot store a value: {e}") from None


# ---------------------------------------------------------------- the store


class _Lease:
    def __init__(self, store: KVStore, lease: int, ttl: float) -> None:
        self._store = store
        self.id = lease
        self.ttl = ttl

    async def keepalive(self) -> bool:
        return await self._store.kv.keepalive(self.id)

    async def revoke(self) -> None:
        await self._store.kv.revoke(self.id)


class _Leadership:
    def __init__(self, store: KVStore, hold: Hold) -> None:
        self._store = store
        self._hold = hold
        self.identity = hold.identity
        self.lost = hold.lost

    async def resign(self) -> None:
        if self._store._hold is self._hold:
            self._store._hold = None
        await self._hold.release()


@dataclass
class _Pending:
    batch: Batch
    ops: list[Put | Delete]  # the batch's table operations, encoded
    compares: list[Compare]
    writes: set[str]  # keys it writes
    future: asyncio.Future[int]
    size: int = 0  # bytes of its operations and log lines


class KVStore:
    """The scheduler's Store over any KV (see the module docstring)."""

    def __init__(self, kv: KV, cluster: str, *, clock: Callable[[], float] = time.time,
                 log_keep: int = 100_000) -> None:
        self.kv = kv
        self.kind = kv.kind
        self.where = kv.where
        self.max_ops = kv.max_ops
        self.max_bytes = getattr(kv, "max_bytes", 1 << 62)
        self._chunk = max(1024, min(CHUNK, self.max_bytes // 4))  # bytes of staged operations per key
        self.cluster = cluster
        self.clock = clock
        self.log_keep = log_keep
        self._revision = 0
        self._log_next = 1
        self._queue: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None
        self._hold: Hold | None = None
        self._unrolled: list[tuple[str, list[Put | Delete]]] = []  # committed staged batches not yet rolled forward

    # ------------------------------------------------------------ opening
    @classmethod
    async def open(cls, kv: KV, *, clock: Callable[[], float] = time.time, log_keep: int = 100_000,
                   cluster: str | None = None) -> KVStore:
        """The store in ``kv``: a new one if the KV was just created, else the state it holds.

        A KV that exists but holds no identity is refused: it is not a
        scheduler's store, or it was emptied, and starting afresh on it would
        forget what should run.
        """
        store = cls(kv, "", clock=clock, log_keep=log_keep)
        rows, last = await store._identity()
        if not rows and kv.created:
            store.cluster = cluster or secrets.token_hex(8)
            rev = await kv.txn([Compare(IDENTITY, 0)], [Put(IDENTITY, encode(
                {"cluster": store.cluster, "created": clock(), "format": FORMAT}))])
            if rev is not None:
                store._revision = rev
            else:  # another replica created it meanwhile (both started on a new store): its identity is ours
                rows, last = await store._identity()
                if not rows:
                    raise StoreError(f"the store {kv.where} was created and emptied again while this one began")
        if rows:
            try:
                ident = json.loads(rows[0].value)
                store.cluster = str(ident["cluster"])
            except (ValueError, KeyError, TypeError):
                raise StoreError(f"the store {kv.where} has an unreadable identity: {rows[0].value[:100]!r}") from None
        elif not kv.created:
            raise StoreError(f"the store {kv.where} holds no scheduler state (no identity): refusing to start "
                             "afresh on it; start with --fresh to begin a new store")
        if last:
            store._log_next = int(last[0].key[2:]) + 1
        return store

    async def _identity(self) -> tuple[list[Row], list[Row]]:
        """The identity row (none in a new store) and the last log line, as the store holds them now."""
        async with self.kv.snapshot() as snap:
            rows = await snap.read(Range(IDENTITY, IDENTITY + "\0", 1))
            last = await snap.read(Range("l/", "l0", 1, reverse=True))
            self._revision = snap.revision
        return rows, last

    @property
    def revision(self) -> int:
        return self._revision

    async def close(self) -> None:
        if self._committer is not None:
            with contextlib.suppress(Exception):
                await self._committer
        if self._hold is not None:
            with contextlib.suppress(Exception):
                await self._hold.release()
            self._hold = None
        await self.kv.close()

    # ------------------------------------------------------------ probing
    async def probe(self, write: bool = False) -> str | None:
        """The cluster identity the store holds now (None: it holds none, it was emptied); with
        ``write``, also one small write outside the tables (key ``h``), to see that it takes
        writes.  StoreError if it cannot be read or written.  The scheduler's operating mode is
        decided from what this says (modes.py)."""
        async with self.kv.snapshot() as snap:
            rows = await snap.read(Range(IDENTITY, IDENTITY + "\0", 1))
        ident: str | None = None
        if rows:
            try:
                ident = str(json.loads(rows[0].value)["cluster"])
            except (ValueError, KeyError, TypeError):
                ident = f"(unreadable: {rows[0].value[:40]!r})"
        if write and await self.kv.txn([], [Put(PROBE, encode(self.clock()))]) is None:
            raise StoreError(f"cannot write the store {self.where}: a write without conditions was refused")
        return ident

    # ------------------------------------------------------------ reading
    async def get(self, table: str, key: str) -> Item | None:
        check_table(table)
        k = _row_key(table, key)
        while True:
            async with self.kv.snapshot() as snap:
                markers = await snap.read(_prefix("c/"))
                rows = await snap.read(Range(k, k + "\0", 1))
                staged = await self._staged(snap, markers)
            if staged is None:
                continue  # a staged batch finished meanwhile: read again
            found = {r.key: r for r in rows}
            _overlay(found, staged, k, k + "\0")
            r = found.get(k)
            return Item(key, json.loads(r.value), r.revision) if r is not None else None

    async def scan(self, table: str, start: str = "", size: int = 5000) -> AsyncIterator[list[Item]]:
        """A table's rows in key order, from one snapshot, ``size`` at a time."""
        check_table(table)
        head = f"t/{table}/"
        async with self.kv.snapshot() as snap:
            staged = await self._staged(snap, await snap.read(_prefix("c/"))) or []
            async for rows in _rows_in(snap, staged, head + start, prefix_end(head), size):
                yield [Item(r.key[len(head):], json.loads(r.value), r.revision) for r in rows]

    async def dump(self, size: int = 5000) -> AsyncIterator[tuple[str, Any, Any]]:
        """Everything the store holds, from one snapshot: ``("identity", revision, {...})`` first,
        then ``(table, key, value)`` for every row, then ``("log", at, line)`` for every log line."""
        async with self.kv.snapshot() as snap:
            ident = await snap.read(Range(IDENTITY, IDENTITY + "\0", 1))
            staged = await self._staged(snap, await snap.read(_prefix("c/"))) or []
            yield "identity", snap.revision, json.loads(ident[0].value) if ident else {"cluster": self.cluster}
            for table in TABLES:
                head = f"t/{table}/"
                async for rows in _rows_in(snap, staged, head, prefix_end(head), size):
                    for r in rows:
                        yield table, r.key[len(head):], json.loads(r.value)
            async for rows in _rows_in(snap, staged, "l/", "l0", size):
                for r in rows:
                    try:
                        d = json.loads(r.value)
                        yield "log", float(d["at"]), str(d["line"])
                    except (ValueError, KeyError, TypeError):
                        continue

    async def replace(self, rows: dict[str, dict[str, Any]], log: list[tuple[float, str]],
                      identity: dict[str, Any]) -> int:
        """Make the store hold exactly ``rows`` and ``log`` (an import), all or nothing; its revision.

        Rows that are not in ``rows`` are deleted one by one (a range deleted in the same
        transaction as puts inside it is something etcd refuses), and the log is numbered anew.
        """
        for table in rows:
            check_table(table)
        await self.recover()
        gone: list[Put | Delete] = []
        for table in TABLES:
            async for items in self.scan(table):
                gone += [Delete(_row_key(table, it.key)) for it in items if it.key not in rows.get(table, {})]
        ops: list[Put | Delete] = [Put(IDENTITY, encode(identity)), *gone]
        for table, values in rows.items():
            ops += [Put(_row_key(table, k), encode(v)) for k, v in values.items()]
        ops += [Put(_log_key(i + 1), encode({"at": at, "line": line[:LINE_MAX]})) for i, (at, line) in enumerate(log)]
        ops.append(Delete(_log_key(len(log) + 1), "l0"))
        rev = await self._commit_staged(ops, [], [])
        if rev is None:
            raise StoreError(f"the store {self.where} refused the import: nothing was written")
        await self._roll_forward_pending()
        self._log_next = len(log) + 1
        self.cluster = str(identity.get("cluster", self.cluster))
        self._revision = max(self._revision, rev)
        return rev

    async def load(self, table: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        async for items in self.scan(table):
            for it in items:
                out[it.key] = it.value
        return out

    async def log_tail(self, n: int) -> list[tuple[float, str]]:
        async with self.kv.snapshot() as snap:
            rows = await snap.read(Range("l/", "l0", n, reverse=True))
        out = []
        for r in reversed(rows):
            try:
                d = json.loads(r.value)
                out.append((float(d["at"]), str(d["line"])))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    async def _staged(self, snap: Snapshot, markers: list[Row]) -> list[Put | Delete] | None:
        """The operations of committed staged batches (in commit order); None if one vanished."""
        out: list[Put | Delete] = []
        for m in sorted(markers, key=lambda r: r.revision):
            bid = m.key[2:]
            try:
                chunks = json.loads(m.value)["chunks"]
            except (ValueError, KeyError, TypeError):
                continue
            rows = await snap.read(_prefix(f"s/{bid}/"))
            if len(rows) != chunks:
                return None
            for r in rows:
                out.extend(_decode_ops(r.value))
        return out

    # ------------------------------------------------------------ writing
    async def apply(self, batch: Batch) -> int:
        if not batch:
            return self._revision
        ops: list[Put | Delete] = [Put(_row_key(t, k), encode(v), lease) for t, k, v, lease in batch.puts]
        ops += [Delete(_row_key(t, k)) for t, k in batch.deletes]
        compares = [Compare(_row_key(t, k), rev) for t, k, rev in batch.requires]
        sizes = [_size(op) for op in ops]
        if sizes and max(sizes) > self.max_bytes // 2:
            big = ops[sizes.index(max(sizes))]
            raise StoreError(f"cannot store {big.key.split('/', 2)[-1]!r} in {self.where}: its value takes "
                             f"{max(sizes)} bytes, more than half a transaction ({self.max_bytes} bytes): "
                             "nothing was written")
        size = sum(sizes) + sum(len((line[1] if isinstance(line, tuple) else line)[:LINE_MAX].encode()) + 64
                                for line in batch.log)
        loop = asyncio.get_running_loop()
        p = _Pending(batch, ops, compares, {op.key for op in ops}, loop.create_future(), size)
        self._queue.append(p)
        if self._committer is None or self._committer.done():
            self._committer = loop.create_task(self._commit_all(), name="store-commit")
        # (If the caller goes away, the batch may still commit, as a write whose writer vanished may.)
        return await p.future

    async def _commit_all(self) -> None:
        """Commit what is queued, several batches to a transaction where they fit."""
        while self._queue:
            group = self._take_group()
            try:
                await self._roll_forward_pending()
                if len(group) > 1 and await self._commit_together(group):
                    continue
                # A condition failed: the batches without conditions together, the others one
                # at a time, so that only the batch whose condition failed fails.
                plain = [p for p in group if not p.compares]
                if len(plain) > 1 and await self._commit_together(plain):
                    group = [p for p in group if p.compares]
                for p in group:
                    if not p.future.done():
                        await self._commit_one(p)
            except BaseException as e:  # every batch of the group not yet answered learns why
                err = e if isinstance(e, StoreError) else StoreError(f"the store {self.where} failed: {e!r}")
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(err)
                if not isinstance(e, Exception):
                    raise

    def _take_group(self) -> list[_Pending]:
        """The first queued batch, and those after it that fit beside it in one transaction
        and do not depend on what an earlier one writes."""
        first = self._queue.pop(0)
        group = [first]
        ops = self._ops_of(first)
        size = first.size
        written = set(first.writes)
        while self._queue:
            nxt = self._queue[0]
            n = self._ops_of(nxt)
            if ops + n > self.max_ops or size + nxt.size > self.max_bytes or any(c.key in written
                                                                                 for c in nxt.compares):
                break
            self._queue.pop(0)
            group.append(nxt)
            ops += n
            size += nxt.size
            written |= nxt.writes
        return group

    @staticmethod
    def _ops_of(p: _Pending) -> int:
        return len(p.ops) + len(p.batch.log) + (1 if p.batch.log else 0)

    def _too_big(self, p: _Pending) -> bool:
        """Too large for one transaction: committed in steps."""
        return self._ops_of(p) > self.max_ops or p.size > self.max_bytes

    def _guard(self) -> list[Compare]:
        hold = self._hold
        if hold is None:
            return []
        if hold.lost.is_set():
            raise self._deposed()
        return [hold.guard] if hold.guard is not None else []

    def _deposed(self) -> NotLeader:
        return NotLeader(f"this scheduler no longer leads the store {self.where}: nothing was written")

    def _log_ops(self, lines: list[LogLine], at: float, first: int) -> list[Put | Delete]:
        ops: list[Put | Delete] = []
        for i, line in enumerate(lines):
            when, text = line if isinstance(line, tuple) else (at, line)
            ops.append(Put(_log_key(first + i), encode({"at": when, "line": text[:LINE_MAX]})))
        if lines:
            keep_from = first + len(lines) - self.log_keep
            if keep_from > 1:
                ops.append(Delete("l/", _log_key(keep_from)))
        return ops

    async def _commit_together(self, group: list[_Pending]) -> bool:
        """One transaction for the group; False if a condition failed (nothing written)."""
        lines = [line for p in group for line in p.batch.log]
        ops = [op for p in group for op in p.ops] + self._log_ops(lines, self.clock(), self._log_next)
        rev = await self.kv.txn(self._guard() + [c for p in group for c in p.compares], ops)
        if rev is None:
            if self._hold is not None and self._hold.lost.is_set():
                raise self._deposed()
            return False
        self._committed(rev, len(lines), group)
        return True

    async def _commit_one(self, p: _Pending) -> None:
        lines = p.batch.log
        staged = self._too_big(p)
        if staged:
            rev = await self._commit_staged(p.ops, lines, p.compares)
        else:
            rev = await self.kv.txn(self._guard() + p.compares, p.ops + self._log_ops(lines, self.clock(),
                                                                                        self._log_next))
        if rev is None:
            if self._hold is not None and self._hold.lost.is_set():
                raise self._deposed()
            if not p.future.done():
                p.future.set_exception(Conflict(f"a row this change depends on changed meanwhile "
                                                f"({_keys(p.compares)}): nothing was written"))
            return
        self._committed(rev, 0 if staged else len(lines), [p])

    def _committed(self, rev: int, lines: int, group: list[_Pending]) -> None:
        self._log_next += lines
        self._revision = max(self._revision, rev)
        for p in group:
            if not p.future.done():
                p.future.set_result(rev)

    async def _commit_staged(self, ops: list[Put | Delete], lines: list[LogLine],
                             compares: list[Compare]) -> int | None:
        """Stage, commit with one small transaction, then roll forward; None if a condition failed."""
        bid = f"{int(self.clock() * 1000):013d}-{secrets.token_hex(4)}"
        everything = ops + self._log_ops(lines, self.clock(), self._log_next)
        chunks = _chunks(everything, self._chunk)
        stage: list[Put | Delete] = [Put(f"s/{bid}/{i:06d}", text) for i, text in enumerate(chunks)]
        drop = Delete(f"s/{bid}/", prefix_end(f"s/{bid}/"))
        for piece in self._pieces(stage, self.max_ops, self.max_bytes):
            if await self.kv.txn([], piece) is None:
                raise StoreError(f"the store {self.where} refused to stage a batch")
        try:
            rev = await self.kv.txn(self._guard() + compares, [Put(f"c/{bid}", encode({"chunks": len(chunks)}))])
        except BaseException:
            with contextlib.suppress(Exception):
                await self.kv.txn([], [drop])
            raise
        if rev is None:
            await self.kv.txn([], [drop])
            return None
        # Committed: from here on the batch stands, whatever happens to its roll-forward
        # (the next commit, or the next writer to open the store, finishes it).
        self._log_next += len(lines)
        self._unrolled.append((bid, everything))
        with contextlib.suppress(StoreError):
            await self._roll_forward_pending()
        return rev

    async def _roll_forward_pending(self) -> None:
        while self._unrolled:
            bid, ops = self._unrolled[0]
            await self._roll_forward(bid, ops)
            self._unrolled.pop(0)

    @staticmethod
    def _pieces(ops: list[Put | Delete], count: int, size: int) -> list[list[Put | Delete]]:
        """``ops`` in order, in pieces of at most ``count`` operations and about ``size`` bytes."""
        out: list[list[Put | Delete]] = []
        cur: list[Put | Delete] = []
        n = 0
        for op in ops:
            b = _size(op)
            if cur and (len(cur) >= count or n + b > size):
                out.append(cur)
                cur, n = [], 0
            cur.append(op)
            n += b
        if cur:
            out.append(cur)
        return out

    async def _roll_forward(self, bid: str, ops: list[Put | Delete]) -> None:
        marker = f"c/{bid}"
        chunks = len(_chunks(ops, self._chunk))
        done = 0
        for piece in self._pieces(ops, max(1, self.max_ops - 1), self.max_bytes - 256):
            done += len(piece)
            progress = Put(marker, encode({"chunks": chunks, "done": done}))
            rev = await self.kv.txn(self._guard(), piece + [progress])
            if rev is None:
                raise self._deposed()
            self._revision = max(self._revision, rev)
        rev = await self.kv.txn(self._guard(), [Delete(marker), Delete(f"s/{bid}/", prefix_end(f"s/{bid}/"))])
        if rev is None:
            raise self._deposed()
        self._revision = max(self._revision, rev)

    async def recover(self) -> int:
        """Finish staged batches a writer left (rolled forward) and drop stages never committed;
        the number of batches finished.  A writer calls this before its first commit."""
        async with self.kv.snapshot() as snap:
            markers = await snap.read(_prefix("c/"))
            stages = await snap.read(_prefix("s/"))
            todo = []
            for m in sorted(markers, key=lambda r: r.revision):
                rows = [r for r in stages if r.key.startswith(f"s/{m.key[2:]}/")]
                todo.append((m.key[2:], [op for r in rows for op in _decode_ops(r.value)]))
        committed = {bid for bid, _ in todo}
        for bid, ops in todo:
            await self._roll_forward(bid, ops)
        orphans = {r.key.split("/")[1] for r in stages} - committed
        for bid in orphans:
            await self.kv.txn(self._guard(), [Delete(f"s/{bid}/", prefix_end(f"s/{bid}/"))])
        async with self.kv.snapshot() as snap:
            last = await snap.read(Range("l/", "l0", 1, reverse=True))
        if last:
            self._log_next = max(self._log_next, int(last[0].key[2:]) + 1)
        return len(todo)

    # ------------------------------------------------------------ leases, leadership, watches
    async def grant(self, ttl: float) -> _Lease:
        return _Lease(self, await self.kv.grant(ttl), ttl)

    async def campaign(self, name: str, identity: str, ttl: float, wait: bool = True) -> _Leadership:
        hold = await self.kv.lock(name, identity, ttl, wait)
        self._hold = hold
        await self.recover()
        return _Leadership(self, hold)

    async def leader(self, name: str) -> str | None:
        return await self.kv.holder(name)

    def watch(self, tables: tuple[str, ...], since: int) -> _Watch:
        for t in tables:
            if t != "log":
                check_table(t)
        return _Watch(self, tables, since)


class _Watch:
    """Table changes from the KV's feed, with staged batches delivered whole."""

    def __init__(self, store: KVStore, tables: tuple[str, ...], since: int) -> None:
        self._store = store
        self._tables = tables
        self._feed = store.kv.subscribe("", since)
        self._stages: dict[str, dict[str, str]] = {}  # batch id -> staged chunks seen
        self._rolling: set[str] = set()  # batches delivered whole, whose roll-forward is skipped

    async def close(self) -> None:
        await self._feed.close()

    def __aiter__(self) -> AsyncIterator[list[Event]]:
        return self._events()

    async def _events(self) -> AsyncIterator[list[Event]]:
        async for changes in self._feed:
            out: list[Event] = []
            skip = False
            for ch in changes:
                if ch.key.startswith("s/"):
                    bid = ch.key.split("/")[1]
                    if ch.value is not None:
                        self._stages.setdefault(bid, {})[ch.key] = ch.value
                elif ch.key.startswith("c/"):
                    bid = ch.key[2:]
                    if ch.value is None:
                        self._rolling.discard(bid)
                        self._stages.pop(bid, None)
                        skip = True
                    elif bid in self._rolling:
                        skip = True  # a piece of a roll-forward already delivered
                    else:
                        ops = await self._ops(bid, json.loads(ch.value).get("chunks", 0))
                        if ops is not None:
                            self._rolling.add(bid)
                            out.extend(self._events_of(
                                [Change(op.key, op.value if isinstance(op, Put) else None, ch.revision)
                                 for op in ops if isinstance(op, Put) or not op.end], ch.revision))
                            skip = True
            if skip:
                if out:
                    yield out
                continue
            events = self._events_of(changes, changes[0].revision if changes else 0)
            if events:
                yield events

    async def _ops(self, bid: str, chunks: int) -> list[Put | Delete] | None:
        seen = self._stages.get(bid, {})
        if len(seen) != chunks:
            async with self._store.kv.snapshot() as snap:
                rows = await snap.read(_prefix(f"s/{bid}/"))
            if len(rows) != chunks:
                return None  # already rolled forward: its pieces come through as they are
            seen = {r.key: r.value for r in rows}
        return [op for _, text in sorted(seen.items()) for op in _decode_ops(text)]

    def _events_of(self, changes: list[Change], revision: int) -> list[Event]:
        out = []
        for ch in changes:
            if ch.key.startswith("t/"):
                _, table, key = ch.key.split("/", 2)
            elif ch.key.startswith("l/") and "log" in self._tables:
                table, key = "log", ch.key[2:]
            else:
                continue
            if table in self._tables:
                out.append(Event(table, key, json.loads(ch.value) if ch.value is not None else None, ch.revision))
        return out


# ---------------------------------------------------------------- staged operations


def _chunks(ops: list[Put | Delete], limit: int = CHUNK) -> list[str]:
    """Operations as JSON texts of at most about ``limit`` bytes each."""
    out: list[str] = []
    cur: list[list[Any]] = []
    size = 0
    for op in ops:
        enc: list[Any] = ["p", op.key, op.value, op.lease] if isinstance(op, Put) else ["d", op.key, op.end]
        n = _size(op)
        if cur and size + n > limit:
            out.append(json.dumps(cur, separators=(",", ":"), ensure_ascii=False))
            cur, size = [], 0
        cur.append(enc)
        size += n
    if cur:
        out.append(json.dumps(cur, separators=(",", ":"), ensure_ascii=False))
    return out


def _decode_ops(text: str) -> list[Put | Delete]:
    out: list[Put | Delete] = []
    for enc in json.loads(text):
        out.append(Put(enc[1], enc[2], enc[3]) if enc[0] == "p" else Delete(enc[1], enc[2]))
    return out


async def _rows_in(snap: Snapshot, staged: list[Put | Delete], lo: str, hi: str,
                   size: int) -> AsyncIterator[list[Row]]:
    """The rows of [lo, hi) in one snapshot, committed staged batches laid over them, ``size`` at a time."""
    cursor = lo
    while True:
        rows = await snap.read(Range(cursor, hi, size))
        if not rows and not staged:
            return
        upto = prefix_end(rows[-1].key + "\0") if len(rows) == size else hi
        found = {r.key: r for r in rows}
        _overlay(found, staged, cursor, upto)
        out = [r for _, r in sorted(found.items())]
        if out:
            yield out
        if len(rows) < size:
            return
        cursor = rows[-1].key + "\0"


def _overlay(found: dict[str, Row], staged: list[Put | Delete], lo: str, hi: str) -> None:
    """Lay committed staged operations over rows read in [lo, hi)."""
    for op in staged:
        if isinstance(op, Put):
            if lo <= op.key < hi:
                found[op.key] = Row(op.key, op.value, 0, op.lease)
        elif op.end:
            for k in [k for k in found if op.key <= k < op.end]:
                del found[k]
        else:
            found.pop(op.key, None)


def _keys(compares: list[Compare]) -> str:
    names = [c.key.split("/", 2)[-1] for c in compares]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
