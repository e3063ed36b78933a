"""Fixtures shared by the whole suite: a ramfs in its own process, and checks
that the system components a test needs are really there.

The test command (``./dev test``) installs every component; a missing one is
a failure, never a skip, so a green run always means the real peer ran.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .etcd_cluster import EtcdCluster

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FORNAX_CACHE", ROOT / ".cache"))


def need_binary(name: str) -> str:
    """Path of a system program the test needs; fail loudly if it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run ./dev test, which installs it")
    return path


def foreign_client(name: str) -> Path:
    """Directory holding a third-party 9P client installed with pip --target.

    p9fs and python-9p both install a top-level ``py9p`` package, so each
    lives in its own directory and runs in its own process.
    """
    path = CACHE / "clients" / name
    if not path.is_dir():
        pytest.fail(f"9P client {name} is not installed in {path}: run ./dev test, which installs it")
    return path


@dataclass
class ServerProc:
    addr: str  # dial string
    host: str
    port: int
    proc: subprocess.Popen[str]


def spawn_serving(cmd: list[str], what: str,
                  preexec_fn: Callable[[], None] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a daemon and wait for its first line, which must say where it is serving."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=preexec_fn)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"{what} did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, line


def start_ramfs(*extra: str, preexec_fn: Callable[[], None] | None = None) -> ServerProc:
    """Start ``fornax-sched 9p ramfs`` on a free loopback port (``preexec_fn``: set its limits, say)."""
    proc, line = spawn_serving(
        [sys.executable, "-m", "fornax_sched", "9p", "ramfs", "tcp!127.0.0.1!0", *extra], "ramfs", preexec_fn)
    addr = line.rsplit(" ", 1)[1].strip()
    _, host, port = addr.split("!")
    return ServerProc(addr, host, int(port), proc)


def stop(server: ServerProc) -> None:
    from .helpers import stop_process

    stop_process(server.proc, timeout=5)


@pytest.fixture
def ramfs() -> Iterator[ServerProc]:
    """A ramfs for the test; stopped after it (continued first, for a test that SIGSTOPped it)."""
    server = start_ramfs()
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        stop(server)
    assert server.proc.returncode in (0, -15), f"ramfs exited with {server.proc.returncode}"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A real etcd of one member on loopback, for the test (tests/etcd_cluster.py)."""
    cluster = EtcdCluster(tmp_path / "etcd", members=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
