"""The server against our client and raw frames: the semantics of each message."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from fornax_sched.fs import codec as M
from fornax_sched.fs import proto as P
from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error
from fornax_sched.fs.ramfs import RamFS
from fornax_sched.fs.tree import Ctx, Dir, DynamicDir, File

from ..helpers import run
from .util import Raw, eventually, reads_answered_at_once, serving


class Scheduler:
    """A tiny stand-in application behind a ctl file (the tree is what is tested)."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.wake = asyncio.Event()
        self.counter = 0

    def ctl(self, ctx: Ctx, data: bytes) -> str:
        cmd = data.decode().strip()
        if cmd.startswith("bad"):
            raise P9Error(f"unknown command {cmd!r}", errno.EINVAL)
        self.commands.append(cmd)
        return f"done {cmd} #{len(self.commands)}\n"

    async def blocking(self, ctx: Ctx) -> str:
        await self.wake.wait()
        return "woken\n"

    def tree(self) -> Dir:
        def count(ctx: Ctx) -> str:
            self.counter += 1
            return "".join(f"line {self.counter} {i}\n" for i in range(100))

        return Dir("", [
            File("ctl", read=lambda ctx: f"{len(self.commands)} commands\n", write=self.ctl,
                 uid="glenda", gid="writers", mode=0o664),
            File("counter", read=count, uid="glenda"),
            File("blocking", read=self.blocking, uid="glenda"),
            File("whoami", read=lambda ctx: ctx.user + "\n"),
            Dir("sub", [File("leaf", read=lambda ctx: "leaf\n")], uid="glenda"),
            DynamicDir("items", names=lambda ctx: [f"i{n}" for n in range(3)],
                       make=lambda name: File(name, read=lambda ctx: name + "\n")),
            Dir("private", [File("secret", read=lambda ctx: "s\n")], uid="glenda", mode=0o500),
        ], uid="glenda", mode=0o555)


GROUPS = {"writers": frozenset({"glenda", "rob"})}



@pytest.mark.parametrize("dialect", P.DIALECTS)
def test_ctl_write_then_read_on_same_fid_returns_result(dialect: str) -> None:
    async def main() -> None:
        app = Scheduler()
        async with serving(app.tree(), groups=GROUPS) as srv:
            async with await Client.connect(srv.addr, version=dialect, uname="glenda") as c:
                assert c.dialect == dialect
                assert await c.write_file("ctl", b"place hello\n", read_reply=True) == b"done place hello #1\n"
                # A fresh open reads the file's state, not another fid's reply.
                assert await c.read_file("ctl") == b"1 commands\n"
                with pytest.raises(P9Error) as e:
                    await c.write_file("ctl", b"bad thing")
                # 9P2000 carries only the text; .u carries text and errno; .L the errno alone.
                assert e.value.errno == (errno.EIO if dialect == P.VERSION_9P else errno.EINVAL)
                if dialect != P.VERSION_9PL:
                    assert "unknown command 'bad thing'" in str(e.value)
                assert app.commands == ["place hello"]
    run(main())


def test_permissions_are_checked_against_the_attaching_user() -> None:
    async def main() -> None:
        app = Scheduler()
        async with serving(app.tree(), groups=GROUPS) as srv:
            async with await Client.connect(srv.addr, version=P.VERSION_9P, uname="rob") as rob:
                await rob.write_file("ctl", b"place a")  # group writers
                with pytest.raises(P9Error, match="permission denied"):
                    await rob.read_file("private/secret")  # no search permission
            async with await Client.connect(srv.addr, version=P.VERSION_9PU, uname="eve") as eve:
                with pytest.raises(P9Error) as e:
                    await eve.write_file("ctl", b"place b")
                assert e.value.errno == errno.EACCES
                assert await eve.read_file("whoami") == b"eve\n"
                assert await eve.read_file("ctl") == b"1 commands\n"  # everyone may read
            assert app.commands == ["place a"]
    run(main())


