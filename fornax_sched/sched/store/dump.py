"""A store's state as a file, and back: what ``fornax-sched store export`` and ``import`` write and read.

The file is JSON lines, versioned by its first line:

    {"format": "fornax-sched-store", "version": 1, "cluster": ID, "identity": {...},
     "kind": "sqlite", "from": WHERE, "revision": N, "exported": UNIX-TIME}
    {"table": "placements", "key": "web-1", "value": {...}}        one line per row
    {"log": "placed web-1 on fornax-01", "at": UNIX-TIME}          one line per log line, oldest first
    {"end": true, "rows": N, "lines": M}                           the last line: a cut file is refused

The rows are read from one snapshot (a scheduler may keep serving while it
is exported).  Leases do not travel: a row put under a lease is exported as
a plain row.  An import reads and checks the whole file before it writes,
and writes it in one all-or-nothing commit, under the store's leadership (it
refuses while a scheduler serves that store).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .api import TABLES, StoreError
from .kv import KVStore

FORMAT = "fornax-sched-store"
VERSION = 1


@dataclass
class Dump:
    identity: dict[str, Any]
    rows: dict[str, dict[str, Any]] = field(default_factory=lambda: {t: {} for t in TABLES})
    log: list[tuple[float, str]] = field(default_factory=list)
    revision: int = 0
    source: str = ""

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.rows.values())


async def export(store: KVStore, path: str, *, force: bool = False, clock: Any = time.time) -> Dump:
    """Write the store's state to ``path`` ("-": standard output); what was written."""
    out = Dump({})
    target = None if path == "-" else Path(path)
    if target is not None and target.exists() and not force:
        raise StoreError(f"{path} exists: refusing to write over it (use --force)")
    tmp = None if target is None else target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with contextlib.ExitStack() as stack:
            f: IO[str] = stack.enter_context(open(tmp, "w", encoding="utf-8")) if tmp is not None else sys.stdout
            lines = 0
            async for what, a, b in store.dump():
                if what == "identity":
                    out.identity, out.revision = b, a
                    f.write(json.dumps({"format": FORMAT, "version": VERSION, "cluster": store.cluster,
                                        "identity": b, "kind": store.kind, "from": store.where,
                                        "revision": a, "exported": clock()}) + "\n")
                elif what == "log":
                    out.log.append((a, b))
                    f.write(json.dumps({"log": b, "at": a}, ensure_ascii=False) + "\n")
                    lines += 1
                else:
                    out.rows[what][a] = b
                    f.write(json.dumps({"table": what, "key": a, "value": b}, ensure_ascii=False) + "\n")
            f.write(json.dumps({"end": True, "rows": out.count, "lines": lines}) + "\n")
            f.flush()
            if tmp is not None:
                os.fsync(f.fileno())
        if tmp is not None and target is not None:
            os.replace(tmp, target)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return out


def read(path: str) -> Dump:
    """Read and check a whole dump; any fault is one line naming the file and the line."""
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        return _parse(path, _lines(path, f))


def _lines(path: str, f: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    n = 0
    try:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise StoreError(f"{path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise StoreError(f"{path} line {n}: want a JSON object")
            yield n, obj
    except UnicodeDecodeError:
        raise StoreError(f"{path} line {n + 1}: not UTF-8 text") from None


def _parse(path: str, lines: Iterator[tuple[int, dict[str, Any]]]) -> Dump:
    first = next(lines, None)
    if first is None:
        raise StoreError(f"{path} is empty: not a store export")
    n, head = first
    if head.get("format") != FORMAT:
        raise StoreError(f"{path} line {n}: not a fornax-sched store export (no \"format\": \"{FORMAT}\")")
    if head.get("version") != VERSION:
        raise StoreError(f"{path}: export format version {head.get('version')!r}, this fornax-sched reads {VERSION}")
    identity = head.get("identity")
    if not isinstance(identity, dict) or not isinstance(identity.get("cluster"), str):
        raise StoreError(f"{path} line {n}: the header has no identity with a cluster")
    dump = Dump(identity, revision=int(head.get("revision") or 0), source=str(head.get("from", "")))
    end = None
    for n, obj in lines:
        if end is not None:
            raise StoreError(f"{path} line {n}: something after the last line")
        if "table" in obj:
            table, key = obj.get("table"), obj.get("key")
            if table not in TABLES:
                raise StoreError(f"{path} line {n}: unknown table {table!r} (want {', '.join(TABLES)})")
            if not isinstance(key, str) or not key or "value" not in obj:
                raise StoreError(f"{path} line {n}: a row wants a key (a non-empty string) and a value")
            if key in dump.rows[table]:
                raise StoreError(f"{path} line {n}: {table} {key!r} a second time")
            dump.rows[table][key] = obj["value"]
        elif "log" in obj:
            line, at = obj.get("log"), obj.get("at")
            if not isinstance(line, str) or not isinstance(at, int | float):
                raise StoreError(f"{path} line {n}: a log line wants \"log\" (a string) and \"at\" (a time)")
            dump.log.append((float(at), line))
        elif obj.get("end") is True:
            end = obj
            if end.get("rows") != dump.count or end.get("lines") != len(dump.log):
                raise StoreError(f"{path} line {n}: the last line counts {end.get('rows')} rows and "
                                 f"{end.get('lines')} log lines, the file holds {dump.count} and {len(dump.log)}")
        else:
            raise StoreError(f"{path} line {n}: neither a row, a log line nor the last line")
    if end is None:
        raise StoreError(f"{path} ends without its last line (cut short?): nothing was imported")
    return dump


async def holds(store: KVStore) -> tuple[int, int]:
    """Rows and log lines the store holds (to refuse importing over them)."""
    rows = 0
    for table in TABLES:
        async for items in store.scan(table):
            rows += len(items)
    return rows, len(await store.log_tail(1))


async def import_(store: KVStore, dump: Dump, *, force: bool = False, clock: Any = time.time) -> int:
    """Make ``store`` hold what ``dump`` holds; refuses a store that holds state unless ``force``."""
    rows, lines = await holds(store)
    if (rows or lines) and not force:
        raise StoreError(f"the store {store.where} holds state already ({rows} rows"
                         f"{', and log lines' if lines else ''}): refusing to import over it; --force replaces "
                         "what it holds, --fresh starts a new store (SQLite keeps the old file aside)")
    identity = {**dump.identity, "imported": clock(), "imported_from": dump.source}
    lead = await store.campaign("scheduler", "fornax-sched store import", 10, wait=False)
    try:
        return await store.replace(dump.rows, dump.log, identity)
    finally:
        await lead.resign()
