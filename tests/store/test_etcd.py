"""What only the etcd store does: outages of its members, compaction, leases under a paused holder,
its URL, and the limits etcd puts on a transaction."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fornax_sched.sched.store import Batch, Compacted, NotLeader, StoreBusy, StoreError, open_store
from fornax_sched.sched.store.etcd import _normalize, parse_spec
from fornax_sched.sched.store.kv import Delete, Put

from ..etcd_cluster import EtcdCluster
from ..helpers import eventually, free_port, run
from .conftest import unique_prefix


@pytest.fixture
def own1(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A member of this test's own, to stop and start."""
    cluster = EtcdCluster(tmp_path / "etcd", members=1)
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture
def own3(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd", members=3)
    cluster.start()
    yield cluster
    cluster.close()


def test_an_unreachable_etcd_is_an_error_within_the_timeout() -> None:
    spec = f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/x?timeout=0.5"
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"cannot read the store etcd://127\.0\.0\.1:\d+,127\.0\.0\.1:\d+/x: "
                                         r"no member answered within 0\.5s \(unavailable: .*"):
        run(open_store(spec))
    assert time.monotonic() - t0 < 3


def test_all_members_gone_then_back(own1: EtcdCluster) -> None:
    async def go() -> None:
        s = await open_store(own1.spec("p", timeout=1))
        try:
            await s.apply(Batch().put("meta", "before", 1))
            own1.stop_member(0)
            for call in (s.apply(Batch().put("meta", "during", 1)), s.get("meta", "before"), s.load("nodes"),
                         s.grant(5), s.leader("scheduler")):
                t0 = time.monotonic()
                with pytest.raises(StoreError, match=r"the store etcd://127\.0\.0\.1:\d+/p"):
                    await call
                assert time.monotonic() - t0 < 2.5
            own1.start_member(0)
            await eventually(lambda: s.apply(Batch().put("meta", "after", 1)), timeout=10)
            assert await s.load("meta") == {"before": 1, "after": 1}
        finally:
            await s.close()

    run(go(), timeout=60)


def test_one_member_of_three_killed_writes_and_watches_go_on(own3: EtcdCluster) -> None:
    async def go() -> None:
        s = await open_store(own3.spec("p", timeout=5))
        try:
            w = s.watch(("placements",), s.revision)
            seen: list[str] = []

            async def follow() -> None:
                async for events in w:
                    seen.extend(e.key for e in events)

            task = asyncio.create_task(follow())
            for i in range(20):
                await s.apply(Batch().put("placements", f"a{i}", i))
            own3.stop_member(own3.leader(), kill=True)  # the leader: the others elect another meanwhile
            for i in range(20):
                await s.apply(Batch().put("placements", f"b{i}", i))
            assert len(await s.load("placements")) == 40
            await eventually(lambda: asyncio.sleep(0, len(seen) == 40), timeout=10)
            assert seen == [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)]
            task.cancel()
            await w.close()
        finally:
            await s.close()

    run(go(), timeout=60)


def test_a_watch_from_a_compacted_revision_fails_clearly(etcd1: EtcdCluster, request: pytest.FixtureRequest) -> None:
    async def go() -> None:
        s = await open_store(etcd1.spec(unique_prefix(request), keep=5, compact_every=0.1))
        try:
            start = s.revision
            for i in range(20):
                await s.apply(Batch().put("meta", "n", i))
            kv = s.kv

            async def compacted() -> bool:  # the periodic compaction has run
                return bool(getattr(kv, "_compacted", 0) > start)

            await eventually(compacted, timeout=5)
            w = s.watch(("meta",), start)
            with pytest.raises(Compacted, match=r"keeps no changes from revision \d+ on .*read it again"):
                async for _ in w:
                    pass
            await w.close()
            # The caller reloads and watches from there.
            item = await s.get("meta", "n")
            assert item is not None and item.value == 19
            w = s.watch(("meta",), s.revision)
            got = asyncio.create_task(w.__aiter__().__anext__())
            await s.apply(Batch().put("meta", "n", 20))
            events = await asyncio.wait_for(got, 5)
            assert [(e.key, e.value) for e in events] == [("n", 20)]
            await w.close()
        finally:
            await s.close()

    run(go(), timeout=60)


