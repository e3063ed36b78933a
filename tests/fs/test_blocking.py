"""The blocking client (what `fornax-sched 9p` uses) against a real ramfs process.

It drives the same operations as the asyncio Client, so the two must give
the same answers and the same errors; and its calls are bounded the same
way against a server that hangs (SIGSTOP).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from fornax_sched.fs import proto as P
from fornax_sched.fs.blocking import BlockingClient
from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error

from ..conftest import ServerProc
from ..helpers import free_port, run

TIMEOUT = 1.0
SLACK = 2.0


@pytest.mark.parametrize("dialect", P.DIALECTS)
def test_the_same_files_and_errors_through_both_clients(ramfs: ServerProc, dialect: str) -> None:
    with BlockingClient.connect(ramfs.addr, version=dialect, uname="glenda", timeout=TIMEOUT) as c:
        c.write_file("greeting", b"hello world\n", create=True)
        c.write_file("big", b"y" * (3 * c.iounit + 5), create=True)  # in pieces of the iounit
        assert c.read_file("/greeting") == b"hello world\n"
        assert c.read_file("big") == b"y" * (3 * c.iounit + 5)
        with pytest.raises(P9Error) as missing:
            c.read_file("greeting/nosuch/deeper")
        names = sorted(e.name for e in c.ls("/"))
        info = c.stat_path("greeting")
        for _ in range(50):  # failed operations clunk what they walked: no fid is lost
            with pytest.raises(P9Error):
                c.read_file("nosuch")
        assert c._next_fid < 10
        with pytest.raises(P9Error, match="^nodir: "):  # create walks to the parent, which is not there
            c.write_file("nodir/f", b"x", create=True)

    async def same() -> None:
        async with await Client.connect(ramfs.addr, version=dialect, uname="glenda", timeout=TIMEOUT) as a:
            assert await a.read_file("greeting") == b"hello world\n"
            assert sorted(e.name for e in await a.ls("/")) == names == ["big", "greeting"]
            ainfo = await a.stat_path("greeting")
            assert (ainfo.length, ainfo.mode, ainfo.name) == (info.length, info.mode, info.name) == (12, 0o666,
                                                                                                   "greeting")
            with pytest.raises(P9Error) as amissing:
                await a.read_file("greeting/nosuch/deeper")
            assert str(amissing.value) == str(missing.value)
            assert "greeting/nosuch" in str(missing.value)
    run(same())


def test_a_refused_dial_and_a_stopped_server(ramfs: ServerProc) -> None:
    port = free_port()
    with pytest.raises(ConnectionError, match=f"cannot dial 9P server tcp!127.0.0.1!{port}: Connection refused"):
        BlockingClient.connect(f"tcp!127.0.0.1!{port}", timeout=TIMEOUT)
    c = BlockingClient.connect(ramfs.addr, version="9P2000.u", uname="glenda", timeout=TIMEOUT)
    try:
        c.write_file("f", b"hello\n", create=True)
        os.kill(ramfs.proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"timed out after 1s; .* did not answer a Tflush within 1s"):
            c.read_file("f")
        assert TIMEOUT <= time.monotonic() - start < 2 * TIMEOUT + SLACK
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=ramfs.addr):  # known dead: at once
            c.read_file("f")
        assert time.monotonic() - start < TIMEOUT / 2
    finally:
        c.close()
    start = time.monotonic()
    with pytest.raises((TimeoutError, ConnectionError)):  # the kernel accepts for it; Tversion goes unanswered
        BlockingClient.connect(ramfs.addr, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + SLACK
    os.kill(ramfs.proc.pid, signal.SIGCONT)
    with BlockingClient.connect(ramfs.addr, uname="glenda", timeout=TIMEOUT) as fresh:
        assert fresh.read_file("f") == b"hello\n"


def test_a_path_longer_than_one_walk_message(ramfs: ServerProc) -> None:
    """Paths of more than 16 names walk in steps; an error names the whole path up to the missing name."""
    deep = "/".join(f"d{i}" for i in range(20))
    with BlockingClient.connect(ramfs.addr, version="9P2000.u", uname="glenda", timeout=TIMEOUT) as c:
        for i in range(20):
            c._drive(c._op_mkdir("/".join(f"d{j}" for j in range(i + 1))))
        c.write_file(f"{deep}/f", b"deep\n", create=True)
        assert c.read_file(f"{deep}/f") == b"deep\n"
        for missing in (f"{deep}/nosuch", "/".join(f"d{i}" for i in range(17)) + "/x/y"):
            want = missing if missing.endswith("nosuch") else missing[:-2]
            for _ in range(20):
                with pytest.raises(P9Error, match=f"^{want}: file does not exist$"):
                    c.read_file(missing)
        used = c._next_fid
        free = list(c._free_fids)
        assert len(free) == len(set(free)), "a fid was freed twice"
        assert used < 10