def test_linux_numeric_uname_names_the_user() -> None:
    async def main() -> None:
        async with serving(Scheduler().tree()) as srv:
            raw = await Raw.open(srv)
            await raw.rpc(M.Tversion(P.NOTAG, 8192, P.VERSION_9PL))
            raw.codec = M.CODECS[P.VERSION_9PL]
            await raw.rpc(M.Tattach(1, 0, P.NOFID, "", "", os.getuid()))
            await raw.rpc(M.Twalk(1, 0, 1, ("whoami",)))
            await raw.rpc(M.Tlopen(1, 1, 0))
            import pwd
            assert (await raw.rpc(M.Tread(1, 1, 0, 100))).data == pwd.getpwuid(os.getuid()).pw_name.encode() + b"\n"
            raw.close()
    run(main())


def test_version_negotiation() -> None:
    async def main() -> None:
        async with serving(Scheduler().tree(), msize=65536) as srv:
            raw = await Raw.open(srv)
            # Before Tversion nothing else is answered but with an error.
            assert isinstance(await raw.rpc(M.Tattach(1, 0, P.NOFID, "u", "", P.NONUNAME)), M.Rerror)
            r = await raw.rpc(M.Tversion(P.NOTAG, 131072, P.VERSION_9PL))
            assert (r.msize, r.version) == (65536, P.VERSION_9PL)  # capped
            r = await raw.rpc(M.Tversion(P.NOTAG, 8192, "9P2000.x"))
            assert r.version == P.VERSION_9P
            r = await raw.rpc(M.Tversion(P.NOTAG, 8192, "9P3000"))
            assert r.version == "unknown"
            r = await raw.rpc(M.Tversion(P.NOTAG, 100, P.VERSION_9P))
            assert r.version == "unknown"  # msize too small to work with
            raw.close()
        async with serving(Scheduler().tree()) as srv:  # default accepts Linux's 131072
            raw = await Raw.open(srv)
            r = await raw.rpc(M.Tversion(P.NOTAG, 131072, P.VERSION_9PU))
            assert (r.msize, r.version) == (131072, P.VERSION_9PU)
            raw.close()
    run(main())


def test_auth_refused_and_attach_by_aname() -> None:
    async def main() -> None:
        trees = {"a": Dir("", [File("name", read=lambda c: "A\n")]), "b": Dir("", [File("name", read=lambda c: "B\n")])}

        def attach(ctx: Ctx, aname: str) -> Dir:
            if aname not in trees:
                raise P9Error(f"no tree named {aname!r}", errno.ENOENT)
            return trees[aname]

        async with serving(attach) as srv:
            raw = await Raw.open(srv)
            await raw.rpc(M.Tversion(P.NOTAG, 8192, P.VERSION_9P))
            r = await raw.rpc(M.Tauth(1, 5, "glenda", "a"))
            assert isinstance(r, M.Rerror) and "authentication not required" in r.ename
            r = await raw.rpc(M.Tattach(1, 0, 5, "glenda", "a"))
            assert isinstance(r, M.Rerror)  # an afid that was never authenticated
            r = await raw.rpc(M.Tattach(1, 0, P.NOFID, "glenda", "zzz"))
            assert isinstance(r, M.Rerror) and "no tree named" in r.ename
            raw.close()
            for aname, want in (("a", b"A\n"), ("b", b"B\n")):
                async with await Client.connect(srv.addr, aname=aname) as c:
                    assert await c.read_file("name") == want
    run(main())


def test_walk_partial_dotdot_and_limits() -> None:
    async def main() -> None:
        async with serving(Scheduler().tree()) as srv:
            raw = await Raw.open(srv)
            await raw.handshake()
            r = await raw.rpc(M.Twalk(1, 0, 1, ("sub", "leaf", "deeper")))
            assert isinstance(r, M.Rwalk) and len(r.qids) == 2  # partial: newfid not made
            assert isinstance(await raw.rpc(M.Tclunk(1, 1)), M.Rerror)
            r = await raw.rpc(M.Twalk(1, 0, 1, ("nope",)))
            assert isinstance(r, M.Rerror) and r.ename == P.ENOENT_MSG  # first element fails: error
            r = await raw.rpc(M.Twalk(1, 0, 1, ("sub", "..", "sub", "leaf")))
            assert len(r.qids) == 4 and r.qids[0] == r.qids[2]
            r = await raw.rpc(M.Twalk(1, 0, 2, ("..",)))  # .. of the root is the root
            assert r.qids[0].type == P.QTDIR
            r = await raw.rpc(M.Twalk(1, 0, 3, ("sub",) * 17))
            assert isinstance(r, M.Rerror)
            r = await raw.rpc(M.Twalk(1, 0, 1, ()))  # newfid in use
            assert isinstance(r, M.Rerror) and "in use" in r.ename
            r = await raw.rpc(M.Twalk(1, 1, 1, ()))  # clone onto itself is fine
            assert isinstance(r, M.Rwalk)
            raw.close()
    run(main())


