"""Our ramfs driven by p9fs 0.0.4's py9p client, over 9P2000, 9P2000.u and 9P2000.L.

The driver (drive_p9fs.py) runs once per dialect in its own process, one
step per operation; each test below checks one group of steps. Files the test
prepared are read by p9fs, and what p9fs wrote is read back with our client.
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass
from typing import Any

import pytest

from fornax_sched.fs.client import Client

from ..conftest import start_ramfs, stop
from .util import PREPARED, drive, failed, ok, ours, prepare

QTDIR, QTFILE = 0x80, 0x00
DMDIR = 0x80000000
DT_DIR, DT_REG = 4, 8
WRITTEN = b"written by p9fs\nsecond write at an offset\n"  # the driver's two writes


@dataclass
class Run:
    dialect: str
    steps: dict[str, dict[str, Any]]
    content: bytes  # from-p9fs.txt as our client reads it afterwards
    names: set[str]  # the root as our client lists it afterwards

    @property
    def dotl(self) -> bool:
        return self.dialect == "9P2000.L"


@pytest.fixture(scope="module", params=["9P2000", "9P2000.u", "9P2000.L"])
def run(request: pytest.FixtureRequest) -> Run:
    server = start_ramfs()
    try:
        prepare(server)
        steps = drive("drive_p9fs.py", "p9fs", server, request.param)

        async def look(c: Client) -> tuple[bytes, set[str]]:
            return await c.read_file("from-p9fs.txt"), {f.name for f in await c.ls("")}

        content, names = ours(server, look)
    finally:
        stop(server)
    return Run(request.param, steps, content, names)


def test_attach(run: Run) -> None:
    assert ok(run.steps, "attach") == {"msize": 8192, "version": run.dialect}
    root = ok(run.steps, "root")
    assert root["qid_type"] == QTDIR
    if run.dotl:
        assert root["mode"] == stat.S_IFDIR | 0o777
    else:
        assert root["mode"] == DMDIR | 0o777


def test_walk_open_read_prepared_file(run: Run) -> None:
    w = ok(run.steps, "walk_prepared")
    assert w["wqid_types"] == [QTDIR, QTFILE]
    assert w["open_qid_type"] == QTFILE
    assert 0 < w["iounit"] <= 8192 - 24
    assert w["data"].encode("latin-1") == PREPARED["sub/note.txt"]


def test_partial_walk(run: Run) -> None:
    # walk(5): "sub" walks, "missing" does not: one qid, no error, newfid not made
    assert ok(run.steps, "walk_partial") == [QTDIR]
    failed(run.steps, "walk_partial_newfid_unused")


def test_missing_file_is_a_sensible_error(run: Run) -> None:
    for step in ("walk_missing", "open_missing"):
        detail = failed(run.steps, step)
        if run.dotl:
            assert detail == errno.ENOENT, f"{step}: Rlerror {detail}"
        else:
            assert "not exist" in detail or "not found" in detail, f"{step}: Rerror {detail!r}"


def test_read_of_unopened_fid_fails(run: Run) -> None:
    detail = failed(run.steps, "read_unopened")
    if run.dotl:
        assert detail == errno.EBADF


def test_create_write_read(run: Run) -> None:
    created = ok(run.steps, "create")
    assert created["qid_type"] == QTFILE
    assert 0 < created["iounit"] <= 8192 - 24
    assert ok(run.steps, "write") == [16, 26]
    assert ok(run.steps, "read_same_fid").encode("latin-1") == WRITTEN
    ok(run.steps, "clunk_created")
    assert ok(run.steps, "read_back").encode("latin-1") == WRITTEN
    assert run.content == WRITTEN  # and our own client agrees


def test_stat(run: Run) -> None:
    st = ok(run.steps, "stat")
    assert st["qid_type"] == QTFILE
    assert st["length"] == len(WRITTEN)
    if run.dotl:
        assert st["mode"] == stat.S_IFREG | 0o644
    else:
        assert st["mode"] == 0o644
        assert st["name"] == "from-p9fs.txt"
        # p9fs attaches as uname "nobody"; on .u it also sends n_uname 0, which takes precedence
        assert st["uid"] == ("root" if run.dialect == "9P2000.u" else "nobody")


def test_mkdir_and_list(run: Run) -> None:
    assert ok(run.steps, "mkdir") == QTDIR
    assert ok(run.steps, "create_scratch") == len(b"temporary")
    entries = {e["name"]: e for e in ok(run.steps, "list_root")}
    assert set(entries) == {"hello.txt", "sub", "from-p9fs.txt", "dir-p9fs", "scratch.txt"}
    for name, e in entries.items():
        is_dir = name in ("sub", "dir-p9fs")
        assert e["qid_type"] == (QTDIR if is_dir else QTFILE), name
        if run.dotl:
            assert e["dtype"] == (DT_DIR if is_dir else DT_REG), name
        else:
            assert bool(e["mode"] & DMDIR) == is_dir, name
    if not run.dotl:
        assert entries["hello.txt"]["length"] == len(PREPARED["hello.txt"])
        assert entries["dir-p9fs"]["mode"] == DMDIR | 0o755
    if run.dialect == "9P2000.u":  # the .u stat extension decoded too
        assert all(isinstance(e["uidnum"], int) for e in entries.values())


def test_remove(run: Run) -> None:
    ok(run.steps, "remove_file")
    ok(run.steps, "remove_dir")
    detail = failed(run.steps, "walk_removed")
    if run.dotl:
        assert detail == errno.ENOENT
    failed(run.steps, "clunk_removed_fid")  # Tremove clunked it
    assert "scratch.txt" not in run.names and "dir-p9fs" not in run.names
    assert {"hello.txt", "sub", "from-p9fs.txt"} <= run.names
    ok(run.steps, "close")
