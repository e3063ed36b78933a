"""Drive a 9P server with p9fs 0.0.4's ``py9p.Client`` (a Python 3 port of py9p).

Run in its own process with PYTHONPATH set to the p9fs install directory:

    python drive_p9fs.py HOST PORT 9P2000|9P2000.u|9P2000.L

Expects the tree the test prepared (``hello.txt``, ``sub/note.txt``), runs
one scenario of low-level calls and prints a JSON object, one entry per step:
{"ok": true, "value": ...} or {"ok": false, "error": ..., "detail": ...}.

p9fs quirks handled here: every request carries tag 1 (so strictly one at a
time), ``qid.type`` decodes as a signed byte (masked with 0xff), a 9P2000.L
error arrives as ``RpcError(errno)`` and a 9P2000 one as ``RpcError(ename)``.
"""

from __future__ import annotations

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _steps import Steps  # noqa: E402
from py9p import py9p  # noqa: E402  (p9fs's package, from PYTHONPATH; the code is in py9p.py9p)

# Linux open(2) flags used by Tlopen/Tlcreate
O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC = 0, 1, 2, 0o100, 0o1000
AT_REMOVEDIR = 0x200

# fids of our own; the client itself uses AFID=10, ROOT=11, CWD=12, F=13
PREPARED, PARTIAL, MISSING, NEW, BACK, STAT, DIRFID, LIST, SCRATCH, UNOPENED, GONE = range(100, 111)

DATA = b"written by p9fs\n"
MORE = b"second write at an offset\n"


def qtype(q: py9p.Qid) -> int:
    return q.type & 0xFF