def test_open_snapshot_is_stable_across_reads() -> None:
    async def main() -> None:
        app = Scheduler()
        async with serving(app.tree()) as srv:
            async with await Client.connect(srv.addr, msize=512) as c:
                fid = await c.walk("counter")
                await c.open(fid)
                got, off = b"", 0
                while chunk := await c.read(fid, off, 100):
                    got += chunk
                    off += len(chunk)
                    app.counter += 100  # the source moves on; this open must not see it
                await c.clunk(fid)
                lines = got.decode().splitlines()
                assert len(lines) == 100 and len({line.split()[1] for line in lines}) == 1
    run(main())


def test_qid_version_changes_with_content() -> None:
    async def main() -> None:
        fs = RamFS("glenda")
        async with serving(fs.root) as srv:
            async with await Client.connect(srv.addr, uname="glenda") as c:
                await c.write_file("f", b"one", create=True)
                v1 = (await c.stat_path("f")).qid
                await c.write_file("f", b"two")
                v2 = (await c.stat_path("f")).qid
                assert v1.path == v2.path and v2.version != v1.version
        # A computed file's version moves when a read sees new content (a stat renders nothing).
        app = Scheduler()
        async with serving(app.tree()) as srv:
            async with await Client.connect(srv.addr) as c:
                await c.read_file("ctl")
                before = (await c.stat_path("ctl")).qid
                assert (await c.stat_path("ctl")).qid == before
                await c.read_file("ctl")
                assert (await c.stat_path("ctl")).qid == before  # same content, same version
                app.commands.append("x")
                assert (await c.stat_path("ctl")).qid == before  # not read yet
                assert await c.read_file("ctl") == b"1 commands\n"
                after = (await c.stat_path("ctl")).qid
                assert after.path == before.path and after.version != before.version
    run(main())


@pytest.mark.parametrize("dialect", P.DIALECTS)
def test_listing_many_computed_files_renders_none_of_them(dialect: str) -> None:
    """ls -l of 20,000 synthetic files: 9P2000 directory reads carry a stat per
    entry, 9P2000.L clients getattr each; neither may call a read callback."""
    rendered: list[str] = []

    def content(name: str) -> File:
        def read(ctx: Ctx) -> str:
            rendered.append(name)
            return f"the content of {name}\n" * 10
        return File(name, read=read)

    names = [f"f{i:05d}" for i in range(20000)]
    known = set(names)
    root = Dir("", [
        DynamicDir("many", names=lambda ctx: names, make=content, exists=known.__contains__),
        File("sized", read=lambda ctx: rendered.append("sized") or "12345", size=lambda ctx: 5),
        File("static", read="fixed text\n"),
    ])

    async def main() -> None:
        async with serving(root) as srv:
            async with await Client.connect(srv.addr, version=dialect) as c:
                entries = await c.ls("many")
                assert [e.name for e in entries] == names
                stats = [await c.stat_path(f"many/{n}") for n in names[:: 10 if dialect == P.VERSION_9PL else 1000]]
                if dialect != P.VERSION_9PL:
                    assert {e.length for e in entries} == {0}
                assert {st.length for st in stats} == {0} and rendered == []
                assert (await c.stat_path("sized")).length == 5 and rendered == []
                assert (await c.stat_path("static")).length == len(b"fixed text\n")
                # A reader still gets the whole content, in one render per open.
                assert await c.read_file("many/f00042") == b"the content of f00042\n" * 10
                assert rendered == ["f00042"]
                assert await c.read_file("static") == b"fixed text\n"
                assert await c.read_file("sized") == b"12345" and rendered == ["f00042", "sized"]
    run(main())


