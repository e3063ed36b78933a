"""Our ramfs read by diod's C clients, diodcat and diodls (Debian package diod).

They speak 9P2000.L through diod's libnpclient: Tversion, Tauth (and go on
without authentication only when the server answers Rlerror ENOENT, which is
what diod's own server sends when no auth is needed), Tattach with afid NOFID,
then Twalk/Tlopen/Tread or Treaddir/Tgetattr.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error

from ..conftest import ServerProc, need_binary, start_ramfs, stop
from .util import prepare

FILES = {
    "greeting.txt": b"hello, diod\n",
    "deep/er/path/leaf.txt": b"three directories down\n",
    "big.bin": bytes(range(256)) * 800,  # 204800 bytes: many reads at msize 8192
    "empty": b"",
}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProc]:
    server = start_ramfs()
    try:
        prepare(server, FILES)
        yield server
    finally:
        stop(server)


def diod(prog: str, server: ServerProc, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run diodcat/diodls against the ramfs; any attach name serves the ramfs root."""
    path = need_binary(prog)
    return subprocess.run([path, "-s", f"{server.host}:{server.port}", "-a", "/", *args],
                          capture_output=True, timeout=20)


def test_diodcat_reads_what_our_client_wrote(server: ServerProc) -> None:
    p = diod("diodcat", server, "greeting.txt")
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == FILES["greeting.txt"]


def test_diodcat_walks_several_names(server: ServerProc) -> None:
    p = diod("diodcat", server, "deep/er/path/leaf.txt", "empty", "greeting.txt")
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == FILES["deep/er/path/leaf.txt"] + FILES["greeting.txt"]


def test_diodcat_reads_a_file_larger_than_msize(server: ServerProc) -> None:
    p = diod("diodcat", server, "-m", "8192", "big.bin")
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == FILES["big.bin"]


def test_diodcat_missing_file(server: ServerProc) -> None:
    p = diod("diodcat", server, "no-such-file")
    assert p.returncode != 0
    assert b"No such file or directory" in p.stderr, p.stderr.decode()


def test_diodls_lists_the_root(server: ServerProc) -> None:
    p = diod("diodls", server)
    assert p.returncode == 0, p.stderr.decode()
    assert sorted(p.stdout.decode().split()) == ["big.bin", "deep", "empty", "greeting.txt"]


def test_diodls_lists_a_subdirectory(server: ServerProc) -> None:
    p = diod("diodls", server, "deep/er")
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode().split() == ["path"]


def test_diodls_long_listing_of_a_file(server: ServerProc) -> None:
    # walk + Tgetattr: mode, link count, owner, size
    p = diod("diodls", server, "-l", "greeting.txt")
    assert p.returncode == 0, p.stderr.decode()
    line = p.stdout.decode().strip()
    assert re.fullmatch(r"-rw-rw-rw-\S*\s+1\s+\S+\s+\S+\s+12\s+.*\sgreeting\.txt", line), line


# diodls -l DIR walks from the directory fid it opened for Treaddir: allowed on 9P2000.L.
def test_diodls_long_listing_of_a_directory(server: ServerProc) -> None:
    p = diod("diodls", server, "-l", "deep/er/path")
    assert p.returncode == 0 and not p.stderr, p.stderr.decode()
    line = p.stdout.decode().strip()
    assert re.fullmatch(r"-rw-rw-rw-\S*\s+1\s+\S+\s+\S+\s+23\s+.*\sleaf\.txt", line), line


def test_our_client_falls_back_to_9p2000L_against_the_diod_server(tmp_path: Path) -> None:
    """diod refuses 9P2000.u with an Rlerror; a client asking for .u then .L gets .L."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_text("from diod\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([need_binary("diod"), "-f", "-n", "-S", "-U", "root", "-l", f"127.0.0.1:{port}",
                             "-e", str(export)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def main() -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                c = await Client.connect(f"tcp!127.0.0.1!{port}", version=("9P2000.u", "9P2000.L"),
                                         aname=str(export), timeout=3)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert c.dialect == "9P2000.L"
        assert await c.read_file("f") == b"from diod\n"
        await c.close()
        with pytest.raises(P9Error, match="does not speak 9P2000.u"):
            await Client.connect(f"tcp!127.0.0.1!{port}", version="9P2000.u", aname=str(export), timeout=3)

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        proc.kill()
        proc.wait()