def main() -> None:
    host, port, dialect = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dotl = dialect == "9P2000.L"
    ver = py9p.Version.from_str(dialect)
    steps = Steps()
    steps.results["module"] = {"ok": True, "value": os.path.abspath(py9p.__file__)}
    sock = socket.create_connection((host, port), timeout=5)
    c = steps.run("attach", lambda: py9p.Client(sock, py9p.Credentials(user=b"nobody"), ver=ver, msize=8192))
    if c is None:
        steps.dump()
        return
    R = c.ROOT
    steps.results["attach"]["value"] = {"msize": c.msize, "version": c.version.value}

    def openr(fid: int, flags: int = O_RDONLY) -> object:
        return c._lopen(fid, flags) if dotl else c._open(fid, flags)

    def read_all(fid: int) -> bytes:
        out, off = b"", 0
        while chunk := c._read(fid, off, 4096).data:
            out += chunk
            off += len(chunk)
        return out

    def describe(fid: int) -> dict:
        if dotl:
            r = c._getattr(fid)
            st = r.stat[0]
            return {"qid_type": qtype(r.qid), "mode": st.mode, "length": st.length,
                    "uid": st.uid, "gid": st.gid}
        st = c._stat(fid).stat[0]
        return {"qid_type": qtype(st.qid), "mode": st.mode, "length": st.length,
                "name": st.name, "uid": st.uid, "gid": st.gid}

    steps.run("root", lambda: describe(R))

    # walk two names to a file the test wrote with our client, open, read
    def walk_prepared() -> dict:
        r = c._walk(R, PREPARED, ["sub", "note.txt"])
        opened = openr(PREPARED)
        data = read_all(PREPARED)
        c._clunk(PREPARED)
        return {"wqid_types": [qtype(q) for q in r.wqid], "open_qid_type": qtype(opened.qid),
                "iounit": opened.iounit, "data": data}

    steps.run("walk_prepared", walk_prepared)

    # walk(5): the first name walks, the second does not: Rwalk with one qid,
    # and newfid is not made
    steps.run("walk_partial", lambda: [qtype(q) for q in c._walk(R, PARTIAL, ["sub", "missing", "deeper"]).wqid])
    steps.run("walk_partial_newfid_unused", lambda: c._clunk(PARTIAL))
    # the first name fails: an error, not an empty Rwalk
    steps.run("walk_missing", lambda: c._walk(R, MISSING, ["no-such-file"]).wqid)

    def open_missing() -> object:
        if dotl:
            c._walk(R, MISSING, ["no-such-file.txt"])
            return c._lopen(MISSING, O_RDONLY)
        return c.open("no-such-file.txt")  # the client's own helper: walk then open

    steps.run("open_missing", open_missing)

    # create a file, write twice, read back on the same (ORDWR) fid
    def create() -> dict:
        c._walk(R, NEW, [])
        if dotl:
            r = c._lcreate(NEW, "from-p9fs.txt", O_RDWR | O_CREAT, 0o644, 0)
        else:
            r = c._create(NEW, "from-p9fs.txt", 0o644, py9p.ORDWR)
        return {"qid_type": qtype(r.qid), "iounit": r.iounit}

    steps.run("create", create)
    steps.run("write", lambda: [c._write(NEW, 0, DATA).count, c._write(NEW, len(DATA), MORE).count])
    steps.run("read_same_fid", lambda: c._read(NEW, 0, 4096).data)
    steps.run("clunk_created", lambda: c._clunk(NEW))

    def read_back() -> bytes:
        c._walk(R, BACK, ["from-p9fs.txt"])
        openr(BACK)
        try:
            return read_all(BACK)
        finally:
            c._clunk(BACK)

    steps.run("read_back", read_back)

    def stat() -> dict:
        c._walk(R, STAT, ["from-p9fs.txt"])
        try:
            return describe(STAT)
        finally:
            c._clunk(STAT)

    steps.run("stat", stat)

    # a directory, and a scratch file to remove later
    def mkdir() -> int:
        if dotl:
            return qtype(c._mkdir(R, "dir-p9fs", 0o755).qid)
        c._walk(R, DIRFID, [])
        try:
            return qtype(c._create(DIRFID, "dir-p9fs", py9p.DMDIR | 0o755, py9p.OREAD).qid)
        finally:
            c._clunk(DIRFID)

    steps.run("mkdir", mkdir)

    def scratch() -> int:
        c._walk(R, SCRATCH, [])
        if dotl:
            c._lcreate(SCRATCH, "scratch.txt", O_WRONLY | O_CREAT, 0o600, 0)
        else:
            c._create(SCRATCH, "scratch.txt", 0o600, py9p.OWRITE)
        n = c._write(SCRATCH, 0, b"temporary").count
        c._clunk(SCRATCH)
        return n

    steps.run("create_scratch", scratch)

    def listing() -> list:
        c._walk(R, LIST, [])
        openr(LIST)
        out = []
        try:
            if dotl:
                off = 0
                while entries := c._readdir(LIST, off, 4096).stat:
                    for e in entries:
                        out.append({"name": e.name, "qid_type": qtype(e.qid), "dtype": e.type})
                        off = e.offset
            else:  # whole stat entries; decoded by the client's own marshaller, .u fields too
                m = py9p.Marshal9P(dotu=c.dotu)
                m.setBuffer(read_all(LIST))
                m.buf.seek(0)
                stats: list = []
                m.decstat(stats, 0)
                for d in stats:
                    e = {"name": d.name.decode(), "qid_type": qtype(d.qid), "mode": d.mode, "length": d.length}
                    if c.dotu:
                        e["uidnum"] = d.uidnum
                    out.append(e)
        finally:
            c._clunk(LIST)
        return sorted(out, key=lambda e: e["name"])

    steps.run("list_root", listing)

    # reading a fid that was walked but never opened is an error
    def read_unopened() -> bytes:
        c._walk(R, UNOPENED, ["hello.txt"])
        try:
            return c._read(UNOPENED, 0, 100).data
        finally:
            c._clunk(UNOPENED)

    steps.run("read_unopened", read_unopened)

    # remove: a file by its fid, the directory (unlinkat on .L), then they are gone
    def remove_file() -> None:
        c._walk(R, SCRATCH, ["scratch.txt"])
        c._remove(SCRATCH)  # remove clunks the fid

    steps.run("remove_file", remove_file)

    def remove_dir() -> None:
        if dotl:
            c._unlinkat(R, "dir-p9fs", AT_REMOVEDIR)
        else:
            c._walk(R, DIRFID, ["dir-p9fs"])
            c._remove(DIRFID)

    steps.run("remove_dir", remove_dir)
    steps.run("walk_removed", lambda: c._walk(R, GONE, ["scratch.txt"]).wqid)
    steps.run("clunk_removed_fid", lambda: c._clunk(SCRATCH))  # must be unknown now
    steps.run("close", lambda: c._fullclose())
    steps.dump()


if __name__ == "__main__":
    main()
