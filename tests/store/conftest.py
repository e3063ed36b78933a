"""The store kinds the conformance suite runs over.

Each kind is a factory ``open(path, **kw) -> KVStore``.  ``sqlite-small``
is SQLite with a transaction limit of 6 operations, so that every large
batch takes the staged path that etcd's 128-operation limit will need.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fornax_sched.sched.store import KVStore, open_store

Opener = Callable[..., Awaitable[KVStore]]

KINDS = {
    "sqlite": {},
    "sqlite-small": {"max_ops": 6},
}


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def opener(kind: str, tmp_path: Path) -> Opener:
    """Open the store of this kind at a fixed place in the test's directory (again, to reopen it)."""
    extra = KINDS[kind]

    async def open_(**kw: Any) -> KVStore:
        return await open_store(str(tmp_path / "state" / "sched.db"), **{**extra, **kw})

    return open_