@pytest.mark.parametrize("dialect", P.DIALECTS)
def test_directory_reads_in_small_pieces(dialect: str) -> None:
    async def main() -> None:
        fs = RamFS("glenda")
        async with serving(fs.root) as srv:
            async with await Client.connect(srv.addr, version=dialect, uname="glenda", msize=512) as c:
                names = {f"file-with-a-longish-name-{i:03d}" for i in range(60)}
                for n in names:
                    await c.write_file(n, b"x", create=True)
                await c.mkdir("d")
                listed = await c.ls("/")
                assert {e.name for e in listed} == names | {"d"}
                assert [e.is_dir for e in listed if e.name == "d"] == [True]
    run(main())


def test_directory_read_at_a_bad_offset_fails() -> None:
    async def main() -> None:
        async with serving(Scheduler().tree()) as srv:
            raw = await Raw.open(srv)
            await raw.handshake()
            await raw.rpc(M.Twalk(1, 0, 1, ()))
            await raw.rpc(M.Topen(1, 1, P.OREAD))
            first = await raw.rpc(M.Tread(1, 1, 0, 8192))
            assert len(M.decode_stats(first.data, False)) == 7
            r = await raw.rpc(M.Tread(1, 1, 3, 8192))
            assert isinstance(r, M.Rerror) and r.ename == "bad offset in directory read"
            r = await raw.rpc(M.Tread(1, 1, len(first.data), 8192))
            assert r.data == b""
            r = await raw.rpc(M.Tread(1, 1, 0, 10))  # too small for one entry: an empty read,
            assert isinstance(r, M.Rread) and r.data == b""
            r = await raw.rpc(M.Tread(1, 1, 0, 8192))  # and the next read goes on from there
            names = [st.name for st in M.decode_stats(r.data, False)]
            assert names == [st.name for st in M.decode_stats(first.data, False)]
            raw.close()
    run(main())


def test_create_and_remove_only_where_allowed() -> None:
    async def main() -> None:
        async with serving(Scheduler().tree()) as srv:
            async with await Client.connect(srv.addr, version=P.VERSION_9P, uname="glenda") as c:
                with pytest.raises(P9Error):
                    await c.write_file("newfile", b"x", create=True)
                with pytest.raises(P9Error, match="remove prohibited|permission denied"):
                    await c.remove("whoami")
        fs = RamFS("glenda")
        async with serving(fs.root) as srv:
            async with await Client.connect(srv.addr, version=P.VERSION_9PL, uname="glenda") as c:
                await c.mkdir("d")
                await c.write_file("d/f", b"data", create=True)
                with pytest.raises(P9Error) as e:
                    await c.remove("d")
                assert e.value.errno == errno.ENOTEMPTY
                await c.remove("d/f")
                await c.remove("d")
                assert await c.ls("/") == []
                assert fs.used == 0
    run(main())


@pytest.mark.parametrize("dialect", P.DIALECTS)
def test_truncate_to_zero_works_on_ctl_files(dialect: str) -> None:
    """What `echo x > ctl` does: open with truncation, or setattr/wstat size 0."""
    async def main() -> None:
        app = Scheduler()
        async with serving(app.tree(), groups=GROUPS) as srv:
            raw = await Raw.open(srv)
            await raw.handshake(dialect)
            await raw.rpc(M.Twalk(1, 0, 1, ("ctl",)))
            if dialect == P.VERSION_9PL:
                ok = await raw.rpc(M.Tsetattr(1, 1, P.SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0))
                assert isinstance(ok, M.Rsetattr)
                bad = await raw.rpc(M.Tsetattr(1, 1, P.SETATTR_SIZE, 0, 0, 0, 5, 0, 0, 0, 0))
                assert isinstance(bad, M.Rlerror) and bad.ecode == errno.EPERM
                r = await raw.rpc(M.Tlopen(1, 1, 1 | P.L_O_TRUNC))
            else:
                st = M.Stat(P.NOCHANGE_16, P.NOCHANGE_32, M.Qid(0xFF, P.NOCHANGE_32, P.NOCHANGE_64),
                            P.NOCHANGE_32, P.NOCHANGE_32, P.NOCHANGE_32, 0, "", "", "", "",
                            "", P.NONUNAME, P.NONUNAME, P.NONUNAME)
                assert isinstance(await raw.rpc(M.Twstat(1, 1, st)), M.Rwstat)
                r = await raw.rpc(M.Topen(1, 1, P.OWRITE | P.OTRUNC))
            assert r.iounit == 8192 - P.IOHDRSZ
            assert (await raw.rpc(M.Twrite(1, 1, 0, b"place web\n"))).count == 10
            assert app.commands == ["place web"]
            raw.close()
    run(main())


