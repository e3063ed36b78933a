"""The store kinds the conformance suite runs over.

Each kind is a store URL (``spec``) and the options to open it with.
``sqlite-small`` is SQLite with a transaction limit of 6 operations, so that
every large batch takes the staged path; ``etcd`` is one real etcd member
and ``etcd-3`` a real cluster of three (with a limit of 16 operations), started once per session on free
loopback ports (each test has a key prefix of its own in them).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fornax_sched.sched.store import KVStore, open_store

from ..etcd_cluster import EtcdCluster

Opener = Callable[..., Awaitable[KVStore]]

KINDS: dict[str, dict[str, Any]] = {
    "sqlite": {},
    "sqlite-small": {"max_ops": 6},
    "etcd": {},
    "etcd-3": {"max_ops": 16},  # with a small limit, so that batches take the staged path here too
}
TTL = {"sqlite": 5.0, "sqlite-small": 5.0, "etcd": 3.0, "etcd-3": 3.0}  # a campaign's lease in the tests
_prefixes = itertools.count(1)


def _cluster(factory: pytest.TempPathFactory, members: int) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(factory.mktemp(f"etcd{members}"), members=members)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for the whole session."""
    yield from _cluster(tmp_path_factory, 1)


@pytest.fixture(scope="session")
def etcd3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A cluster of three etcd members for the whole session."""
    yield from _cluster(tmp_path_factory, 3)


def unique_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[-60:]
    return f"t{next(_prefixes)}-{name}"


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def spec(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The URL of this test's store of this kind (the same each time it is asked: to reopen it)."""
    if kind.startswith("etcd"):
        cluster: EtcdCluster = request.getfixturevalue("etcd3" if kind == "etcd-3" else "etcd1")
        return cluster.spec(unique_prefix(request))
    return str(tmp_path / "state" / "sched.db")


@pytest.fixture
def opener(kind: str, spec: str) -> Opener:
    """Open this test's store (again, to reopen it)."""
    extra = KINDS[kind]

    async def open_(**kw: Any) -> KVStore:
        return await open_store(spec, **{**extra, **kw})

    return open_
