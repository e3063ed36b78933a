"""Drive a 9P server with python-9p 0.1.0 (plain 9P2000 on plan9port's C codec).

Run in its own process with PYTHONPATH set to the python-9p install directory:

    python drive_python9p.py HOST PORT

Expects the tree the test prepared (``hello.txt``, ``sub/note.txt``) and
prints a JSON object, one entry per step: {"ok": true, "value": ...} or
{"ok": false, "error": ..., "detail": ...}.  Every message goes through
plan9port's convS2M/convM2S, so a malformed reply fails in the C decoder.
"""

from __future__ import annotations

import os
import struct
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import py9p  # noqa: E402  (python-9p's package, from PYTHONPATH)
from _steps import Steps  # noqa: E402

ROOT = 0
DATA = b"written by python-9p\n"
NOCHANGE = dict(type=0xFFFF, dev=0xFFFFFFFF, qid=py9p.Qid(0xFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF),
                mode=0xFFFFFFFF, atime=0xFFFFFFFF, mtime=0xFFFFFFFF)
LENGTH_AT = 2 + 2 + 4 + 13 + 4 + 4 + 4  # size type dev qid mode atime mtime, then length[8]


def dir_dict(d: py9p.Dir) -> dict:
    return {"name": d.name, "qid_type": d.qid.type, "mode": d.mode, "length": d.length,
            "uid": d.uid, "gid": d.gid, "muid": d.muid, "mtime": d.mtime}


def split_stats(data: bytes) -> list[bytes]:
    """A directory read is whole stat entries back to back, each size[2]-prefixed."""
    out = []
    while data:
        (n,) = struct.unpack_from("<H", data)
        out.append(data[: 2 + n])
        data = data[2 + n :]
    return out