def test_wstat_rename_and_chmod_in_ramfs() -> None:
    async def main() -> None:
        fs = RamFS("glenda")
        async with serving(fs.root) as srv:
            async with await Client.connect(srv.addr, version=P.VERSION_9P, uname="glenda") as c:
                await c.write_file("a", b"1", create=True)
                fid = await c.walk("a")
                st = M.Stat(P.NOCHANGE_16, P.NOCHANGE_32, M.Qid(0xFF, P.NOCHANGE_32, P.NOCHANGE_64),
                            0o600, P.NOCHANGE_32, P.NOCHANGE_32, P.NOCHANGE_64, "b", "", "", "")
                await c.rpc(M.Twstat(0, fid, st))
                await c.clunk(fid)
                info = await c.stat_path("b")
                assert info.mode & 0o777 == 0o600 and info.name == "b"
            async with await Client.connect(srv.addr, version=P.VERSION_9P, uname="eve") as eve:
                fid = await eve.walk("b")
                st = M.Stat(P.NOCHANGE_16, P.NOCHANGE_32, M.Qid(0xFF, P.NOCHANGE_32, P.NOCHANGE_64),
                            0o666, P.NOCHANGE_32, P.NOCHANGE_32, P.NOCHANGE_64, "", "", "", "")
                with pytest.raises(P9Error, match="Operation not permitted") as e:
                    await eve.rpc(M.Twstat(0, fid, st))
                assert e.value.errno == errno.EPERM
                with pytest.raises(P9Error, match="permission denied"):
                    await eve.open(fid, P.OREAD)
    run(main())


def test_blocked_read_answers_out_of_order_and_is_flushed() -> None:
    async def main() -> None:
        app = Scheduler()
        async with serving(app.tree()) as srv:
            raw = await Raw.open(srv)
            await raw.handshake()
            await raw.rpc(M.Twalk(1, 0, 1, ("blocking",)))
            await raw.rpc(M.Topen(1, 1, P.OREAD))
            await raw.rpc(M.Twalk(1, 0, 2, ("blocking",)))
            await raw.rpc(M.Topen(1, 2, P.OREAD))
            await raw.send(M.Tread(10, 1, 0, 100))  # blocks
            await raw.send(M.Tread(11, 2, 0, 100))  # blocks too
            r = await raw.rpc(M.Tstat(12, 0))  # answered while both wait
            assert isinstance(r, M.Rstat) and r.tag == 12
            r = await raw.rpc(M.Tflush(13, 10))
            assert isinstance(r, M.Rflush) and r.tag == 13
            app.wake.set()
            r = await raw.recv()
            assert isinstance(r, M.Rread) and r.tag == 11 and r.data == b"woken\n"
            r = await raw.rpc(M.Tclunk(14, 1))  # no Rread for tag 10 ever came before this
            assert isinstance(r, M.Rclunk) and r.tag == 14
            # Flushing a tag that is not in flight is answered at once.
            assert isinstance(await raw.rpc(M.Tflush(15, 999)), M.Rflush)
            raw.close()
    run(main())


def test_many_tags_in_flight_on_many_connections() -> None:
    async def main() -> None:
        fs = RamFS("glenda")
        async with serving(fs.root) as srv:
            clients = [await Client.connect(srv.addr, uname="glenda") for _ in range(20)]
            await clients[0].write_file("f", b"payload", create=True)

            async def cycle(c: Client) -> bytes:
                return await c.read_file("f")

            results = await asyncio.gather(*[cycle(c) for c in clients for _ in range(10)])
            assert results == [b"payload"] * 200
            for c in clients:
                await c.close()
    run(main())


