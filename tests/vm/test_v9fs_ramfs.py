"""The Linux kernel's v9fs client (6.1, in QEMU) against our ramfs.

One ramfs, one boot (about 10 s under TCG). The guest mounts the ramfs four
times, one after the other, each through its own forward (guest port) and
working in its own directory of the ramfs:

    9p2000.L      version=9p2000.L (the kernel's default access=client)
    9p2000.u      version=9p2000.u (access=user: attaches with n_uname = uid 0)
    9p2000        version=9p2000, no uname=: the kernel attaches as "nobody"
    9p2000-glenda version=9p2000,uname=glenda: what a Plan 9 user would type

Before the boot our own client writes ``<id>/from-host``, ``<id>/not-mine``
(owned by "rob") and ``/bigdir`` (4000 entries). The guest runs the everyday
shell operations (ls -l, echo > and >>, cat, stat, mkdir, rm, rmdir,
truncation, mv, chmod, touch, exec, big and sparse files, links, and the
errors a user sees), each as one step whose output and exit status come
back; every step is a test of its own, so a failure names the operation and
the dialect. After the boot our client checks what the guest left in the
ramfs, and the kernel log must hold no "unknown error" (an error string the
kernel could not map to an errno).

To see the messages themselves, put ``proxy9p.py`` between QEMU and the ramfs.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error

from ..conftest import ServerProc, need_binary, start_ramfs, stop
from .qemu import GuestRun, default_cache_dir, run_guest

pytestmark = pytest.mark.vm

GUEST_IP = "10.0.2.100"


@dataclass(frozen=True)
class Mount:
    id: str  # also the name of its directory in the ramfs
    version: str
    port: int  # guest port of its forward
    extra: str = ""  # more mount options
    owner: str = ""  # who the ramfs should record as the owner of what the guest creates


MOUNTS = [
    Mount("9p2000.L", "9p2000.L", 564, owner="root"),
    Mount("9p2000.u", "9p2000.u", 565, owner="root"),
    Mount("9p2000", "9p2000", 566, owner="nobody"),
    Mount("9p2000-glenda", "9p2000", 567, extra=",uname=glenda", owner="glenda"),
]


def host_content(m: Mount) -> bytes:
    return f"from the host to {m.id}\n".encode()


Expect = str | tuple[str, ...] | dict[str, "str | tuple[str, ...] | None"] | None

EPERM_TEXT = "Operation not permitted"


@dataclass(frozen=True)
class Step:
    """One shell command in the guest and what it must print (stdout+stderr,
    trailing newlines stripped by the shell's $(...)).

    ``out``, ``contains`` and ``match`` may be a dict keyed by mount version
    (a missing version: not checked); ``contains`` may be a tuple (any of).
    """

    name: str
    cmd: str  # {M}: mount point, {W}: the mount's work directory, {id}, {port}, {version}, {extra}
    out: Expect = ""  # exact output; a tuple: one of these; None: not checked
    rc: int = 0  # 0, or 1 meaning "must fail" (any non-zero status)
    contains: Expect = None
    match: str | None = None  # re.search(..., re.M) on the output
    versions: tuple[str, ...] | None = None  # mount versions the step applies to; None: all
    cleanup: str = ""  # run after cmd whatever happened; its output and status are dropped


MOUNT_CMD = f"mount -t 9p -o trans=tcp,port={{port}},version={{version}},aname=/{{extra}} {GUEST_IP} {{M}}"

STEPS = [
    # -- what the brief asks of every dialect
    Step("mount", f"mkdir -p {{M}} && {MOUNT_CMD} && grep -c ' {{M}} 9p ' /proc/mounts", out="1"),
    Step("ls_root", "ls {M}", out=None, contains="{id}"),
    Step("ls_l", "ls -l {W}", out=None, match=r"^-rw-rw-rw-\s+1\s+\S+\s+\S+\s+{hostlen}\s+.*\sfrom-host$"),
    Step("read_host_file", "cat {W}/from-host", out="from the host to {id}"),
    Step("write", "echo hello > {W}/file && cat {W}/file", out="hello"),
    Step("append", "echo more >> {W}/file && cat {W}/file", out="hello\nmore"),
    Step("stat_file", "stat -c '%s %F %a' {W}/file", out="11 regular file 644"),
    Step("stat_dir", "stat -c '%F' {W}", out="directory"),
    Step("ls_l_after_write", "ls -l {W}/file", out=None,
         match=r"^-rw-r--r--\s+1\s+\S+\s+\S+\s+11\s+.*\s\S*/file$"),
    Step("mkdir", "mkdir {W}/d && stat -c '%F %a' {W}/d", out="directory 755"),
    Step("write_in_subdir", "echo x > {W}/d/f && cat {W}/d/f", out="x"),
    Step("ls_subdir", "ls {W}/d", out="f"),
    Step("rm_in_subdir", "rm {W}/d/f && ls {W}/d", out=""),
    Step("rmdir", "rmdir {W}/d && ls {W}", out="file\nfrom-host\nnot-mine"),
    Step("rm", "rm {W}/file && ls {W}", out="from-host\nnot-mine"),
    Step("read_missing", "cat {W}/file", out=None, rc=1, contains="No such file or directory"),
    Step("stat_missing", "stat {W}/nothing-here", out=None, rc=1, contains="No such file or directory"),
    Step("truncate_by_redirect", "echo 0123456789 > {W}/t && echo ab > {W}/t && cat {W}/t && stat -c %s {W}/t",
         out="ab\n3"),
    Step("truncate_to_empty", ": > {W}/t && stat -c %s {W}/t && cat {W}/t", out="0"),
    Step("truncate_shorter", "echo 0123456789 > {W}/t2 && truncate -s 4 {W}/t2 && cat {W}/t2 && echo && "
         "stat -c %s {W}/t2", out="0123\n4"),
    Step("rename", "echo r > {W}/old && mv {W}/old {W}/new && cat {W}/new && ls {W}",
         out="r\nfrom-host\nnew\nnot-mine\nt\nt2"),
    Step("mkdir_exists", "mkdir {W}/kept-dir && mkdir {W}/kept-dir", out=None, rc=1, contains="File exists"),
    Step("rmdir_not_empty", "echo y > {W}/kept-dir/inner && rmdir {W}/kept-dir", out=None, rc=1,
         contains="Directory not empty"),
    Step("keep", "echo 'guest wrote {id}' > {W}/keep && cat {W}/keep", out="guest wrote {id}"),
    # -- more of what users do
    Step("write_at_offset", "printf abcdefghij > {W}/seek && printf XY | dd of={W}/seek bs=1 seek=3 conv=notrunc "
         "2>/dev/null && cat {W}/seek", out="abcXYfghij"),
    Step("write_past_end", "printf Z | dd of={W}/sparse bs=1 seek=100000 2>/dev/null && stat -c %s {W}/sparse",
         out="100001"),
    Step("big_file", "dd if=/dev/urandom of=/tmp/big-{id} bs=64k count=8 2>/dev/null && cp /tmp/big-{id} {W}/big && "
         "md5sum /tmp/big-{id} {W}/big | cut -d' ' -f1 | uniq | wc -l && md5sum {W}/big | cut -d' ' -f1",
         out=None, match=r"\A1\n[0-9a-f]{{32}}\Z"),
    Step("parallel_reads", "(md5sum {W}/big & md5sum {W}/big & md5sum {W}/big & wait) | cut -d' ' -f1 | uniq -c",
         out=None, match=r"\A\s*3 [0-9a-f]{{32}}\Z"),
    # exec maps the binary; the first mount copies it (2 MB is slow under TCG), the others reuse it
    Step("exec", "{{ test -x {M}/exec/busybox || {{ mkdir -p {M}/exec && cp /bin/busybox {M}/exec/busybox && "
         "chmod 755 {M}/exec/busybox; }}; }} && {M}/exec/busybox echo exec-ok", out="exec-ok"),
    Step("chmod", "chmod 600 {W}/new && stat -c %a {W}/new", out="600"),
    Step("touch_mtime", "touch -d '2001-02-03 04:05:06' {W}/keep && stat -c %Y {W}/keep", out="981173106"),
    # not-mine belongs to "rob": chmod(2) by someone else is EPERM; on 9P2000 the
    # error is a string, which the kernel must find in its table (net/9p/error.c)
    Step("chmod_not_owner", "chmod 600 {W}/not-mine", out=None, rc=1,
         contains={"9p2000.L": EPERM_TEXT, "9p2000.u": EPERM_TEXT, "9p2000": (EPERM_TEXT, "Permission denied")}),
    # legacy 9p2000 carries no numeric ids: the kernel sends nothing to refuse
    Step("chown", "chown 100 {W}/keep", out=None, rc=1, contains=EPERM_TEXT, versions=("9p2000.L", "9p2000.u")),
    # rename(2) replaces an existing target; 9P2000.L's Trenameat is rename(2)
    Step("rename_over_existing", "echo a > {W}/ra && echo b > {W}/rb && mv {W}/ra {W}/rb && cat {W}/rb && "
         "test ! -e {W}/ra && echo gone", out="a\ngone", versions=("9p2000.L",), cleanup="rm -f {W}/ra {W}/rb"),
    # links and fifos: refused, or real; never a plain file in their place
    Step("hard_link", "echo hi > {W}/lsrc && {{ ln {W}/lsrc {W}/lnk 2>/dev/null && cat {W}/lnk || echo refused; }}",
         out=("hi", "refused"), cleanup="rm -f {W}/lsrc {W}/lnk"),
    Step("symlink", "echo hi > {W}/ssrc && {{ ln -s ssrc {W}/sl 2>/dev/null && cat {W}/sl || echo refused; }}",
         out=("hi", "refused"), cleanup="rm -f {W}/ssrc {W}/sl"),
    Step("mkfifo", "{{ mkfifo {W}/fifo 2>/dev/null && stat -c %F {W}/fifo || echo refused; }}",
         out=("fifo", "refused"), cleanup="rm -f {W}/fifo"),
    # more entries than one directory read holds at the default msize
    # (a glob reads the directory without stat-ing every entry, as ls would)
    Step("big_dir", "cd {M}/bigdir && set -- * && echo $# && echo $1 && eval echo \\${{$#}} && "
         "if [ \"$1\" = '*' ]; then echo 'the glob matched nothing: reading the directory failed'; fi",
         out="{BIGDIR}\nentry-0000\nentry-{BIGDIR_LAST}"),
    Step("umount", "umount {M} && ! grep -q ' {M} 9p ' /proc/mounts"),
    # the forward's TCP connection stays open: the server sees a second Tversion on it
    Step("remount", f"{MOUNT_CMD} && cat {{W}}/keep && umount {{M}}", out="guest wrote {id}"),
]

# What the guest leaves in <id>/ and what our client must find there afterwards.
LEFT = {"from-host", "not-mine", "keep", "kept-dir", "new", "t", "t2", "seek", "sparse", "big"}
BIGDIR = 4000  # entries in /bigdir, made by the host


def _fill(text: str, m: Mount) -> str:
    return text.format(M=f"/mnt/{m.id}", W=f"/mnt/{m.id}/{m.id}", id=m.id, port=m.port,
                       version=m.version, extra=m.extra, hostlen=len(host_content(m)),
                       BIGDIR=BIGDIR, BIGDIR_LAST=f"{BIGDIR - 1:04d}")


def _for(expect: Expect, m: Mount) -> str | tuple[str, ...] | None:
    if isinstance(expect, dict):
        expect = expect.get(m.version)
    if isinstance(expect, tuple):
        return tuple(_fill(e, m) for e in expect)
    return None if expect is None else _fill(expect, m)


def _shell(step: Step, m: Mount) -> str:
    cmd = _fill(step.cmd, m)
    if step.cleanup:
        cmd = f"{{ {cmd}\n}}; rc=$?; {{ {_fill(step.cleanup, m)}; }} >/dev/null 2>&1; exit $rc"
    return cmd


def applies(step: Step, m: Mount) -> bool:
    return step.versions is None or m.version in step.versions


# Each step runs in its own sh under a KILL timeout, so a hung 9P request
# costs one step, not the boot.
PRELUDE = r"""
step() {  # step ID NAME CMD
  out=$(timeout -s KILL 20 sh -c "$3" 2>&1); rc=$?
  printf '@@STEP %s %s rc=%d\n%s\n@@END\n' "$1" "$2" "$rc" "$out"
}
"""
STEP_RE = re.compile(r"^@@STEP (\S+) (\S+) rc=(\d+)\n(.*?)\n@@END$", re.S | re.M)


def guest_script() -> str:
    lines = [PRELUDE]
    for m in MOUNTS:
        for s in STEPS:
            if applies(s, m):
                lines.append(f"step {shlex.quote(m.id)} {s.name} {shlex.quote(_shell(s, m))}")
    lines.append("exit 0")
    return "\n".join(lines) + "\n"


def ours(server: ServerProc, fn: Any, uname: str | None = None) -> Any:
    """``await fn(client)`` with our client over 9P2000, so that owners come
    back as names; ``uname``: attach as that user (default: the local one)."""

    async def go() -> Any:
        c = await Client.connect(server.addr, version="9P2000", uname=uname, timeout=5)
        try:
            return await fn(c)
        finally:
            await c.close()

    return asyncio.run(go())


@dataclass
class Boot:
    server: ServerProc
    run: GuestRun
    steps: dict[tuple[str, str], tuple[int, str]]  # (mount id, step) -> (status, output)


@pytest.fixture(scope="module")
def boot() -> Iterator[Boot]:
    need_binary("qemu-system-x86_64")
    # QEMU opens every forward's connection when it starts, and the guest
    # sends Tversion on the last one only after three mounts' worth of steps:
    # far later than any client that dials to mount would.
    server = start_ramfs("--handshake-timeout", "600")
    try:
        async def prepare(c: Client) -> None:
            await c.mkdir("bigdir")
            for m in MOUNTS:
                # 0777 so that "nobody" and "glenda" (9P2000 attaches) may create in it
                await c.mkdir(m.id, 0o777)
                await c.write_file(f"{m.id}/from-host", host_content(m), create=True)

            async def entry(i: int) -> None:
                fid = await c.walk("bigdir")
                await c.create(fid, f"entry-{i:04d}", 0o644)
                await c.clunk(fid)

            for first in range(0, BIGDIR, 500):
                await asyncio.gather(*(entry(i) for i in range(first, min(first + 500, BIGDIR))))

        async def prepare_as_rob(c: Client) -> None:
            for m in MOUNTS:
                await c.write_file(f"{m.id}/not-mine", b"rob's\n", create=True)  # mode 0666

        ours(server, prepare)
        ours(server, prepare_as_rob, uname="rob")
        run = run_guest(guest_script(), [(GUEST_IP, m.port, server.port) for m in MOUNTS],
                        cache_dir=default_cache_dir(), timeout=300)
        steps = {(mid, name): (int(rc), out) for mid, name, rc, out in STEP_RE.findall(run.output)}
        yield Boot(server, run, steps)
    finally:
        stop(server)


def _debug(b: Boot) -> str:
    return "\ndmesg:\n" + "\n".join(b.run.dmesg_9p)


CASES = [pytest.param(m, s, id=f"{m.id}-{s.name}") for m in MOUNTS for s in STEPS if applies(s, m)]


def test_guest_script_ran(boot: Boot) -> None:
    assert boot.run.returncode == 0, boot.run.console[-4000:]
    assert len(boot.steps) == len(CASES), boot.run.output[-4000:]


@pytest.mark.parametrize(("mount", "step"), CASES)
def test_guest_step(boot: Boot, mount: Mount, step: Step) -> None:
    got = boot.steps.get((mount.id, step.name))
    assert got is not None, f"step did not run:\n{boot.run.output[-3000:]}"
    rc, out = got
    what = f"`{_fill(step.cmd, mount)}` exited {rc}:\n{out}{_debug(boot)}"
    assert "Unknown error" not in out, what  # an error string the kernel could not map
    if step.rc == 0:
        assert rc == 0, what
    else:
        assert rc != 0, what
    expect = _for(step.out, mount)
    if isinstance(expect, tuple):
        assert out in expect, what
    elif expect is not None:
        assert out == expect, what
    contains = _for(step.contains, mount)
    if isinstance(contains, tuple):
        assert any(c in out for c in contains), what
    elif contains is not None:
        assert contains in out, what
    if step.match is not None:
        assert re.search(_fill(step.match, mount), out, re.M), what


@pytest.mark.parametrize("mount", MOUNTS, ids=[m.id for m in MOUNTS])
def test_host_reads_what_the_guest_left(boot: Boot, mount: Mount) -> None:
    d = mount.id

    async def look(c: Client) -> dict[str, Any]:
        got: dict[str, Any] = {
            "names": {f.name for f in await c.ls(d)},
            "kept-dir": {f.name for f in await c.ls(f"{d}/kept-dir")},
        }
        for p in ("keep", "kept-dir/inner", "new", "t", "t2", "from-host", "not-mine", "seek", "sparse", "big"):
            got[p] = await c.read_file(f"{d}/{p}")
        return got

    got = ours(boot.server, look, uname=mount.owner)  # new is 0600 after chmod
    assert got.pop("names") == LEFT
    assert got.pop("kept-dir") == {"inner"}
    big = got.pop("big")
    assert got == {
        "keep": f"guest wrote {d}\n".encode(),
        "kept-dir/inner": b"y\n",
        "new": b"r\n",
        "t": b"",
        "t2": b"0123",
        "from-host": host_content(mount),
        "not-mine": b"rob's\n",
        "seek": b"abcXYfghij",
        "sparse": bytes(100000) + b"Z",
    }
    # the md5 the guest printed of what it wrote
    rc, out = boot.steps.get((mount.id, "big_file"), (-1, ""))
    assert len(big) == 8 * 65536
    assert out.endswith(hashlib.md5(big).hexdigest()), out


@pytest.mark.parametrize("mount", MOUNTS, ids=[m.id for m in MOUNTS])
def test_host_sees_the_guests_removals(boot: Boot, mount: Mount) -> None:
    gone = ("file", "d", "d/f", "old", "lnk", "lsrc", "sl", "ssrc", "fifo", "ra", "rb")

    async def missing(c: Client) -> dict[str, int]:
        out = {}
        for p in gone:
            try:
                await c.stat_path(f"{mount.id}/{p}")
                out[p] = 0
            except P9Error as e:
                out[p] = e.errno
        return out

    assert ours(boot.server, missing) == dict.fromkeys(gone, errno.ENOENT)


@pytest.mark.parametrize("mount", MOUNTS, ids=[m.id for m in MOUNTS])
def test_host_sees_the_guests_metadata(boot: Boot, mount: Mount) -> None:
    async def look(c: Client) -> dict[str, Any]:
        def info(p: str) -> Any:
            return c.stat_path(f"{mount.id}/{p}")

        return {
            "owners": {p: (await info(p)).uid for p in ("keep", "kept-dir", "new", "not-mine")},
            "new mode": (await info("new")).mode & 0o777,
            "not-mine mode": (await info("not-mine")).mode & 0o777,
            "keep mtime": (await info("keep")).mtime,
        }

    assert ours(boot.server, look, uname=mount.owner) == {
        # files the guest created belong to the user the kernel attached as
        "owners": {"keep": mount.owner, "kept-dir": mount.owner, "new": mount.owner, "not-mine": "rob"},
        "new mode": 0o600,  # chmod 600
        "not-mine mode": 0o666,  # the refused chmod changed nothing
        "keep mtime": 981173106,  # touch -d '2001-02-03 04:05:06' (UTC)
    }


def test_kernel_logged_no_unknown_error(boot: Boot) -> None:
    bad = [line for line in boot.run.dmesg_9p if "unknown error" in line]
    assert not bad, "\n".join(boot.run.dmesg_9p)
