"""Where the scheduler's state lives: a store, chosen by a URL, behind one interface.

    store = await open_store("sqlite:/var/lib/fornax/sched.db")   # or a plain path
    store = await open_store("etcd://10.0.0.1:2379,10.0.0.2:2379/cluster-a")
    rev = await store.apply(Batch().put("placements", "web-1", {...}))

Kinds register here (``KINDS``); each implements the KV primitive of
``kv`` and gets the rest (tables, batches of any size, the log, watches,
leases, leadership) from ``kv.KVStore``.  See api.py for the interface and
tests/store for the conformance suite every kind passes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .api import (
    TABLES,
    Batch,
    Compacted,
    Conflict,
    Event,
    Item,
    Leadership,
    Lease,
    NotLeader,
    Store,
    StoreBusy,
    StoreError,
    Watch,
)
from .kv import KV, KVStore
from .sqlite import SYNC_MODES, SqliteKV

__all__ = [
    "KINDS", "TABLES", "Batch", "Compacted", "Conflict", "Event", "Item", "KVStore", "Leadership", "Lease", "NotLeader",
    "Store", "StoreBusy", "StoreError", "Watch", "open_kv", "open_store",
]


async def _sqlite(where: str, *, create: bool, fresh: bool, clock: Callable[[], float], **kw: Any) -> KV:
    path, sep, query = where.rpartition("?")
    if sep and query.startswith("sync="):  # PATH?sync=full|normal (a plain path may hold a '?' of its own)
        sync = query.removeprefix("sync=")
        if sync not in SYNC_MODES:
            raise StoreError(f"sqlite:{where}: sync={sync!r}: want {' or '.join(SYNC_MODES)}")
        return await SqliteKV.open(Path(path), create=create, fresh=fresh, clock=clock, sync=sync, **kw)
    return await SqliteKV.open(Path(where), create=create, fresh=fresh, clock=clock, **kw)


async def _etcd(where: str, *, create: bool, fresh: bool, clock: Callable[[], float], **kw: Any) -> KV:
    from .etcd import EtcdKV  # gRPC is loaded only by those who use etcd

    return await EtcdKV.open(where, create=create, fresh=fresh, clock=clock, **kw)


KINDS: dict[str, Callable[..., Awaitable[KV]]] = {"sqlite": _sqlite, "etcd": _etcd}


def parse(spec: str) -> tuple[str, str]:
    """``KIND:WHERE`` (``sqlite:/path``, ``etcd://host:port``), or a plain path (SQLite)."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        return kind, rest.removeprefix("//") if kind != "sqlite" else rest
    if sep and kind.isalpha() and rest.startswith("//"):
        raise StoreError(f"unknown store kind {kind!r} in {spec!r}: want {', '.join(sorted(KINDS))}")
    return "sqlite", spec


async def open_kv(spec: str, *, create: bool = True, fresh: bool = False,
                  clock: Callable[[], float] = time.time, **kw: Any) -> KV:
    kind, where = parse(spec)
    return await KINDS[kind](where, create=create, fresh=fresh, clock=clock, **kw)


async def open_store(spec: str, *, create: bool = True, fresh: bool = False, clock: Callable[[], float] = time.time,
                     log_keep: int = 100_000, **kw: Any) -> KVStore:
    """Open (or, if there is none and ``create``, make) the store ``spec`` names.

    A store that exists but holds no state (an empty or truncated file, say)
    is an error, not a new store, unless ``fresh``: that would forget what
    should run.
    """
    kv = await open_kv(spec, create=create, fresh=fresh, clock=clock, **kw)
    try:
        return await KVStore.open(kv, clock=clock, log_keep=log_keep)
    except BaseException:
        await kv.close()
        raise