def wstat_bytes(name: str = "", length: int | None = None) -> bytes:
    """A wstat entry that changes only ``name`` and/or ``length`` (the rest: don't touch)."""
    raw = py9p.encode_dir(py9p.Dir(length=length or 0, name=name, uid="", gid="", muid="", **NOCHANGE))
    if length is None:  # the codec rejects ~0 for length; patch the don't-touch value in
        raw = raw[:LENGTH_AT] + b"\xff" * 8 + raw[LENGTH_AT + 8 :]
    return raw


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    steps = Steps()
    steps.results["module"] = {"ok": True, "value": os.path.abspath(py9p.__file__)}
    fids = iter(range(1, 1000))
    c = py9p.Client.connect_tcp(host, port, timeout=5, msize=8192)

    def negotiate() -> dict:
        r = c.negotiate()
        return {"version": r.version, "msize": r.msize}

    steps.run("version", negotiate)
    # no authentication: Tauth is refused with Rerror, and attach takes afid NOFID
    steps.run("auth", lambda: c.rpc(py9p.Tauth(afid=99, uname="nobody", aname=""), py9p.Rauth).aqid)
    steps.run("attach", lambda: c.attach(ROOT, uname="nobody").type)
    steps.run("root_stat", lambda: dir_dict(c.stat(ROOT)))

    def read_all(fid: int, count: int = 4096) -> bytes:
        out = b""
        while chunk := c.read(fid, count, offset=len(out)):
            out += chunk
        return out

    def walk_prepared() -> dict:
        f = next(fids)
        qids = c.walk(ROOT, f, "sub/note.txt")
        qid, iounit = c.open(f, py9p.OREAD)
        try:
            return {"wqid_types": [q.type for q in qids], "open_qid_type": qid.type,
                    "iounit": iounit, "data": read_all(f)}
        finally:
            c.clunk(f)

    steps.run("walk_prepared", walk_prepared)
    partial = next(fids)
    steps.run("walk_partial", lambda: [q.type for q in c.walk(ROOT, partial, "sub/missing/deeper")])
    steps.run("walk_partial_newfid_unused", lambda: c.clunk(partial))
    steps.run("walk_missing", lambda: c.walk(ROOT, next(fids), "no-such-file"))

    def open_missing() -> object:
        f = next(fids)
        c.walk(ROOT, f, "no-such-file.txt")
        return c.open(f, py9p.OREAD)

    steps.run("open_missing", open_missing)

    new = next(fids)

    def create() -> dict:
        c.walk(ROOT, new, ())
        qid, iounit = c.create(new, "from-python9p.txt", 0o644, py9p.ORDWR)
        return {"qid_type": qid.type, "iounit": iounit}

    steps.run("create", create)
    steps.run("write", lambda: c.write(new, DATA, offset=0))
    steps.run("read_same_fid", lambda: c.read(new, 100, offset=0))
    steps.run("clunk_created", lambda: c.clunk(new))

    def read_back() -> bytes:
        f = next(fids)
        c.walk(ROOT, f, "from-python9p.txt")
        c.open(f, py9p.OREAD)
        try:
            return read_all(f)
        finally:
            c.clunk(f)

    steps.run("read_back", read_back)

    def stat() -> dict:
        f = next(fids)
        c.walk(ROOT, f, "from-python9p.txt")
        try:
            return dir_dict(c.stat(f))
        finally:
            c.clunk(f)

    steps.run("stat", stat)

    # a file larger than one message: written and read in iounit-sized pieces
    big = bytes(range(256)) * 100  # 25600 bytes, msize 8192

    def big_file() -> dict:
        f = next(fids)
        c.walk(ROOT, f, ())
        _, iounit = c.create(f, "big.bin", 0o644, py9p.OWRITE)
        iounit = iounit or c.msize - py9p.IOHDRSZ
        off, writes = 0, 0
        while off < len(big):
            off += c.write(f, big[off : off + iounit], offset=off)
            writes += 1
        c.clunk(f)
        g = next(fids)
        c.walk(ROOT, g, "big.bin")
        c.open(g, py9p.OREAD)
        try:
            back = read_all(g, count=c.msize - py9p.IOHDRSZ)
        finally:
            c.clunk(g)
        return {"writes": writes, "same": back == big, "length": len(back)}

    steps.run("big_file", big_file)

    def mkdir() -> int:
        f = next(fids)
        c.walk(ROOT, f, ())
        try:
            return c.create(f, "dir-python9p", py9p.DMDIR | 0o755, py9p.OREAD)[0].type
        finally:
            c.clunk(f)

    steps.run("mkdir", mkdir)

    def listing() -> list:
        f = next(fids)
        c.walk(ROOT, f, ())
        c.open(f, py9p.OREAD)
        try:
            entries = [py9p.decode_dir(s) for s in split_stats(read_all(f, count=600))]
        finally:
            c.clunk(f)
        return sorted((dir_dict(d) for d in entries), key=lambda d: d["name"])

    steps.run("list_root", listing)

    # several requests in flight at once on one connection: python-9p tags each
    def concurrent() -> list:
        results: list[bytes | str] = [b""] * 8

        def one(i: int, fid: int) -> None:
            try:
                c.walk(ROOT, fid, "hello.txt")
                c.open(fid, py9p.OREAD)
                results[i] = c.read(fid, 100)
                c.clunk(fid)
            except Exception as e:
                results[i] = f"{type(e).__name__}: {e}"

        threads = [threading.Thread(target=one, args=(i, 500 + i)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        return results

    steps.run("concurrent_reads", concurrent)
    # flushing a tag that is not in flight is answered with Rflush at once
    steps.run("flush_idle", lambda: type(c.rpc(py9p.Tflush(oldtag=777), py9p.Rflush)).__name__)

    # wstat: truncate, then rename; the rest of the entry says "don't touch"
    def wstat() -> dict:
        f = next(fids)
        c.walk(ROOT, f, ())
        c.create(f, "scratch.txt", 0o600, py9p.OWRITE)
        c.write(f, b"0123456789")
        c.clunk(f)
        g = next(fids)
        c.walk(ROOT, g, "scratch.txt")
        c.wstat(g, wstat_bytes(length=4))
        after_truncate = c.stat(g).length
        c.wstat(g, wstat_bytes(name="renamed.txt"))
        st = c.stat(g)
        c.clunk(g)
        return {"after_truncate": after_truncate, "name": st.name, "length": st.length}

    steps.run("wstat", wstat)

    def read_unopened() -> bytes:
        f = next(fids)
        c.walk(ROOT, f, "hello.txt")
        try:
            return c.read(f, 100)
        finally:
            c.clunk(f)

    steps.run("read_unopened", read_unopened)

    def open_dir_for_write() -> object:
        f = next(fids)
        c.walk(ROOT, f, "sub")
        try:
            return c.open(f, py9p.OWRITE)
        finally:
            c.clunk(f)

    steps.run("open_dir_for_write", open_dir_for_write)

    removed = next(fids)

    def remove() -> None:
        c.walk(ROOT, removed, "renamed.txt")
        c.remove(removed)
        f = next(fids)
        c.walk(ROOT, f, "dir-python9p")
        c.remove(f)

    steps.run("remove", remove)
    steps.run("walk_removed", lambda: c.walk(ROOT, next(fids), "renamed.txt"))
    steps.run("clunk_removed_fid", lambda: c.clunk(removed))  # remove clunks, even when it fails
    steps.run("clunk_root", lambda: c.clunk(ROOT))
    c.close()
    steps.dump()


if __name__ == "__main__":
    main()