def test_statfs_getattr_and_refusals_on_9p2000L() -> None:
    async def main() -> None:
        async with serving(Scheduler().tree()) as srv:
            raw = await Raw.open(srv)
            await raw.handshake(P.VERSION_9PL)
            r = await raw.rpc(M.Tstatfs(1, 0))
            assert r.type == P.STATFS_MAGIC_V9FS and r.namelen == 255
            await raw.rpc(M.Twalk(1, 0, 1, ("sub",)))
            a = await raw.rpc(M.Tgetattr(1, 1, P.GETATTR_BASIC))
            assert a.mode & P.S_IFDIR and a.mode & 0o777 == 0o555 and a.qid.type == P.QTDIR
            for msg, code in [
                (M.Txattrwalk(1, 1, 5, "security.selinux"), errno.EOPNOTSUPP),
                (M.Tlock(1, 1, 0, 0, 0, 0, 1, "c"), errno.EOPNOTSUPP),
                (M.Tlink(1, 0, 1, "x"), errno.EOPNOTSUPP),
                (M.Tmknod(1, 0, "x", 0o644, 0, 0, 0), errno.EOPNOTSUPP),
                (M.Tsymlink(1, 0, "x", "y", 0), errno.EOPNOTSUPP),
                (M.Trenameat(1, 0, "sub", 1, "x"), errno.EXDEV),
                (M.Tread(1, 1, 0, 10), errno.EBADF),  # not open
                (M.Tclunk(1, 77), errno.EBADF),
            ]:
                r = await raw.rpc(msg)
                assert isinstance(r, M.Rlerror) and r.ecode == code, (msg, r)
            raw.close()
    run(main())


def test_dynamic_directory_keeps_qids_stable() -> None:
    async def main() -> None:
        async with serving(Scheduler().tree()) as srv:
            async with await Client.connect(srv.addr) as c:
                a = [e.qid for e in await c.ls("items")]
                b = [e.qid for e in await c.ls("items")]
                assert a == b and len(a) == 3
                assert (await c.stat_path("items/i1")).qid == a[1]
                assert await c.read_file("items/i2") == b"i2\n"
    run(main())


def test_unix_socket() -> None:
    async def main(path: str) -> None:
        async with serving(RamFS("glenda").root, f"unix!{path}") as srv:
            async with await Client.connect(srv.addr, uname="glenda") as c:
                await c.write_file("f", b"over unix", create=True)
                assert await c.read_file("f") == b"over unix"

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run(main(f"{d}/9p.sock"))


def test_client_times_out_and_flushes() -> None:
    async def main() -> None:
        app = Scheduler()
        async with serving(app.tree()) as srv:
            async with await Client.connect(srv.addr, timeout=0.3) as c:
                fid = await c.walk("blocking")
                await c.open(fid)
                with pytest.raises(TimeoutError, match="Tread .* timed out after 0.3s$"):
                    await c.read(fid, 0, 10)
                conn = next(iter(srv._connections))
                assert conn.session.in_flight == 0  # the server forgot the flushed read
                # Rflush came back: the read's tag and the flush's are both free again.
                assert c._flushing == set() and c._gone is None
                assert sorted(c._free_tags) == list(range(c._next_tag)) and c._next_tag == 2
                assert await c.read_file("whoami")  # the connection still works
    run(main())


def test_client_reports_a_peer_that_goes_away() -> None:
    async def main() -> None:
        app = Scheduler()
        async with serving(app.tree()) as srv:
            c = await Client.connect(srv.addr)
            fid = await c.walk("blocking")
            await c.open(fid)
            pending = asyncio.ensure_future(c.read(fid, 0, 10))
            conn = next(iter(srv._connections))
            await eventually(lambda: conn.session.in_flight == 1, what="the read in flight")
            await srv.close()
            with pytest.raises(ConnectionError, match="closed"):
                await pending
            with pytest.raises(ConnectionError):
                await c.read_file("whoami")
        with pytest.raises(ConnectionError, match="cannot dial"):
            await Client.connect(srv.addr, timeout=2)
    run(main())


