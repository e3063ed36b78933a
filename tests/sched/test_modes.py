"""Operating modes (modes.py): normal, degraded when the store cannot be read or written, recovery
when it is reachable but empty; decided as a function of what was seen, and seen through real
schedulers on a failing SQLite and on a real etcd stopped, cut down to two members, and wiped."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error
from fornax_sched.sched.modes import DEGRADED, NORMAL, RECOVERY, Mode, Seen, decide
from fornax_sched.sched.plans import CommandError
from fornax_sched.sched.service import LOOK_TRIES, Scheduler
from fornax_sched.sched.store import open_store

from ..etcd_cluster import EtcdCluster
from ..helpers import eventually, run
from ..node.cluster import read
from .harness import SchedProc, ctl

# ---------------------------------------------------------------- the decision


def test_decide_is_a_function_of_what_was_seen_and_the_time() -> None:
    ok = Seen(identity="c1", expected="c1", where="db")
    normal = Mode(NORMAL, "", 0.0)
    assert decide(normal, ok, 5.0) is normal
    down = decide(normal, Seen(read_error="cannot read the store db: gone", identity="c1", expected="c1"), 5.0)
    assert (down.name, down.reason, down.since) == (DEGRADED, "cannot read the store db: gone", 5.0)
    # a second failure, with other words, keeps the first reason and since
    assert decide(down, Seen(write_error="cannot write the store db: full", expected="c1"), 9.0) is down
    back = decide(down, ok, 12.0)
    assert (back.name, back.since) == (NORMAL, 12.0)
    empty = decide(down, Seen(identity=None, expected="c1", where="db"), 13.0)
    assert empty.name == RECOVERY and "db is reachable but holds no state" in empty.reason and "c1" in empty.reason
    # a failing store does not end recovery, nor does it become normal on its own while empty
    assert decide(empty, Seen(read_error="x", expected="c1"), 14.0) is empty
    assert decide(empty, Seen(identity=None, expected="c1"), 15.0) is empty
    other = decide(normal, Seen(identity="c2", expected="c1", where="db"), 16.0)
    assert other.name == RECOVERY and "cluster c2, not of cluster c1" in other.reason
    assert decide(empty, ok, 17.0).name == NORMAL  # the state is back (recover, an import)
    assert "changes are refused until the store is back" in down.refusal("T")
    assert "ctl: recover" in empty.refusal("T")


def test_a_late_look_is_asked_again_only_while_the_scheduler_itself_stood_still(tmp_path: Path) -> None:
    """A look at the store that has no answer in time counts at once while the scheduler's loop was
    free; when the loop itself stood still meanwhile (a long step, a collection), the lateness may be
    the scheduler's own: the look is asked again at once, up to LOOK_TRIES tries in all."""
    async def main() -> None:
        store = await open_store(str(tmp_path / "sched.db"))
        sched = Scheduler(store, interval=0.2, probe_timeout=0.4)
        real, slow = store.probe, {"looks": 0, "stall": 0.0}

        async def probe(write: bool = False) -> str | None:
            if slow["looks"]:
                slow["looks"] -= 1
                if slow["stall"]:  # the loop stands still (this process's fault, not the store's)
                    asyncio.get_running_loop().call_soon(time.sleep, slow["stall"])
                await asyncio.sleep(1.0)
            return await real(write)

        async def until(mode: str) -> None:
            for _ in range(100):
                if sched.mode.name == mode:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"still {sched.mode.name}: {sched.mode.reason}")

        store.probe = probe  # type: ignore[method-assign]
        await sched.start()
        try:
            slow.update(looks=1, stall=0.3)
            for _ in range(30):
                await asyncio.sleep(0.05)
            assert sched.store_slow_looks == 1 and sched.mode.name == NORMAL, sched.mode
            await sched.command("place hello name=once")  # (and changes are taken)
            slow.update(looks=10 ** 6, stall=0.3)  # stood still each time, silent each time: degraded
            await until(DEGRADED)
            assert sched.mode.reason.endswith(f"no answer within 0.4s, {LOOK_TRIES} times in a row while the "
                                              "scheduler was busy"), sched.mode.reason
            slow.update(looks=0)
            await until(NORMAL)
            tried = sched.store_slow_looks
            slow.update(looks=1, stall=0.0)  # silent while the loop was free: degraded at once
            await until(DEGRADED)
            assert sched.mode.reason.endswith("no answer within 0.4s"), sched.mode.reason
            assert sched.store_slow_looks == tried  # (not asked again: the loop was free)
            with pytest.raises(CommandError, match="refused"):
                await sched.command("place hello name=twice")
            await until(NORMAL)
            assert "once" in sched.state.cluster.placements and "twice" not in sched.state.cluster.placements
        finally:
            await sched.close()
            await store.close()

    run(main())


