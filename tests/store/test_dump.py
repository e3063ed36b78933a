"""``fornax-sched store export`` and ``import``: SQLite to etcd and back, through the real command."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fornax_sched.sched.store import Batch, open_store

from ..etcd_cluster import EtcdCluster
from ..helpers import run
from .conftest import unique_prefix

ROOT = Path(__file__).resolve().parents[2]


def store_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fornax_sched", "store", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


async def fill(spec: str) -> str:
    s = await open_store(spec)
    try:
        b = Batch()
        for i in range(300):  # more than one etcd transaction holds
            b.put("placements", f"web-{i:03d}", {"node": f"fornax-{i % 3 + 1:02d}", "cpu": 0.5, "name": "wéb"})
        b.put("nodes", "fornax-01", {"addr": "tcp!127.0.0.1!5641"}).put("meta", "seq/web", 300)
        b.put("policies", "current", "pack")
        for i in range(5):
            b.note(f"line {i}")
        await s.apply(b)
        return s.cluster
    finally:
        await s.close()


async def state(spec: str) -> tuple[str, dict[str, dict[str, object]], list[str]]:
    s = await open_store(spec, create=False)
    try:
        tables = {t: await s.load(t) for t in ("placements", "nodes", "meta", "policies")}
        return s.cluster, tables, [line for _, line in await s.log_tail(100)]
    finally:
        await s.close()


def test_sqlite_to_etcd_and_back(tmp_path: Path, etcd1: EtcdCluster, request: pytest.FixtureRequest) -> None:
    db = str(tmp_path / "sched.db")
    cluster = run(fill(db))
    before = run(state(db))
    dump = tmp_path / "state.jsonl"
    r = store_cmd("export", str(dump), "--store", db)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"exported 303 rows and 5 log lines of cluster {cluster}" in r.stdout
    head = json.loads(dump.read_text().splitlines()[0])
    assert head["format"] == "fornax-sched-store" and head["version"] == 1 and head["kind"] == "sqlite"

    etcd = etcd1.spec(unique_prefix(request))
    r = store_cmd("import", str(dump), "--store", etcd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "imported 303 rows and 5 log lines" in r.stdout
    assert run(state(etcd)) == before  # the same cluster, rows and log

    # A second import over it is refused and changes nothing; --force replaces what it holds.
    r = store_cmd("import", str(dump), "--store", etcd)
    assert r.returncode == 1 and "holds state already (303 rows, and log lines): refusing" in r.stdout

    async def change() -> None:
        s = await open_store(etcd)
        await s.apply(Batch().put("placements", "extra", {}).delete("placements", "web-000").note("later"))
        await s.close()

    run(change())
    r = store_cmd("import", str(dump), "--store", etcd, "--force")
    assert r.returncode == 0, r.stdout
    assert run(state(etcd)) == before

    # And back into a new SQLite file.
    back = tmp_path / "back.jsonl"
    assert store_cmd("export", str(back), "--store", etcd).returncode == 0
    assert store_cmd("export", str(back), "--store", etcd).returncode == 1  # no writing over a file
    db2 = str(tmp_path / "again.db")
    r = store_cmd("import", str(back), "--store", db2)
    assert r.returncode == 0, r.stdout
    assert run(state(db2)) == before


def test_a_bad_or_cut_file_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    db = str(tmp_path / "sched.db")
    run(fill(db))
    dump = tmp_path / "state.jsonl"
    assert store_cmd("export", str(dump), "--store", db).returncode == 0
    lines = dump.read_text().splitlines()
    target = str(tmp_path / "target.db")
    cases = {
        "cut": ("\n".join(lines[:-1]), "ends without its last line (cut short?)"),
        "miscounted": ("\n".join(lines[:3] + lines[-1:]), "the last line counts 303 rows and 5 log lines, the "
                                                          "file holds 2 and 0"),
        "table": ("\n".join([lines[0], '{"table": "bogus", "key": "k", "value": 1}'] + lines[1:]),
                  "line 2: unknown table 'bogus'"),
        "json": ("\n".join([lines[0], "{not json"] + lines[1:]), "line 2: not JSON"),
        "version": (lines[0].replace('"version": 1', '"version": 9'), "export format version 9, this"),
        "other": ('{"hello": 1}', "line 1: not a fornax-sched store export"),
        "twice": ("\n".join(lines[:2] + lines[1:]), "a second time"),
    }
    for name, (text, why) in cases.items():
        bad = tmp_path / f"{name}.jsonl"
        bad.write_text(text + "\n")
        r = store_cmd("import", str(bad), "--store", target)
        assert r.returncode == 1 and why in r.stdout and str(bad) in r.stdout, (name, r.stdout)
        assert len(r.stdout.strip().splitlines()) == 1, r.stdout
        assert not Path(target).exists()  # refused before the store was even opened
    r = store_cmd("export", str(tmp_path / "x.jsonl"), "--store", str(tmp_path / "none.db"))
    assert r.returncode == 1 and "there is no store at" in r.stdout


def test_import_is_refused_while_a_scheduler_serves_the_store(etcd1: EtcdCluster, tmp_path: Path,
                                                              request: pytest.FixtureRequest) -> None:
    db = str(tmp_path / "sched.db")
    run(fill(db))
    dump = tmp_path / "state.jsonl"
    assert store_cmd("export", str(dump), "--store", db).returncode == 0
    etcd = etcd1.spec(unique_prefix(request))

    async def go() -> None:
        s = await open_store(etcd)
        lead = await s.campaign("scheduler", "a serving scheduler", 5, wait=False)
        try:
            proc = await asyncio.create_subprocess_exec(  # the event loop goes on: the lease is kept alive
                sys.executable, "-m", "fornax_sched", "store", "import", str(dump), "--store", etcd,
                stdout=asyncio.subprocess.PIPE, cwd=ROOT)
            out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
            assert proc.returncode == 1 and "in use by another scheduler" in out and "a serving scheduler" in out, out
            assert await s.load("placements") == {}
        finally:
            await lead.resign()
            await s.close()

    run(go())
