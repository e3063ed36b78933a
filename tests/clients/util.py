"""Helpers for the foreign-client tests: prepare and inspect a ramfs with our
own client, and run a driver script with one foreign ``py9p`` on its path."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error

from ..conftest import ServerProc, foreign_client

HERE = Path(__file__).resolve().parent

# What the test writes with our client before a foreign client looks.
PREPARED = {"hello.txt": b"hello from fornax\n", "sub/note.txt": b"a note\n"}


def ours(server: ServerProc, fn: Any) -> Any:
    """Run ``await fn(client)`` with our client attached over 9P2000.L."""

    async def go() -> Any:
        c = await Client.connect(server.addr, version="9P2000.L", timeout=5)
        try:
            return await fn(c)
        finally:
            await c.close()

    return asyncio.run(go())


def prepare(server: ServerProc, files: dict[str, bytes] = PREPARED) -> None:
    async def write(c: Client) -> None:
        for path, data in files.items():
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                try:
                    await c.mkdir("/".join(parts[:i]))
                except P9Error as e:
                    if e.errno != errno.EEXIST:
                        raise
            await c.write_file(path, data, create=True)

    ours(server, write)


def drive(script: str, client: str, server: ServerProc, *args: str) -> dict[str, dict[str, Any]]:
    """Run tests/clients/SCRIPT against the server with only CLIENT's py9p importable."""
    where = foreign_client(client)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(where)
    proc = subprocess.run(
        [sys.executable, str(HERE / script), server.host, str(server.port), *args],
        capture_output=True, text=True, env=env, timeout=30,
    )
    if proc.returncode != 0:
        pytest.fail(f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    results: dict[str, dict[str, Any]] = json.loads(proc.stdout)
    # the py9p that ran must be the one installed for CLIENT, not some other
    assert Path(results["module"]["value"]).is_relative_to(where), results["module"]
    return results


def ok(results: dict[str, dict[str, Any]], step: str) -> Any:
    """The value of a step that must have succeeded."""
    r = results.get(step)
    assert r is not None, f"step {step!r} did not run"
    assert r["ok"], f"step {step!r} failed: {r['error']}: {r['detail']!r}\n{r.get('trace', '')}"
    return r["value"]


def failed(results: dict[str, dict[str, Any]], step: str) -> Any:
    """The error detail of a step that must have failed (an ename, or an errno on 9P2000.L)."""
    r = results.get(step)
    assert r is not None, f"step {step!r} did not run"
    assert not r["ok"], f"step {step!r} should have failed but returned {r['value']!r}"
    return r["detail"]