@pytest.mark.parametrize("dialect", P.DIALECTS)
def test_walk_from_an_open_fid(dialect: str) -> None:
    """9P2000 forbids it; 9P2000.L allows it to a new fid, as diod does (diodls -l)."""
    async def main() -> None:
        async with serving(Scheduler().tree()) as srv:
            raw = await Raw.open(srv)
            await raw.handshake(dialect)
            await raw.rpc(M.Twalk(1, 0, 1, ("sub",)))
            await raw.rpc(M.Tlopen(1, 1, 0) if dialect == P.VERSION_9PL else M.Topen(1, 1, P.OREAD))
            r = await raw.rpc(M.Twalk(1, 1, 2, ("leaf",)))
            assert isinstance(r, M.Rwalk) == (dialect == P.VERSION_9PL), r
            r = await raw.rpc(M.Twalk(1, 1, 1, ("leaf",)))  # never onto the open fid itself
            assert not isinstance(r, M.Rwalk)
            raw.close()
    run(main())


def test_cancelled_request_is_flushed_and_its_tag_reused() -> None:
    async def main() -> None:
        app = Scheduler()
        async with serving(app.tree()) as srv:
            async with await Client.connect(srv.addr) as c:
                fid = await c.walk("blocking")
                await c.open(fid)
                task = asyncio.ensure_future(c.read(fid, 0, 10))
                conn = next(iter(srv._connections))
                await eventually(lambda: conn.session.in_flight == 1, what="the read in flight")
                task.cancel()
                await eventually(lambda: conn.session.in_flight == 0 and not c._flushing, what="flushed")
                assert c._waiting == {}
                tags = len(c._free_tags) + c._next_tag
                for _ in range(50):
                    await c.stat_path("whoami")
                assert len(c._free_tags) + c._next_tag == tags  # no tag leaked
    run(main())


def test_client_tries_dialects_in_order() -> None:
    async def main() -> None:
        async with serving(Scheduler().tree(), dialects=(P.VERSION_9PL,)) as srv:
            async with await Client.connect(srv.addr, version=(P.VERSION_9PU, P.VERSION_9PL)) as c:
                assert c.dialect == P.VERSION_9PL
            with pytest.raises(P9Error, match="does not speak 9P2000.u"):
                await Client.connect(srv.addr, version=P.VERSION_9PU)
    run(main())


class SlowCtl:
    """A ctl file whose command takes a while, as starting a container does."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def ctl(self, ctx: Ctx, data: bytes) -> str:
        await asyncio.sleep(0.05)
        cmd = data.decode()
        if cmd.startswith("bad"):
            raise P9Error(f"unknown command {cmd!r}", errno.EINVAL)
        self.commands.append(cmd)
        return f"{len(self.commands)}\n"

    def tree(self) -> Dir:
        return Dir("", [File("ctl", read=lambda ctx: "usage\n", write=self.ctl, uid="glenda", mode=0o666)],
                   uid="glenda")


@asynccontextmanager
async def slow_ctl() -> AsyncIterator[tuple[SlowCtl, Client, int]]:
    """A SlowCtl served, and a client with its ctl open for reading and writing."""
    app = SlowCtl()
    async with serving(app.tree()) as srv:
        async with await Client.connect(srv.addr, uname="glenda", version="9P2000.u") as c:
            fid = await c.walk("ctl")
            await c.open(fid, P.ORDWR)
            yield app, c, fid


def test_a_command_and_the_read_of_its_reply_sent_together() -> None:
    async def main() -> None:
        async with slow_ctl() as (app, c, fid):
            assert await c.write_read(fid, b"run a", 100) == (b"1\n", True)
            assert await c.write_read(fid, b"run b", 100) == (b"2\n", True)
            with pytest.raises(P9Error, match="unknown command 'bad'"):
                await c.write_read(fid, b"bad", 100)
            assert await c.write_read(fid, b"run c", 100) == (b"3\n", True)  # the fid is still good
            assert c._waiting == {} and app.commands == ["run a", "run b", "run c"]
    run(main())


def test_a_server_that_answers_the_read_first_is_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that does not hold the read back (one of this package before it did, or
    another) answers it with what the file held before the write: write_read says so."""
    reads_answered_at_once(monkeypatch)

    async def main() -> None:
        async with slow_ctl() as (_, c, fid):
            assert await c.write_read(fid, b"run a", 100) == (b"usage\n", False)
            assert await c.read(fid, 0, 100) == b"1\n"  # the reply, read after the write
    run(main())
