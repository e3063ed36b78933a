"""What every test module shares: running a coroutine, waiting for a condition, stopping a process.

Tests wait for conditions with a deadline (``eventually``), never for a
fixed time; a process a test started is stopped (``stop_process``) whether
the test passed or not.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 300.0) -> T:
    """Run a coroutine to its end on a fresh event loop; a test that hangs fails after ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 10.0, interval: float = 0.1) -> T:
    """Retry an async check until it returns something true; the last error or value explains a failure."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = await check()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001 - reported below if it never passes
            last = e
        await asyncio.sleep(interval)
    raise AssertionError(f"not true within {timeout}s: last {last!r}")


def wait_until(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """``eventually`` for plain functions."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout}s: last {last!r}")


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 20.0) -> int | None:
    """SIGTERM, then SIGKILL if it does not end in ``timeout``; the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drain(proc: subprocess.Popen[Any]) -> None:
    """Read a daemon's pipes in the background, so that it never blocks on a full one (a chatty
    scheduler did, once its log had filled 64 KB of stderr).  Once per process."""
    import threading

    if getattr(proc, "_drained", False):
        return
    proc._drained = True  # type: ignore[attr-defined]
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            threading.Thread(target=pipe.read, daemon=True).start()
