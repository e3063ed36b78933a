"""The client against a hung peer: a real ramfs process under SIGSTOP.

A stopped process keeps its socket open (the kernel even accepts and buffers
for it), so nothing but the client's own timeouts can end a call to it.
Every call must end within its timeout plus one timeout for the Tflush, and
then the connection is known dead.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from fornax_sched.fs import codec as M
from fornax_sched.fs import proto as P
from fornax_sched.fs.client import Client

from ..conftest import ServerProc
from ..helpers import run
from .util import eventually

TIMEOUT = 1.0
SLACK = 2.0  # scheduling on a loaded machine; far below "for ever"



async def connected(server: ServerProc) -> tuple[Client, int]:
    """A client with ``f`` written and a fid open on it for reading."""
    c = await Client.connect(server.addr, uname="glenda", timeout=TIMEOUT)
    await c.write_file("f", b"hello\n", create=True)
    fid = await c.walk("f")
    await c.open(fid)
    return c, fid


def test_a_stopped_server_is_declared_dead_within_two_timeouts(ramfs: ServerProc) -> None:
    async def main() -> None:
        c, fid = await connected(ramfs)
        os.kill(ramfs.proc.pid, signal.SIGSTOP)
        # Another request with a long timeout of its own is waiting when the peer is declared dead.
        other = asyncio.ensure_future(c.rpc(M.Tgetattr(0, c.root, P.GETATTR_BASIC), timeout=60))
        start = time.monotonic()
        read = asyncio.ensure_future(c.read(fid, 0, 100))
        await eventually(lambda: len(c._waiting) == 2, TIMEOUT)
        in_flight = set(c._waiting)
        with pytest.raises(TimeoutError, match=r"Tread .* timed out after 1s; .* did not answer a Tflush"):
            await asyncio.wait_for(read, 2 * TIMEOUT + SLACK)
        elapsed = time.monotonic() - start
        assert TIMEOUT <= elapsed < 2 * TIMEOUT + SLACK
        with pytest.raises(ConnectionError, match=ramfs.addr):
            await asyncio.wait_for(other, 0.5)
        # Later calls fail at once, naming the peer, without waiting for any timeout.
        with pytest.raises(ConnectionError, match=ramfs.addr):
            await asyncio.wait_for(c.read_file("f"), TIMEOUT / 2)
        assert c._flushing == set() and c._waiting == {}
        # The tags whose flush went unanswered are never handed out again.
        assert not in_flight & set(c._free_tags)
        await c.close()

        os.kill(ramfs.proc.pid, signal.SIGCONT)
        async with await Client.connect(ramfs.addr, uname="glenda", timeout=TIMEOUT) as fresh:
            assert await fresh.read_file("f") == b"hello\n"
    run(main())


def test_connecting_to_a_stopped_server_times_out(ramfs: ServerProc) -> None:
    async def main() -> None:
        os.kill(ramfs.proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="Tversion"):
            await asyncio.wait_for(Client.connect(ramfs.addr, timeout=TIMEOUT), TIMEOUT + SLACK)
        assert time.monotonic() - start >= TIMEOUT
    run(main())


def test_a_cancelled_caller_leaves_no_unbounded_flush(ramfs: ServerProc) -> None:
    async def main() -> None:
        c, fid = await connected(ramfs)
        os.kill(ramfs.proc.pid, signal.SIGSTOP)
        task = asyncio.ensure_future(c.read(fid, 0, 100))
        await eventually(lambda: len(c._waiting) == 1, TIMEOUT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(c._flushing) == 1  # the flush goes on without its caller, on its own clock
        flush = next(iter(c._flushing))
        assert await asyncio.wait_for(flush, TIMEOUT + SLACK) is False
        assert c._gone is not None and ramfs.addr in str(c._gone)
        with pytest.raises(ConnectionError):
            await c.read(fid, 0, 100)
        await c.close()
    run(main())


def test_a_caller_cancelled_while_its_flush_waits_leaves_it_bounded(ramfs: ServerProc) -> None:
    async def main() -> None:
        c, fid = await connected(ramfs)
        os.kill(ramfs.proc.pid, signal.SIGSTOP)
        task = asyncio.ensure_future(c.read(fid, 0, 100))
        await eventually(lambda: len(c._flushing) == 1, TIMEOUT + SLACK)  # timed out; flushing
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        flush = next(iter(c._flushing))
        assert await asyncio.wait_for(flush, TIMEOUT + SLACK) is False
        assert c._gone is not None
        await c.close()
    run(main())


@pytest.mark.parametrize("op", ["write_file", "read_file", "ls", "stat_path"])
def test_the_error_a_request_met_is_not_hidden_by_the_clunk_after_it(op: str) -> None:
    """A whole-path operation whose request times out on a peer then declared dead still clunks its
    fid, and that clunk cannot go out: the caller must see the timeout, which names the request,
    not the clunk's "connection closed" (the CLI said only that a Tflush went unanswered)."""
    from fornax_sched.fs.clientcore import ClientCore
    from fornax_sched.fs.codec import Qid

    core = ClientCore(("tcp", "127.0.0.1", 1), TIMEOUT)
    gen = {"write_file": lambda: core._op_write_file("f", b"x", False, True),
           "read_file": lambda: core._op_read_file("f"), "ls": lambda: core._op_ls("d"),
           "stat_path": lambda: core._op_stat_path("f")}[op]()
    assert isinstance(next(gen), M.Twalk)
    after_walk = gen.send(M.Rwalk(0, (Qid(0, 0, 7),)))
    late = TimeoutError(f"9P {type(after_walk).__name__} timed out after 1s; did not answer a Tflush")
    assert isinstance(gen.throw(late), M.Tclunk)  # the fid is clunked, whatever happened
    with pytest.raises(TimeoutError) as got:
        gen.throw(ConnectionError("9P server did not answer a Tflush within 1s: connection closed"))
    assert got.value is late
    assert core._free_fids == [1]  # and freed
