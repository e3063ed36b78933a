"""The sans-IO Session on its own: bytes in, Output out; no sockets, no event loop.

A file whose read waits is a coroutine the session hands out; these tests
run such coroutines by hand (``drive``) or drop them, as a flush or a
Tversion says, and check what the session lets out afterwards.
"""

from __future__ import annotations

import errno
from collections.abc import Generator
from typing import Any

import pytest

from fornax_sched.fs import codec as M
from fornax_sched.fs import proto as P
from fornax_sched.fs.codec import CODECS, Framer, Message
from fornax_sched.fs.session import Config, Output, Session, Users, Work
from fornax_sched.fs.tree import Ctx, Dir, File


class Gate:
    """An awaitable that suspends once, then gives its text: a read that waits, with no event loop."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __await__(self) -> Generator[None, None, str]:
        yield
        return self.text


async def waits(ctx: Ctx) -> str:
    return await Gate("woken\n")


closed: list[bytes] = []


async def command(ctx: Ctx, data: bytes) -> str:
    """A ctl write whose reply takes a while (a container being started)."""
    return await Gate(f"did {data.decode()}\n")


async def on_close(ctx: Ctx, data: bytes) -> None:
    await Gate("")
    closed.append(data)


def tree() -> Dir:
    return Dir("", [
        File("wait", read=waits, uid="glenda"),
        File("now", read=lambda ctx: "now\n", uid="glenda"),
        File("doc", write=lambda ctx, data: None, close=on_close, uid="glenda", mode=0o666),
        File("ctl", read=lambda ctx: "usage\n", write=command, uid="glenda", mode=0o666),
    ], uid="glenda", mode=0o777)


def drive(work: Work) -> Any:
    """Run a coroutine the session handed out to its end."""
    try:
        while True:
            work.send(None)
    except StopIteration as stop:
        return stop.value


class Peer:
    """The other end of the wire, speaking whole messages."""

    def __init__(self, config: Config | None = None, dialect: str = P.VERSION_9P) -> None:
        self.session = Session(config or Config(lambda ctx, aname: tree()))
        self.dialect = dialect
        self.codec = CODECS[P.VERSION_9P]
        self.work: dict[int, Work] = {}

    def send(self, *msgs: Message, now: float = 0) -> Output:
        self.session.receive_data(b"".join(self.codec.encode(m) for m in msgs))
        out = self.session.process(now)
        self.work.update(out.start)
        return out

    def replies(self, out: Output) -> list[Any]:
        framer = Framer(1 << 20)
        framer.feed(b"".join(out.send))
        got = []
        while (frame := framer.next_frame()) is not None:
            got.append(self.codec.decode(frame))
        return got

    def rpc(self, msg: Message, now: float = 0) -> Any:
        out = self.send(msg, now=now)
        (reply,) = self.replies(out)
        return reply

    def finish(self, token: int) -> list[Any]:
        """Run work ``token`` to its end and return what the session sends for it."""
        return self.replies(self.session.finished(token, drive(self.work.pop(token))))

    def handshake(self, uname: str = "glenda", n_uname: int = P.NONUNAME) -> None:
        reply = self.rpc(M.Tversion(P.NOTAG, 8192, self.dialect))
        assert reply.version == self.dialect
        self.codec = CODECS[self.dialect]
        assert isinstance(self.rpc(M.Tattach(1, 0, P.NOFID, uname, "", n_uname)), M.Rattach)
        assert self.session.attached

    def open(self, fid: int, name: str, mode: int = P.OREAD) -> None:
        assert isinstance(self.rpc(M.Twalk(1, 0, fid, (name,))), M.Rwalk)
        lopen = self.codec.dotl
        reply = self.rpc(M.Tlopen(1, fid, mode) if lopen else M.Topen(1, fid, mode))
        assert isinstance(reply, M.Rlopen if lopen else M.Ropen), reply


def test_a_read_that_waits_is_work_and_its_reply_comes_when_it_ends() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "wait")
    out = p.send(M.Tread(10, 1, 0, 100))
    assert out.send == [] and [t for t, _ in out.start] == [1] and p.session.in_flight == 1
    assert isinstance(p.rpc(M.Tstat(11, 0)), M.Rstat)  # answered while the read waits
    (reply,) = p.finish(1)
    assert isinstance(reply, M.Rread) and reply.tag == 10 and reply.data == b"woken\n"
    assert p.session.in_flight == 0


def test_a_tag_in_flight_is_refused_as_a_duplicate() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "wait")
    p.open(2, "now")
    p.send(M.Tread(10, 1, 0, 100))
    for dup in (M.Tread(10, 2, 0, 100), M.Tflush(10, 99)):
        r = p.rpc(dup)
        assert isinstance(r, M.Rerror) and r.tag == 10 and r.ename == "duplicate tag"
    (reply,) = p.finish(1)  # the first request with that tag is still answered
    assert isinstance(reply, M.Rread) and reply.tag == 10
    assert isinstance(p.rpc(M.Tread(10, 2, 0, 100)), M.Rread)  # and the tag is free again


def test_flush_of_a_request_in_flight_cancels_it_and_its_reply_never_goes_out() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "wait")
    token = p.send(M.Tread(10, 1, 0, 100)).start[0][0]
    out = p.send(M.Tflush(11, 10))
    assert out.cancel == [token] and out.start == []
    (reply,) = p.replies(out)
    assert isinstance(reply, M.Rflush) and reply.tag == 11  # the flush's tag, not oldtag
    assert p.session.in_flight == 0
    # Work the shell could not stop in time ends anyway: nothing is sent for it.
    assert p.finish(token) == []
    assert p.session.finished(token, RuntimeError("late")) == Output()
    # The flushed tag may be used again at once.
    p.open(2, "wait")
    token2 = p.send(M.Tread(10, 2, 0, 100)).start[0][0]
    assert token2 != token and [r.tag for r in p.finish(token2)] == [10]


def test_flush_of_a_tag_not_in_flight_is_answered_at_once() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "now")
    assert isinstance(p.rpc(M.Tread(10, 1, 0, 100)), M.Rread)  # answered: no longer in flight
    for oldtag in (10, 999, P.NOTAG):
        out = p.send(M.Tflush(12, oldtag))
        assert out.cancel == [] and [type(r) for r in p.replies(out)] == [M.Rflush]


def test_flushes_in_one_burst_are_answered_in_order() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "wait")
    p.open(2, "wait")
    a = p.send(M.Tread(10, 1, 0, 100)).start[0][0]
    b = p.send(M.Tread(11, 2, 0, 100)).start[0][0]
    out = p.send(M.Tflush(20, 11), M.Tflush(21, 10), M.Tflush(22, 10))
    assert out.cancel == [b, a]
    assert [(type(r), r.tag) for r in p.replies(out)] == [(M.Rflush, 20), (M.Rflush, 21), (M.Rflush, 22)]
    assert p.finish(a) == p.finish(b) == []


def test_tversion_aborts_everything_in_flight_and_clunks_every_fid() -> None:
    closed.clear()
    p = Peer()
    p.handshake()
    p.open(1, "wait")
    p.open(2, "doc", P.OWRITE)
    assert isinstance(p.rpc(M.Twrite(1, 2, 0, b"kept")), M.Rwrite)
    a = p.send(M.Tread(10, 1, 0, 100)).start[0][0]
    out = p.send(M.Tversion(P.NOTAG, 8192, P.VERSION_9P))
    assert out.cancel == [a]
    assert [type(r) for r in p.replies(out)] == [M.Rversion]
    # The orderly close of the written file is work too, with no reply of its own.
    ((close, _),) = out.start
    assert p.finish(close) == [] and closed == [b"kept"]
    assert p.finish(a) == []  # the aborted read never answers
    assert p.session.fids == {} and not p.session.attached and p.session.in_flight == 0
    assert isinstance(p.rpc(M.Tstat(1, 0)), M.Rerror)  # the root fid went too


def test_requests_before_tversion_are_refused() -> None:
    p = Peer()
    r = p.rpc(M.Tattach(1, 0, P.NOFID, "glenda", "", P.NONUNAME))
    assert isinstance(r, M.Rerror) and "Tversion" in r.ename


def test_only_max_inflight_requests_start_and_the_rest_wait_in_the_buffer() -> None:
    p = Peer(Config(lambda ctx, aname: tree(), max_inflight=2))
    p.handshake()
    for fid in (1, 2, 3):
        p.open(fid, "wait")
    out = p.send(M.Tread(10, 1, 0, 9), M.Tread(11, 2, 0, 9), M.Tread(12, 3, 0, 9))
    assert len(out.start) == 2 and p.session.saturated and p.session.framer.buffered() > 0
    assert p.session.process(0) == Output()  # nothing more until one finishes
    first = out.start[0][0]
    assert [r.tag for r in p.finish(first)] == [10]
    out = p.session.process(0)
    p.work.update(out.start)
    assert len(out.start) == 1 and p.session.framer.buffered() == 0
    assert sorted(r.tag for t in list(p.work) for r in p.finish(t)) == [11, 12]


def test_process_returns_after_a_batch_and_says_there_is_more() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "now")
    out = p.send(*[M.Tread(100 + i, 1, 0, 100) for i in range(50)])
    replies = len(p.replies(out))
    assert replies == 50 and not out.more
    p.session.receive_data(b"".join(p.codec.encode(M.Tread(200 + i, 1, 0, 100)) for i in range(50)))
    out = p.session.process(0, budget=100)
    assert out.more and len(p.replies(out)) < 50
    while out.more:
        out = p.session.process(0, budget=100)
        replies += len(p.replies(out))
    assert p.session.framer.buffered() == 0


def test_a_broken_stream_asks_for_a_hangup_after_what_came_before() -> None:
    p = Peer()
    p.handshake()
    p.session.receive_data(p.codec.encode(M.Tstat(5, 0)) + (3).to_bytes(4, "little"))
    out = p.session.process(0)
    assert [r.tag for r in p.replies(out)] == [5] and out.hangup and "outside" in out.hangup


def test_the_time_setattr_records_is_the_one_passed_in() -> None:
    p = Peer(dialect=P.VERSION_9PL)
    p.handshake()
    p.rpc(M.Twalk(1, 0, 1, ("now",)))
    r = p.rpc(M.Tsetattr(1, 1, P.SETATTR_MTIME | P.SETATTR_ATIME, 0, 0, 0, 0, 0, 0, 0, 0), now=1234567.8)
    assert isinstance(r, M.Rsetattr)
    a = p.rpc(M.Tgetattr(1, 1, P.GETATTR_BASIC))
    assert (a.mtime_sec, a.atime_sec) == (1234567, 1234567)
    r = p.rpc(M.Tsetattr(1, 1, P.SETATTR_MTIME | P.SETATTR_MTIME_SET, 0, 0, 0, 0, 0, 0, 42, 0), now=9e9)
    assert p.rpc(M.Tgetattr(1, 1, P.GETATTR_BASIC)).mtime_sec == 42


def test_user_and_group_ids_come_from_the_config() -> None:
    ids = {"glenda": 1001, "writers": 2002}
    users = Users(uid=lambda n: ids.get(n, 9), gid=lambda n: ids.get(n, 8), name={1001: "glenda"}.get)  # type: ignore[arg-type]
    p = Peer(Config(lambda ctx, aname: tree(), users=users), dialect=P.VERSION_9PL)
    p.handshake(uname="", n_uname=1001)  # Linux sends its uid: the config names it
    p.open(1, "now")
    assert p.rpc(M.Tread(1, 1, 0, 10)).data == b"now\n"
    a = p.rpc(M.Tgetattr(1, 0, P.GETATTR_BASIC))
    assert (a.uid, a.gid) == (1001, 1001)
    r = p.rpc(M.Tsetattr(1, 0, P.SETATTR_UID, 0, 7, 0, 0, 0, 0, 0, 0))
    assert isinstance(r, M.Rlerror) and r.ecode == errno.EPERM


def test_default_users_need_no_password_file() -> None:
    u = Users()
    assert (u.uid("1001"), u.uid("glenda"), u.gid("glenda"), u.name(1001)) == (1001, 65534, 65534, "1001")


@pytest.mark.parametrize("dialect", P.DIALECTS)
def test_an_error_in_work_is_an_io_error_reply(dialect: str) -> None:
    p = Peer(dialect=dialect)
    p.handshake()
    p.open(1, "wait")
    token = p.send(M.Tread(10, 1, 0, 100)).start[0][0]
    drive(p.work.pop(token))
    (reply,) = p.replies(p.session.finished(token, RuntimeError("bug")))
    assert reply.tag == 10 and isinstance(reply, M.Rlerror if dialect == P.VERSION_9PL else M.Rerror)


def test_lost_cancels_what_is_in_flight() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "wait")
    token = p.send(M.Tread(10, 1, 0, 100)).start[0][0]
    out = p.session.lost()
    assert out.cancel == [token] and p.session.fids == {} and p.session.in_flight == 0
    assert p.finish(token) == []


def test_a_read_sent_with_a_write_on_its_fid_is_answered_after_it_with_its_reply() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "ctl", P.ORDWR)
    p.open(2, "ctl", P.ORDWR)
    out = p.send(M.Twrite(10, 1, 0, b"run x"), M.Tread(11, 1, 0, 100))
    (write, _), = out.start  # the read started no work of its own: it waits for the write
    assert out.send == [] and p.session.in_flight == 2
    assert p.rpc(M.Tread(12, 2, 0, 100)).data == b"usage\n"  # another fid does not wait
    replies = p.finish(write)  # one Output: the write's reply, then the read's
    assert [(type(r), r.tag) for r in replies] == [(M.Rwrite, 10), (M.Rread, 11)]
    assert replies[1].data == b"did run x\n" and p.session.in_flight == 0
    # With no write in flight a read is answered at once, as before.
    assert p.rpc(M.Tread(13, 1, 0, 100)).data == b"did run x\n"


def test_a_read_waits_for_every_write_in_flight_on_its_fid() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "ctl", P.ORDWR)
    out = p.send(M.Twrite(10, 1, 0, b"a"), M.Tread(11, 1, 0, 100), M.Twrite(12, 1, 0, b"b"))
    first, second = (t for t, _ in out.start)
    assert [r.tag for r in p.finish(first)] == [10]  # the read still waits for the second write
    replies = p.finish(second)
    assert [(type(r), r.tag) for r in replies] == [(M.Rwrite, 12), (M.Rread, 11)]
    assert replies[1].data == b"did b\n"


def test_flushes_of_a_waiting_read_and_of_the_write_it_waits_for() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "ctl", P.ORDWR)
    # The waiting read flushed: no reply for it ever, the write's still comes.
    (write, _), = p.send(M.Twrite(10, 1, 0, b"a"), M.Tread(11, 1, 0, 100)).start
    out = p.send(M.Tflush(12, 11))
    assert out.start == [] and [(type(r), r.tag) for r in p.replies(out)] == [(M.Rflush, 12)]
    assert [r.tag for r in p.finish(write)] == [10] and p.session.in_flight == 0
    # The write flushed: the read waits no longer and reads what the fid holds.
    (write, _), = p.send(M.Twrite(20, 1, 0, b"b"), M.Tread(21, 1, 0, 100)).start
    out = p.send(M.Tflush(22, 20))
    assert out.cancel == [write]
    assert [(type(r), r.tag) for r in p.replies(out)] == [(M.Rread, 21), (M.Rflush, 22)]
    assert p.finish(write) == [] and p.session.in_flight == 0


def test_a_waiting_read_whose_fid_was_clunked_is_refused() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "ctl", P.ORDWR)
    (write, _), = p.send(M.Twrite(10, 1, 0, b"a"), M.Tread(11, 1, 0, 100)).start
    assert isinstance(p.rpc(M.Tclunk(12, 1)), M.Rclunk)
    p.open(1, "now")  # the number again, for another file
    replies = p.finish(write)
    assert [(type(r), r.tag) for r in replies] == [(M.Rwrite, 10), (M.Rerror, 11)]
    assert replies[1].ename == P.EBADF_MSG  # not a read of the file that fid now stands for
    assert p.session.in_flight == 0


def test_tversion_forgets_reads_waiting_for_writes() -> None:
    p = Peer()
    p.handshake()
    p.open(1, "ctl", P.ORDWR)
    (write, _), = p.send(M.Twrite(10, 1, 0, b"a"), M.Tread(11, 1, 0, 100)).start
    out = p.send(M.Tversion(P.NOTAG, 8192, P.VERSION_9P))
    assert write in out.cancel and [type(r) for r in p.replies(out)] == [M.Rversion]
    assert p.finish(write) == [] and p.session.in_flight == 0
