"""Smoke test of the QEMU harness: the kernel's v9fs client against diod.

Needs diod (./dev test installs it; a missing diod is a failure, not a skip).
The first run builds the guest (downloads ~70 MB of Debian packages into the
cache directory).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import need_binary
from .qemu import default_cache_dir, run_guest

pytestmark = pytest.mark.vm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def diod(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A diod exporting tmp_path/export on a free loopback port."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "file").write_text("hello from diod\n")
    binary = need_binary("diod")
    port = _free_port()
    proc = subprocess.Popen(
        # -S -U root: squash every user to root. Without it the kernel's first
        # attach (as nobody) gets EACCES, because pytest's tmp dirs are 0700.
        [binary, "-f", "-n", "-S", "-U", "root", "-l", f"127.0.0.1:{port}", "-e", str(export)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until it listens: QEMU connects as soon as it starts
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield export, port
    finally:
        proc.kill()
        proc.wait()


def test_mount_read_write_twice(diod: tuple[Path, int]) -> None:
    export, port = diod
    opts = f"trans=tcp,version=9p2000.L,aname={export}"
    run = run_guest(
        f"mkdir /mnt /mnt2\n"
        f"mount -t 9p -o {opts},port=564 10.0.2.100 /mnt\n"
        f"mount -t 9p -o {opts},port=565 10.0.2.101 /mnt2\n"
        "cat /mnt/file && echo hi > /mnt/new && cat /mnt2/new\n",
        [("10.0.2.100", 564, port), ("10.0.2.101", 565, port)],
        cache_dir=default_cache_dir(),
    )
    assert run.returncode == 0, run.console
    assert run.output == "hello from diod\nhi\n"
    assert (export / "new").read_text() == "hi\n"
