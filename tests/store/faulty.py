"""A store that fails on purpose, for tests of what a store failure must not do.

``faulty:PATH`` is SQLite at PATH whose every transaction fails while the
file ``PATH.fail`` exists (its text is the failure's reason, such as
"database or disk is full").  ``python -m tests.store.faulty serve ...``
runs ``fornax-sched`` with this kind registered.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fornax_sched.sched import store
from fornax_sched.sched.store import StoreError
from fornax_sched.sched.store.kv import Compare, Delete, Put
from fornax_sched.sched.store.sqlite import SqliteKV


class FaultyKV(SqliteKV):
    kind = "sqlite"  # what it is underneath; it only fails more

    @property
    def flag(self) -> Path:
        return Path(f"{self.path}.fail")

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> int | None:
        if self.flag.exists():
            why = self.flag.read_text().strip() or "injected failure"
            raise StoreError(f"cannot write the store {self.path}: {why}")
        return await super().txn(compares, ops)


async def _faulty(where: str, *, create: bool, fresh: bool, clock: Any, **kw: Any) -> FaultyKV:
    return await FaultyKV.open(Path(where), create=create, fresh=fresh, clock=clock, **kw)


store.KINDS["faulty"] = _faulty

if __name__ == "__main__":
    from fornax_sched.cli import main

    sys.exit(main(sys.argv[1:]))