# ---------------------------------------------------------------- through a real scheduler


async def _mode(addr: str) -> str:
    return (await read(addr, "cluster/scheduler/mode")).strip()


async def _names(addr: str) -> list[str]:
    async with await Client.connect(addr, timeout=5) as c:
        return sorted(e.name for e in await c.ls("cluster/scheduler/placements"))


async def _wait_mode(addr: str, name: str, within: float) -> float:
    """Seconds until the scheduler at ``addr`` is in mode ``name`` (at most ``within``)."""
    t0 = time.monotonic()

    async def check() -> bool:
        return (await _mode(addr)).startswith(f"mode {name} ")

    await eventually(check, within, interval=0.05)
    return time.monotonic() - t0


async def _refused(addr: str, command: str) -> str:
    with pytest.raises(P9Error) as e:
        await ctl(addr, command)
    return str(e.value)


def test_a_failing_sqlite_is_degraded_then_normal_and_nothing_is_lost(tmp_path: Path) -> None:
    db = tmp_path / "sched" / "sched.db"
    flag = Path(f"{db}.fail")
    sched = SchedProc(tmp_path / "sched", [], extra=["--store", f"faulty:{db}", "--sim-nodes", "3"],
                      module="tests.store.faulty")
    try:
        sched.start()

        async def go() -> None:
            await ctl(sched.addr, "place hello name=web replicas=2")
            flag.write_text("database or disk is full")
            t0 = time.monotonic()
            first = await _refused(sched.addr, "place hello name=lost")
            assert "nothing changed: cannot write the store" in first and "disk is full" in first, first
            await _wait_mode(sched.addr, "degraded", 2.0)
            assert time.monotonic() - t0 < 2.0
            why = await _refused(sched.addr, "place hello name=lost2")
            assert f"cannot write the store {db}: database or disk is full (the scheduler is degraded" in why, why
            assert "degraded" in await _refused(sched.addr, "cordon sim-0001")
            async with await Client.connect(sched.addr, timeout=5, version="9P2000.u") as c:  # policy too
                with pytest.raises(P9Error, match="policy refused, the old one stays: cannot write the store"):
                    await c.write_file("cluster/scheduler/policy", b"spread\n")
            # reads are answered from the last known state
            assert await _names(sched.addr) == ["web-1", "web-2"]
            text = await read(sched.addr, "cluster/scheduler/ctl")
            assert "mode degraded since " in text and "disk is full" in text
            flag.unlink()
            await _wait_mode(sched.addr, "normal", 2.0)
            assert (await ctl(sched.addr, "place hello name=after")).startswith("after node=sim-")
            log = await read(sched.addr, "cluster/scheduler/log")
            assert "mode degraded (was normal): cannot write the store" in log and "mode normal (was degraded)" in log

        run(go(), timeout=60)
        assert sched.stop() == 0
        sched.start()
        assert run(_names(sched.addr)) == ["after", "web-1", "web-2"]
        log = run(read(sched.addr, "cluster/scheduler/log"))
        assert "mode normal (was degraded)" in log  # the changes were logged in the store too
    finally:
        sched.stop()