HOLDER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from fornax_sched.sched.store import Batch, NotLeader, open_store
    async def main():
        s = await open_store({spec!r})
        await s.campaign("scheduler", "first", 3, wait=False)
        print("leading", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # paused meanwhile
        try:
            await s.apply(Batch().put("meta", "by-first", 1))
            print("written", flush=True)
        except NotLeader as e:
            print("NotLeader", e, flush=True)
        await s.close()
    asyncio.run(main())
""")


def test_a_paused_leader_loses_its_lease_and_cannot_write(etcd1: EtcdCluster, request: pytest.FixtureRequest) -> None:
    spec = etcd1.spec(unique_prefix(request))
    root = str(Path(__file__).resolve().parents[2])

    async def setup() -> None:
        s = await open_store(spec)
        await s.close()

    run(setup())
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=root, spec=spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "leading"

        async def second() -> None:
            s = await open_store(spec)
            try:
                with pytest.raises(StoreBusy, match=rf"pid {proc.pid}\b.*first"):
                    await s.campaign("scheduler", "second", 3, wait=False)
                waiting = asyncio.create_task(s.campaign("scheduler", "second", 3, wait=True))
                # past one lease's life the first still holds it (its keepalive runs), the second waits
                done, _ = await asyncio.wait({waiting}, timeout=3.5)
                assert not done
                os.kill(proc.pid, signal.SIGSTOP)  # its keepalive pauses with it
                lead = await asyncio.wait_for(waiting, 15)
                assert "second" in (await s.leader("scheduler") or "")
                os.kill(proc.pid, signal.SIGCONT)
                proc.stdin.write("go\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)  # type: ignore
                assert line.startswith("NotLeader") and "nothing was written" in line, line
                assert await s.get("meta", "by-first") is None
                await s.apply(Batch().put("meta", "by-second", 1))
                assert not lead.lost.is_set()
                await lead.resign()
            finally:
                await s.close()

        run(second(), timeout=60)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_a_deposed_leader_in_this_process_gets_not_leader(etcd1: EtcdCluster, request: pytest.FixtureRequest) -> None:
    """The guard's failure is noticed by the transaction itself, before any keepalive says so."""
    spec = etcd1.spec(unique_prefix(request))

    async def go() -> None:
        a = await open_store(spec)
        b = await open_store(spec)
        try:
            lead = await a.campaign("scheduler", "a", 5, wait=False)
            hold = a._hold
            assert hold is not None and hold.guard is not None
            await b.kv.revoke(hold.lease)  # deposed behind its back: the lock key goes with the lease
            await b.campaign("scheduler", "b", 5, wait=False)
            with pytest.raises(NotLeader):
                await a.apply(Batch().put("meta", "by-a", 1))
            assert lead.lost.is_set()
            assert await b.get("meta", "by-a") is None
        finally:
            await a.close()
            await b.close()

    run(go(), timeout=60)


def test_urls_and_their_errors() -> None:
    eps, prefix, opts = parse_spec("10.0.0.1:2379,[::1]:2380/clusters/a?timeout=1.5&max_ops=64")
    assert eps == [("10.0.0.1", 2379), ("::1", 2380)] and prefix == "clusters/a/"
    assert opts == {"timeout": 1.5, "max_ops": 64}
    assert parse_spec("h:1")[1] == "fornax-sched/"
    for bad, why in [("h", "want HOST:PORT"), ("h:0", "want HOST:PORT"), ("h:1,", "want HOST:PORT"),
                     ("h:1/p?bogus=1", "unknown option 'bogus'"), ("h:1/p?timeout=x", "is not a number"),
                     ("h:1/a//b", "bad key prefix")]:
        with pytest.raises(StoreError, match=why):
            parse_spec(bad)
    with pytest.raises(StoreError, match="timeout=0: want"):
        run(open_store("etcd://127.0.0.1:1/p?timeout=0"))


def test_an_empty_prefix_and_fresh(etcd1: EtcdCluster, request: pytest.FixtureRequest) -> None:
    spec = etcd1.spec(unique_prefix(request))

    async def go() -> None:
        with pytest.raises(StoreError, match="holds no scheduler state .*--fresh"):
            await open_store(spec, create=False)
        s = await open_store(spec)
        await s.apply(Batch().put("meta", "kept", 1))
        await s.close()
        with pytest.raises(StoreError, match="holds keys already: --fresh does not delete them"):
            await open_store(spec, fresh=True)
        s = await open_store(spec, create=False)
        assert await s.load("meta") == {"kept": 1}
        await s.close()

    run(go())


def test_a_value_too_large_for_a_transaction_is_refused(etcd1: EtcdCluster, request: pytest.FixtureRequest) -> None:
    async def go() -> None:
        s = await open_store(etcd1.spec(unique_prefix(request), max_bytes=65536))
        try:
            with pytest.raises(StoreError, match=r"cannot store 'big' in .*more than half a transaction"):
                await s.apply(Batch().put("policies", "big", "x" * 40_000).put("meta", "other", 1))
            assert await s.load("meta") == {}
            # Many values that together exceed a transaction are split, and still all or nothing.
            b = Batch()
            for i in range(40):
                b.put("policies", f"p{i}", "y" * 10_000)
            await s.apply(b)
            assert len(await s.load("policies")) == 40
        finally:
            await s.close()

    run(go())


def test_operations_are_ordered_as_etcd_wants_them() -> None:
    ops = [Put("a", "1"), Delete("a"), Put("b", "1"), Put("b", "2"), Delete("c"), Put("c", "3"),
           Put("l/5", "x"), Delete("l/", "l/9"), Put("l/7", "y")]
    out = _normalize(ops)
    assert Delete("a") in out and Put("a", "1") not in out
    assert [op for op in out if op.key == "b"] == [Put("b", "2")]
    assert [op for op in out if op.key == "c"] == [Put("c", "3")]
    assert Put("l/5", "x") not in out and Put("l/7", "y") in out
    assert Delete("l/", "l/7") in out and Delete("l/7\0", "l/9") in out


def test_serve_keeps_its_state_in_etcd(etcd3: EtcdCluster, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """``fornax-sched serve --store etcd://...``: a place is in etcd, and a restarted serve has it."""
    from ..sched.harness import SchedProc, ctl, placement

    spec = etcd3.spec(unique_prefix(request), timeout=10)  # a loaded machine may be slow to fsync
    sched = SchedProc(tmp_path / "state", [], extra=["--store", spec, "--sim-nodes", "3"]).start()
    try:
        out = run(ctl(sched.addr, "place hello name=web"), timeout=60)
        assert out.startswith("web node=sim-"), out
        assert sched.stop() == 0
        sched.start()  # its leadership went with it: the new one starts at once
        got = run(placement(sched.addr, "web"), timeout=60)
        assert got["node"].startswith("sim-")
    finally:
        sched.stop()

    async def check() -> None:
        s = await open_store(spec, create=False)
        try:
            assert "web" in await s.load("placements")
        finally:
            await s.close()

    run(check())
