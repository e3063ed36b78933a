"""What the scheduler asks of a store, whatever kind it is (SQLite by default, etcd next).

The state is a few named tables of JSON values by key, plus an append-only
log of lines.  Every row carries the store's revision at its last change, so
a writer can make a batch conditional on what it read (compare-and-swap),
and a reader can follow changes from a revision on (a watch).  A batch is
all or nothing however large it is: a store with a transaction limit splits
it without a reader or the writer ever seeing half of it.  Leases give keys
a lifetime; a campaign makes one process the leader of a store, and every
batch of a leader is guarded by its leadership, so a deposed leader cannot
commit.

Nothing here does I/O; see ``kv.KVStore`` for the implementation shared by
every store kind, ``sqlite`` for the embedded one and ``etcd`` for the
replicated one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

TABLES = ("placements", "nodes", "meta", "policies")


class StoreError(Exception):
    """The store cannot be reached, read or written: the message says which store and why."""


class Compacted(StoreError):
    """A watch asked for changes the store no longer keeps: read the state again, then watch from its revision."""

    def __init__(self, message: str, compacted: int = 0) -> None:
        super().__init__(message)
        self.compacted = compacted  # the oldest revision still kept, when the store said


class Conflict(StoreError):
    """A batch's requirement did not hold (a row changed since it was read): nothing was written."""


class StoreBusy(StoreError):
    """Another process holds the store's leadership: the message names it."""


class NotLeader(StoreError):
    """This process lost its leadership: nothing it writes is committed any more."""


@dataclass(frozen=True, slots=True)
class Item:
    """One row as read: its value and the revision of its last change."""

    key: str
    value: Any
    revision: int


@dataclass(frozen=True, slots=True)
class Event:
    """One change seen by a watch; ``value`` None means the row was deleted."""

    table: str
    key: str
    value: Any
    revision: int


LogLine = str | tuple[float, str]  # a log line; with its time if it was made before the commit


@dataclass
class Batch:
    """Changes that land together or not at all, with the conditions they need.

    ``require(table, key, revision)`` makes the batch conditional: the row's
    revision must still be ``revision`` (0: the row must not exist).  A
    failed condition raises Conflict and writes nothing.
    """

    puts: list[tuple[str, str, Any, int]] = field(default_factory=list)  # (table, key, JSON value, lease)
    deletes: list[tuple[str, str]] = field(default_factory=list)
    requires: list[tuple[str, str, int]] = field(default_factory=list)
    log: list[LogLine] = field(default_factory=list)  # a line, or (when it was written, line)

    def put(self, table: str, key: str, value: Any, lease: int = 0) -> Batch:
        check_table(table)
        self.puts.append((table, key, value, lease))
        return self

    def delete(self, table: str, key: str) -> Batch:
        check_table(table)
        self.deletes.append((table, key))
        return self

    def require(self, table: str, key: str, revision: int) -> Batch:
        check_table(table)
        self.requires.append((table, key, revision))
        return self

    def note(self, line: LogLine) -> Batch:
        self.log.append(line)
        return self

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes or self.log or self.requires)

    def __len__(self) -> int:
        """Operations it takes (conditions not counted)."""
        return len(self.puts) + len(self.deletes) + len(self.log)


def check_table(table: str) -> None:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")


class Lease(Protocol):
    """A lifetime for keys: they go when it expires or is revoked."""

    id: int
    ttl: float

    async def keepalive(self) -> bool:
        """Renew it; False if it had already expired (its keys are gone)."""
        ...

    async def revoke(self) -> None: ...


class Leadership(Protocol):
    """This process leads the store until ``lost`` is set (or it resigns)."""

    identity: str
    lost: asyncio.Event

    async def resign(self) -> None: ...


class Store(Protocol):
    """The store interface; every kind passes tests/store's conformance suite."""

    kind: str  # "sqlite", "etcd"
    where: str  # how messages name it: the file, the endpoints
    cluster: str  # the identity of the state it holds (made when the store was created)
    max_ops: int  # operations one transaction may hold; larger batches are split

    @property
    def revision(self) -> int:
        """The revision of the last change this store object saw."""
        ...

    async def probe(self, write: bool = False) -> str | None:
        """The cluster identity the store holds now (None: none); with ``write`` a small write too."""
        ...

    async def get(self, table: str, key: str) -> Item | None: ...

    def scan(self, table: str, start: str = "", size: int = 5000) -> AsyncIterator[list[Item]]:
        """A table's rows in key order, ``size`` at a time, from ``start`` on."""
        ...

    async def load(self, table: str) -> dict[str, Any]: ...

    async def apply(self, batch: Batch) -> int:
        """Commit a batch, all or nothing, durably; returns its revision (Conflict, StoreError)."""
        ...

    async def log_tail(self, n: int) -> list[tuple[float, str]]:
        """The last ``n`` log lines (oldest first), with when each was committed."""
        ...

    def watch(self, tables: tuple[str, ...], since: int) -> Watch:
        """Changes to ``tables`` after revision ``since``, one list per committed batch."""
        ...

    async def grant(self, ttl: float) -> Lease: ...

    async def campaign(self, name: str, identity: str, ttl: float, wait: bool = True) -> Leadership:
        """Become the leader of ``name``; with ``wait`` False a held leadership raises StoreBusy."""
        ...

    async def leader(self, name: str) -> str | None:
        """The identity of the current leader, if any."""
        ...

    async def close(self) -> None: ...


class Watch(Protocol):
    def __aiter__(self) -> AsyncIterator[list[Event]]: ...

    async def close(self) -> None: ...
