"""The embedded store: atomic, durable before it answers, clear when it cannot work."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fornax_sched.sched.store import Batch, SqliteStore, StoreError

ROOT = Path(__file__).resolve().parents[2]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_batches_round_trip_and_log_is_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        s = await SqliteStore.open(tmp_path / "state.db", log_keep=5)
        await s.apply(Batch().put("placements", "web-1", {"node": "fornax-02", "image": "web"})
                      .put("meta", "policy", "spread\n").note("placed web-1 on fornax-02"))
        await s.apply(Batch().put("placements", "web-1", {"node": "fornax-03", "image": "web"}))
        for i in range(10):
            await s.apply(Batch().note(f"line {i}"))
        assert await s.load("placements") == {"web-1": {"node": "fornax-03", "image": "web"}}
        assert await s.load("meta") == {"policy": "spread\n"}
        assert [line for _, line in await s.log_tail(100)] == [f"line {i}" for i in range(5, 10)]
        await s.apply(Batch().delete("placements", "web-1"))
        assert await s.load("placements") == {}
        await s.close()
    run(main())


def test_scan_reads_a_table_in_pieces_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        s = await SqliteStore.open(tmp_path / "state.db")
        b = Batch()
        for i in range(25):
            b.put("placements", f"c{i:02d}", {"created": (i * 7) % 25, "i": i})
        await s.apply(b)
        pieces = [rows async for rows in s.scan("placements", order="created", size=10)]
        assert [len(p) for p in pieces] == [10, 10, 5]
        assert [d["created"] for p in pieces for _, d in p] == list(range(25))
        assert sorted(k for p in pieces for k, _ in p) == [f"c{i:02d}" for i in range(25)]
        with pytest.raises(ValueError, match="bad order field"):
            [rows async for rows in s.scan("placements", order="x'); DROP TABLE placements; --")]
        await s.close()
    run(main())


def test_a_failing_batch_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        s = await SqliteStore.open(tmp_path / "state.db")
        await s.apply(Batch().put("nodes", "a", 1))
        with pytest.raises(StoreError):
            await s.apply(Batch().put("nodes", "a", 2).put("nodes", "b", object()))
        assert await s.load("nodes") == {"a": 1}
        with pytest.raises(ValueError, match="unknown table"):
            Batch().put("nope", "k", 1)
        await s.close()
    run(main())


def test_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    async def main() -> None:
        with pytest.raises(StoreError, match="cannot open the store .*file/state.db"):
            await SqliteStore.open(blocker / "state.db")
        junk = tmp_path / "junk.db"
        junk.write_bytes(b"this is not a database" * 100)
        with pytest.raises(StoreError, match="cannot open the store"):
            await SqliteStore.open(junk)
    run(main())


def test_what_apply_acknowledged_survives_kill_9(tmp_path: Path) -> None:
    """A writer acknowledges each batch on stdout, then is killed mid-stream."""
    db = tmp_path / "state.db"
    script = textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(ROOT)!r})
        from fornax_sched.sched.store import Batch, SqliteStore
        async def main():
            s = await SqliteStore.open({str(db)!r})
            i = 0
            while True:
                await s.apply(Batch().put("placements", f"c{{i}}", {{"n": i}}).note(f"placed c{{i}}"))
                print(i, flush=True)
                i += 1
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = -1
    while acked < 200:
        acked = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    async def check() -> None:
        s = await SqliteStore.open(db)
        got = await s.load("placements")
        assert all(f"c{i}" in got for i in range(acked + 1))
        lines = [line for _, line in await s.log_tail(10_000)]
        assert len(lines) == len(got)  # each batch landed whole: a placement and its log line
        await s.close()
    run(check())
