"""What only the SQLite store does: refusing files that are not a store, starting afresh on
request, converting the old layout, and a full disk."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fornax_sched.sched.store import Batch, StoreError, open_store

from ..helpers import run


def test_an_empty_or_damaged_file_is_refused_not_restarted(tmp_path: Path) -> None:
    path = tmp_path / "sched.db"
    path.write_bytes(b"")
    with pytest.raises(StoreError, match=r"is empty \(0 bytes\).*--fresh"):
        run(open_store(str(path)))
    assert path.read_bytes() == b""  # left as it was
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(StoreError, match="not a SQLite file"):
        run(open_store(str(path)))
    path.unlink()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE other (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="without a scheduler's tables"):
        run(open_store(str(path)))
    with pytest.raises(StoreError, match="there is no store at"):
        run(open_store(str(tmp_path / "none.db"), create=False))


def test_a_truncated_store_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "sched.db"

    async def fill() -> None:
        s = await open_store(str(path))
        for i in range(50):
            b = Batch()
            for j in range(40):
                b.put("placements", f"p{i}-{j}", {"pad": "x" * 300})
            await s.apply(b)
        await s.close()

    run(fill())
    data = path.read_bytes()
    assert len(data) > 200_000
    path.write_bytes(data[: len(data) // 3])
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)

    async def reopen() -> None:
        s = await open_store(str(path))
        try:
            await s.load("placements")
        finally:
            await s.close()

    with pytest.raises(StoreError, match=str(path)):
        run(reopen())


def test_fresh_moves_the_old_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "sched.db"
    path.write_bytes(b"")

    async def go() -> str:
        s = await open_store(str(path), fresh=True)
        await s.apply(Batch().put("meta", "new", 1))
        cluster = s.cluster
        await s.close()
        s = await open_store(str(path))
        assert s.cluster == cluster and await s.load("meta") == {"new": 1}
        await s.close()
        return cluster

    run(go())
    aside = [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == b""


def test_a_store_of_the_old_layout_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "sched.db"
    db = sqlite3.connect(path)
    for t in ("placements", "nodes", "meta", "policies"):
        db.execute(f"CREATE TABLE {t} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, line TEXT NOT NULL)")
    db.execute("INSERT INTO placements VALUES ('web-1', '{\"node\": \"fornax-01\"}')")
    db.execute("INSERT INTO meta VALUES ('seq/web', '2')")
    db.execute("INSERT INTO log (at, line) VALUES (1.5, 'old line')")
    db.commit()
    db.close()

    async def go() -> None:
        s = await open_store(str(path))
        try:
            assert await s.load("placements") == {"web-1": {"node": "fornax-01"}}
            assert await s.load("meta") == {"seq/web": 2}
            assert await s.log_tail(5) == [(1.5, "old line")]
            await s.apply(Batch().note("new line"))
            assert [line for _, line in await s.log_tail(5)] == ["old line", "new line"]
            assert s.cluster
        finally:
            await s.close()

    run(go())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 3 MB: a disk that fills up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs and needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_reported_and_changes_nothing(small_disk: Path) -> None:
    path = small_disk / "sched.db"

    async def go() -> None:
        s = await open_store(str(path))
        try:
            await s.apply(Batch().put("meta", "kept", 1).note("before"))
            filler = small_disk / "filler"
            with filler.open("wb") as f:  # leave almost nothing
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            err, failed_at = None, -1
            for i in range(200):  # until the WAL cannot grow
                b = Batch().put("meta", "kept", 10 + i)
                for j in range(20):
                    b.put("placements", f"p{i}-{j}", {"pad": "x" * 2000})
                try:
                    await s.apply(b.note(f"batch {i}"))
                except StoreError as e:
                    err, failed_at = e, i
                    break
            assert err is not None, "the disk never filled"
            assert "full" in str(err) and "cannot rollback" not in str(err) and str(path) in str(err)
            filler.unlink()
            # nothing of the failed batch is there; every earlier batch is
            assert (await s.get("meta", "kept")).value == (10 + failed_at - 1 if failed_at else 1)  # type: ignore
            rows = await s.load("placements")
            assert not [k for k in rows if k.startswith(f"p{failed_at}-")]
            assert len(rows) == 20 * failed_at
            assert f"batch {failed_at}" not in [line for _, line in await s.log_tail(5)]
            await s.apply(Batch().put("meta", "kept", 3).note("after"))
            assert (await s.get("meta", "kept")).value == 3  # type: ignore[union-attr]
            assert "after" in [line for _, line in await s.log_tail(3)]
        finally:
            await s.close()

    run(go())


def test_sync_normal_is_asked_for_by_name_and_keeps_what_was_committed(tmp_path: Path) -> None:
    path = tmp_path / "sched.db"

    async def go() -> None:
        store = await open_store(f"sqlite:{path}?sync=normal")
        assert store.where == f"{path}?sync=normal"
        db = store.kv._conn()  # type: ignore[attr-defined]
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL (FULL is 2)
        b = Batch()
        b.put("placements", "web-1", {"node": "a"})
        await store.apply(b)
        await store.close()
        again = await open_store(str(path))  # the default: every commit fsynced
        assert again.kv._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # type: ignore[attr-defined]
        assert (await again.load("placements")) == {"web-1": {"node": "a"}}
        await again.close()

    run(go())
    with pytest.raises(StoreError, match=r"sync='sometimes': want full or normal"):
        run(open_store(f"sqlite:{path}?sync=sometimes"))