@pytest.fixture
def etcd_own1(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd", members=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def etcd_own3(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd", members=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def _on_etcd(tmp_path: Path, spec: str) -> SchedProc:
    sched = SchedProc(tmp_path / "sched", [], extra=["--store", spec, "--sim-nodes", "3", "--lease-ttl", "2"])
    sched.start()
    run(leads(sched))
    return sched


async def leads(sched: SchedProc) -> None:
    """Until the replica names itself the leader in ctl."""
    async def check() -> bool:
        return "(this replica)" in await read(sched.addr, "cluster/scheduler/ctl")

    await eventually(check, 10, interval=0.05)


def test_etcd_stopped_is_degraded_within_2s_and_back_is_normal(etcd_own1: EtcdCluster, tmp_path: Path) -> None:
    spec = etcd_own1.spec("modes", timeout=5)
    sched = _on_etcd(tmp_path, spec)
    try:
        async def go() -> None:
            await ctl(sched.addr, "place hello name=web replicas=3")
            etcd_own1.stop_member(0, kill=True)
            took = await _wait_mode(sched.addr, "degraded", 3.0)
            assert took < 2.0, took
            t0 = time.monotonic()
            why = await _refused(sched.addr, "place hello name=lost")
            assert time.monotonic() - t0 < 1.0  # refused at once, not after the store's timeout
            assert "nothing changed: cannot read the store etcd://127.0.0.1:" in why and "degraded" in why, why
            assert await _names(sched.addr) == ["web-1", "web-2", "web-3"]
            assert "mode degraded since" in await read(sched.addr, "cluster/scheduler/ctl")
            etcd_own1.start_member(0)
            await _wait_mode(sched.addr, "normal", 10.0)
            assert (await ctl(sched.addr, "place hello name=after")).startswith("after node=sim-")

        run(go(), timeout=60)
    finally:
        sched.stop()

    async def stored() -> dict[str, object]:
        s = await open_store(spec, create=False)
        try:
            return await s.load("placements")
        finally:
            await s.close()

    assert sorted(run(stored())) == ["after", "web-1", "web-2", "web-3"]


def test_one_member_of_three_killed_changes_no_mode(etcd_own3: EtcdCluster, tmp_path: Path) -> None:
    spec = etcd_own3.spec("modes3", timeout=5)
    sched = _on_etcd(tmp_path, spec)
    try:
        async def go() -> None:
            await ctl(sched.addr, "place hello name=web")
            leader = etcd_own3.leader()
            etcd_own3.stop_member((leader + 1) % 3, kill=True)  # a follower: etcd keeps its quorum at once
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < 2.5:  # writes go on, and the mode stays normal throughout
                i += 1
                assert (await ctl(sched.addr, f"place hello name=w{i}")).startswith(f"w{i} node=sim-")
                assert (await _mode(sched.addr)).startswith("mode normal ")
            assert "mode degraded" not in await read(sched.addr, "cluster/scheduler/log")

        run(go(), timeout=60)
    finally:
        sched.stop()


def test_etcd_wiped_is_recovery_and_recover_writes_the_state_back(etcd_own1: EtcdCluster, tmp_path: Path) -> None:
    spec = etcd_own1.spec("wiped", timeout=5)
    sched = _on_etcd(tmp_path, spec)
    try:
        async def go() -> None:
            await ctl(sched.addr, "place hello name=web replicas=2")
            await ctl(sched.addr, "cordon sim-0002")
            assert "not in recovery" in await _refused(sched.addr, "recover")
            subprocess.run(["etcdctl", "--endpoints", etcd_own1.endpoints, "del", "--prefix", "wiped"], check=True,
                           capture_output=True, timeout=10, env={**os.environ, "ETCDCTL_API": "3"})
            await _wait_mode(sched.addr, "recovery", 2.0)
            why = await _refused(sched.addr, "place hello name=lost")
            assert "is reachable but holds no state" in why and "ctl: recover" in why, why
            assert await _names(sched.addr) == ["web-1", "web-2"]
            answer = await ctl(sched.addr, "recover")
            assert "wrote back 2 placements, 3 nodes" in answer and "mode normal" in answer, answer
            assert (await ctl(sched.addr, "place hello name=after")).startswith("after node=sim-")

        run(go(), timeout=60)
    finally:
        sched.stop()

    async def stored() -> tuple[dict[str, object], dict[str, object]]:
        s = await open_store(spec, create=False)
        try:
            return await s.load("placements"), await s.load("nodes")
        finally:
            await s.close()

    placements, nodes = run(stored())
    assert sorted(placements) == ["after", "web-1", "web-2"]
    assert nodes["sim-0002"]["cordoned"] is True  # type: ignore[index]
