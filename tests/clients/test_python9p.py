"""Our ramfs driven by python-9p 0.1.0: plain 9P2000 through plan9port's C
message codec (convS2M/convM2S), the closest thing to a Plan 9 client here.

The driver (drive_python9p.py) runs once in its own process, one step per
operation; each test below checks one group of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from fornax_sched.fs.client import Client

from ..conftest import start_ramfs, stop
from .util import PREPARED, drive, failed, ok, ours, prepare

QTDIR, QTFILE = 0x80, 0x00
DMDIR = 0x80000000
WRITTEN = b"written by python-9p\n"


@dataclass
class Run:
    steps: dict[str, dict[str, Any]]
    content: bytes  # from-python9p.txt as our client reads it afterwards
    big: bytes  # big.bin as our client reads it afterwards
    names: set[str]  # the root as our client lists it afterwards


@pytest.fixture(scope="module")
def run() -> Run:
    server = start_ramfs()
    try:
        prepare(server)
        steps = drive("drive_python9p.py", "python9p", server)

        async def look(c: Client) -> tuple[bytes, bytes, set[str]]:
            return (await c.read_file("from-python9p.txt"), await c.read_file("big.bin"),
                    {f.name for f in await c.ls("")})

        content, big, names = ours(server, look)
    finally:
        stop(server)
    return Run(steps, content, big, names)


def test_version_auth_attach(run: Run) -> None:
    assert ok(run.steps, "version") == {"version": "9P2000", "msize": 8192}
    # no authentication: Tauth gets an Rerror, attach with afid NOFID works
    assert "not required" in failed(run.steps, "auth")
    assert ok(run.steps, "attach") == QTDIR
    root = ok(run.steps, "root_stat")
    assert root["qid_type"] == QTDIR and root["mode"] == DMDIR | 0o777


def test_walk_open_read_prepared_file(run: Run) -> None:
    w = ok(run.steps, "walk_prepared")
    assert w["wqid_types"] == [QTDIR, QTFILE]
    assert w["open_qid_type"] == QTFILE
    assert 0 < w["iounit"] <= 8192 - 24
    assert w["data"].encode("latin-1") == PREPARED["sub/note.txt"]


def test_partial_walk(run: Run) -> None:
    assert ok(run.steps, "walk_partial") == [QTDIR]
    failed(run.steps, "walk_partial_newfid_unused")


def test_errors(run: Run) -> None:
    assert "not exist" in failed(run.steps, "walk_missing")
    assert "not exist" in failed(run.steps, "open_missing")
    failed(run.steps, "read_unopened")
    assert "directory" in failed(run.steps, "open_dir_for_write").lower()


def test_create_write_read(run: Run) -> None:
    created = ok(run.steps, "create")
    assert created["qid_type"] == QTFILE and 0 < created["iounit"] <= 8192 - 24
    assert ok(run.steps, "write") == len(WRITTEN)
    assert ok(run.steps, "read_same_fid").encode("latin-1") == WRITTEN
    ok(run.steps, "clunk_created")
    assert ok(run.steps, "read_back").encode("latin-1") == WRITTEN
    assert run.content == WRITTEN


def test_stat(run: Run) -> None:
    st = ok(run.steps, "stat")
    assert st["name"] == "from-python9p.txt"
    assert st["qid_type"] == QTFILE
    assert st["mode"] == 0o644
    assert st["length"] == len(WRITTEN)
    assert st["uid"] == "nobody" and st["muid"] == "nobody"
    assert st["mtime"] > 0


def test_file_larger_than_msize(run: Run) -> None:
    assert ok(run.steps, "big_file") == {"writes": 4, "same": True, "length": 25600}
    assert run.big == bytes(range(256)) * 100


def test_mkdir_and_list(run: Run) -> None:
    assert ok(run.steps, "mkdir") == QTDIR
    entries = {e["name"]: e for e in ok(run.steps, "list_root")}
    assert set(entries) == {"hello.txt", "sub", "from-python9p.txt", "big.bin", "dir-python9p"}
    assert entries["hello.txt"]["length"] == len(PREPARED["hello.txt"])
    assert entries["big.bin"]["length"] == 25600
    assert entries["dir-python9p"]["mode"] == DMDIR | 0o755
    assert entries["sub"]["qid_type"] == QTDIR


def test_concurrent_requests_on_one_connection(run: Run) -> None:
    assert ok(run.steps, "concurrent_reads") == [PREPARED["hello.txt"].decode()] * 8
    assert ok(run.steps, "flush_idle") == "Rflush"


def test_wstat_truncates_and_renames(run: Run) -> None:
    assert ok(run.steps, "wstat") == {"after_truncate": 4, "name": "renamed.txt", "length": 4}


def test_remove(run: Run) -> None:
    ok(run.steps, "remove")
    assert "not exist" in failed(run.steps, "walk_removed")
    failed(run.steps, "clunk_removed_fid")  # Tremove clunked it
    ok(run.steps, "clunk_root")
    assert run.names == {"hello.txt", "sub", "from-python9p.txt", "big.bin"}
