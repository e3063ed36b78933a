"""``fornax-sched store``: a store's state to a file and back (docs/store.8.md).

Moving from SQLite to etcd is an export from one and an import into the other.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from .serve import default_state
from .store import StoreError, open_store
from .store import dump as dumpfile


def _spec(args: argparse.Namespace) -> str:
    return args.store or str((args.state or default_state()) / "sched.db")


async def _export(args: argparse.Namespace) -> str:
    store = await open_store(_spec(args), create=False)
    try:
        d = await dumpfile.export(store, args.file, force=args.force)
    finally:
        await store.close()
    return (f"exported {d.count} rows and {len(d.log)} log lines of cluster {d.identity.get('cluster')} "
            f"(revision {d.revision}) from {store.where} to {args.file}")


async def _import(args: argparse.Namespace) -> str:
    d = dumpfile.read(args.file)  # all of it checked before the store is even opened
    store = await open_store(_spec(args), fresh=args.fresh)
    try:
        rev = await dumpfile.import_(store, d, force=args.force)
    finally:
        await store.close()
    return (f"imported {d.count} rows and {len(d.log)} log lines of cluster {d.identity.get('cluster')} "
            f"from {args.file} into {store.where} (revision {rev})")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("store", help="export a store's state to a file, import it into a store",
                       description="Copy the scheduler's state out of a store (SQLite or etcd) to a file of "
                                   "JSON lines, and into a store from one: SQLite to etcd is export then import.")
    ops = p.add_subparsers(dest="op", metavar="OP", required=True)
    for name, helptext in (("export", "write the store's state to FILE ('-': standard output)"),
                           ("import", "make the store hold what FILE holds (refused over state, unless --force)")):
        q = ops.add_parser(name, help=helptext, description=helptext)
        q.add_argument("file", metavar="FILE")
        q.add_argument("--store", default="", metavar="URL",
                       help="sqlite:PATH or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (default: DIR/sched.db of "
                            "--state)")
        q.add_argument("--state", type=Path, default=None,
                       help="state directory (default ~/.local/state/fornax-sched/scheduler)")
        if name == "export":
            q.add_argument("--force", action="store_true", help="write over FILE if it exists")
            q.set_defaults(func=lambda a: _run(a, _export))
        else:
            q.add_argument("--force", action="store_true", help="replace what the store holds")
            q.add_argument("--fresh", action="store_true",
                           help="start the store anew first (SQLite: the old file is kept aside)")
            q.set_defaults(func=lambda a: _run(a, _import))


def _run(args: argparse.Namespace, fn: Any) -> int:
    try:
        print(asyncio.run(fn(args)), flush=True)
    except StoreError as e:
        print(f"fornax-sched store {args.op}: {e}", flush=True)
        return 1
    return 0
