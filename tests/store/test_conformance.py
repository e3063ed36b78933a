"""The store conformance suite: what every store kind must do (SQLite, etcd with one member and with three)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fornax_sched.sched.store import Batch, Conflict, KVStore, StoreBusy

from ..helpers import run
from .conftest import KINDS, TTL, Opener


def test_rows_round_trip_with_their_revisions(opener: Opener) -> None:
    async def go() -> None:
        s = await opener()
        try:
            r1 = await s.apply(Batch().put("placements", "a", {"n": 1}).put("nodes", "x", [1, 2]))
            a = await s.get("placements", "a")
            assert a is not None and a.value == {"n": 1} and a.revision == r1
            r2 = await s.apply(Batch().put("placements", "a", {"n": 2}))
            assert r2 > r1
            a = await s.get("placements", "a")
            assert a is not None and a.value == {"n": 2} and a.revision == r2
            assert (await s.get("nodes", "x")).revision == r1  # type: ignore[union-attr]
            await s.apply(Batch().delete("placements", "a"))
            assert await s.get("placements", "a") is None
            assert await s.load("nodes") == {"x": [1, 2]}
            assert s.revision >= r2
        finally:
            await s.close()
        s = await opener()  # durable, and the same state
        try:
            assert await s.load("nodes") == {"x": [1, 2]}
            assert await s.load("placements") == {}
        finally:
            await s.close()

    run(go())


def test_compare_and_swap(opener: Opener) -> None:
    async def go() -> None:
        s = await opener()
        try:
            rev = await s.apply(Batch().require("meta", "counter", 0).put("meta", "counter", 0))
            with pytest.raises(Conflict):  # it exists now
                await s.apply(Batch().require("meta", "counter", 0).put("meta", "counter", 99).note("never"))
            with pytest.raises(Conflict):  # a stale revision
                await s.apply(Batch().require("meta", "counter", rev - 1).put("meta", "counter", 99).note("never"))
            assert (await s.get("meta", "counter")).value == 0  # type: ignore[union-attr]
            assert all(line != "never" for _, line in await s.log_tail(100))

            async def add_one() -> None:  # read, modify, write, again on a conflict
                while True:
                    it = await s.get("meta", "counter")
                    assert it is not None
                    try:
                        await s.apply(Batch().require("meta", "counter", it.revision)
                                      .put("meta", "counter", it.value + 1))
                        return
                    except Conflict:
                        continue

            await asyncio.gather(*(add_one() for _ in range(20)))
            assert (await s.get("meta", "counter")).value == 20  # type: ignore[union-attr]
        finally:
            await s.close()

    run(go())


def test_scan_is_in_key_order_in_pieces(opener: Opener) -> None:
    async def go() -> None:
        s = await opener()
        try:
            keys = [f"k{i:04d}" for i in range(500)]
            shuffled = keys[:]
            random.Random(1).shuffle(shuffled)
            for i in range(0, 500, 50):
                b = Batch()
                for k in shuffled[i:i + 50]:
                    b.put("placements", k, {"k": k})
                await s.apply(b)
            pieces = [items async for items in s.scan("placements", size=64)]
            assert all(len(p) <= 64 for p in pieces) and len(pieces) >= 8
            assert [it.key for p in pieces for it in p] == keys
            assert [it.key for p in [x async for x in s.scan("placements", start="k0490", size=3)] for it in p] \
                == keys[490:]
            assert [x async for x in s.scan("nodes")] == []
        finally:
            await s.close()

    run(go())


def test_a_batch_of_any_size_is_all_or_nothing(opener: Opener, kind: str) -> None:
    async def go() -> None:
        s = await opener()
        try:
            big = Batch()
            for i in range(300):
                big.put("placements", f"p{i:03d}", {"gen": 1, "pad": "x" * 200})
            for i in range(40):
                big.note(f"line {i}")
            rev = await s.apply(big)
            rows = await s.load("placements")
            assert len(rows) == 300 and {v["gen"] for v in rows.values()} == {1}
            assert [line for _, line in await s.log_tail(40)] == [f"line {i}" for i in range(40)]
            # A large batch whose condition fails writes nothing at all.
            bad = Batch().require("placements", "p000", rev - 1)
            for i in range(300):
                bad.put("placements", f"p{i:03d}", {"gen": 2})
            bad.put("placements", "extra", {}).note("never")
            with pytest.raises(Conflict):
                await s.apply(bad)
            rows = await s.load("placements")
            assert len(rows) == 300 and {v["gen"] for v in rows.values()} == {1}
            assert all(line != "never" for _, line in await s.log_tail(100))

            # Readers during large commits see one generation or the next, never a mix.
            seen: list[set[int]] = []
            done = asyncio.Event()

            async def reader() -> None:
                while not done.is_set():
                    rows = await s.load("placements")
                    seen.append({v["gen"] for v in rows.values()})
                    one = await s.get("placements", "p150")
                    assert one is not None
                    await asyncio.sleep(0)

            task = asyncio.create_task(reader())
            for gen in range(2, 6):
                b = Batch()
                for i in range(300):
                    b.put("placements", f"p{i:03d}", {"gen": gen, "pad": "y" * 200})
                await s.apply(b)
            done.set()
            await task
            assert seen and all(len(g) == 1 for g in seen), [g for g in seen if len(g) != 1][:3]
            if KINDS[kind].get("max_ops"):
                assert s.max_ops < 300  # it really took the staged path
        finally:
            await s.close()

    run(go())


def test_watches_deliver_each_batch_whole_and_in_order(opener: Opener) -> None:
    async def go() -> None:
        s = await opener()
        try:
            await s.apply(Batch().put("placements", "before", 1))
            start = s.revision
            w = s.watch(("placements", "log"), start)
            got: list[list[tuple[str, str, object]]] = []

            async def follow() -> None:
                async for events in w:
                    got.append([(e.table, e.key, e.value) for e in events])
                    if any(e.table == "placements" and e.key == "last" for e in events):
                        return

            task = asyncio.create_task(follow())
            await s.apply(Batch().put("placements", "a", 1).put("nodes", "n", 1))  # nodes: not watched
            big = Batch()
            for i in range(40):
                big.put("placements", f"b{i:02d}", i)
            big.note("a big one")
            await s.apply(big)
            await s.apply(Batch().delete("placements", "a"))
            await s.apply(Batch().put("placements", "last", 0))
            await asyncio.wait_for(task, 10)
            await w.close()
            assert got[0] == [("placements", "a", 1)]
            assert [k for t, k, _ in got[1] if t == "placements"] == [f"b{i:02d}" for i in range(40)]
            assert any(t == "log" and v["line"] == "a big one" for t, _, v in got[1])  # type: ignore[index]
            assert got[2] == [("placements", "a", None)]
            assert got[3] == [("placements", "last", 0)]
            assert len(got) == 4
            # From an older revision, the same changes again.
            again = s.watch(("placements",), start)
            first = await asyncio.wait_for(again.__aiter__().__anext__(), 5)
            assert [(e.key, e.value) for e in first] == [("a", 1)]
            await again.close()
        finally:
            await s.close()

    run(go())


def test_commits_of_concurrent_writers_are_grouped(opener: Opener) -> None:
    async def go() -> None:
        s = await opener()
        try:
            calls = 0
            txn = s.kv.txn

            async def counting(*a, **kw):  # type: ignore[no-untyped-def]
                nonlocal calls
                calls += 1
                return await txn(*a, **kw)

            s.kv.txn = counting  # type: ignore[method-assign]
            first = await s.apply(Batch().put("meta", "x", 0))
            calls = 0
            results = await asyncio.gather(
                *(s.apply(Batch().put("placements", f"w{i}", i).note(f"writer {i}")) for i in range(8)),
                s.apply(Batch().require("meta", "x", first - 1).put("meta", "x", 1)),  # fails alone
                return_exceptions=True)
            assert all(isinstance(r, int) for r in results[:8]) and isinstance(results[8], Conflict)
            assert calls < 8, calls
            assert sorted((await s.load("placements")).values()) == list(range(8))
            assert (await s.get("meta", "x")).value == 0  # type: ignore[union-attr]
            lines = [line for _, line in await s.log_tail(20)]
            assert sorted(line for line in lines if line.startswith("writer")) == [f"writer {i}" for i in range(8)]
        finally:
            await s.close()

    run(go())


def test_the_log_is_bounded(opener: Opener) -> None:
    async def go() -> None:
        s = await opener(log_keep=50)
        try:
            for i in range(20):
                b = Batch()
                for j in range(10):
                    b.note(f"line {i * 10 + j} " + "z" * 5000)
                await s.apply(b)
            tail = await s.log_tail(1000)
            assert [line.split()[1] for _, line in tail] == [str(i) for i in range(150, 200)]
            assert all(len(line) <= 2000 for _, line in tail)  # a line is capped in the store too
        finally:
            await s.close()
        s = await opener(log_keep=50)
        try:
            await s.apply(Batch().note("after"))
            tail = await s.log_tail(1000)
            assert len(tail) == 50 and tail[-1][1] == "after"
        finally:
            await s.close()

    run(go())


def test_keys_with_a_lease_go_when_it_expires(opener: Opener) -> None:
    async def go() -> None:
        s = await opener()
        try:
            short = await s.grant(0.4)
            kept = await s.grant(0.4)
            await s.apply(Batch().put("meta", "short", 1, lease=short.id).put("meta", "kept", 1, lease=kept.id)
                          .put("meta", "plain", 1))
            w = s.watch(("meta",), s.revision)
            gone: list[str] = []

            async def follow() -> None:
                async for events in w:
                    gone.extend(e.key for e in events if e.value is None)
                    if "short" in gone:
                        return

            task = asyncio.create_task(follow())
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.2
            while loop.time() < end:
                assert await kept.keepalive()
                await asyncio.sleep(0.1)
            await asyncio.wait_for(task, 5)
            assert await s.get("meta", "short") is None
            assert await s.get("meta", "kept") is not None and await s.get("meta", "plain") is not None
            assert not await short.keepalive()  # expired: cannot come back
            await kept.revoke()
            assert await s.get("meta", "kept") is None
            await w.close()
        finally:
            await s.close()

    run(go())


CAMPAIGN = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from fornax_sched.sched.store import open_store
    async def main():
        s = await open_store({path!r}, **{kw!r})
        await s.campaign("scheduler", "holder-process", {ttl!r}, wait=False)
        print("leading", flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
""")


def test_one_leader_at_a_time(opener: Opener, kind: str, spec: str) -> None:

    async def setup() -> None:
        s = await opener()
        await s.close()

    run(setup())
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", CAMPAIGN.format(root=root, path=spec, kw=KINDS[kind],
                                                                   ttl=TTL[kind])],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "leading"

        async def second() -> None:
            s = await opener()
            try:
                with pytest.raises(StoreBusy, match=rf"pid {proc.pid}\b.*holder-process"):
                    await s.campaign("scheduler", "me", 5, wait=False)
                assert "holder-process" in (await s.leader("scheduler") or "")
            finally:
                await s.close()

        run(second())
        proc.send_signal(signal.SIGKILL)  # however the leader dies, its leadership ends with it (etcd: its lease)
        proc.wait(10)

        async def third() -> None:
            s = await opener()
            try:
                lead = await asyncio.wait_for(s.campaign("scheduler", "me", 5, wait=True), TTL[kind] + 10)
                assert lead.identity == "me" and not lead.lost.is_set()
                assert "me" in (await s.leader("scheduler") or "")
                await s.apply(Batch().put("meta", "led", True))
                await lead.resign()
            finally:
                await s.close()

        run(third())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


WRITER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from fornax_sched.sched.store import Batch, open_store
    async def main():
        s = await open_store({path!r}, **{kw!r})
        await asyncio.wait_for(s.campaign("scheduler", "writer", {ttl!r}, wait=True), {ttl!r} + 5)
        txn = s.kv.txn
        async def told(compares, ops):  # say "t" before each transaction: the test kills between two
            print("t", flush=True)
            return await txn(compares, ops)
        s.kv.txn = told
        rows = await s.load("placements")
        gen = max((v["gen"] for v in rows.values()), default=0) + 1
        while True:
            b = Batch()
            for i in range(120):
                b.put("placements", f"p{{i:03d}}", {{"gen": gen}})
            b.note(f"generation {{gen}}")
            await s.apply(b)
            print(gen, flush=True)
            gen += 1
    asyncio.run(main())
""")


@pytest.mark.slow
def test_a_writer_killed_mid_batch_leaves_all_or_nothing(opener: Opener, kind: str, spec: str) -> None:
    """kill -9 of a writer at random moments of large commits: each reopen sees whole generations only."""

    async def setup() -> None:
        s = await opener()
        await s.close()

    run(setup())
    root = str(Path(__file__).resolve().parents[2])
    rnd = random.Random(7)
    acked = 0
    left_midway = 0  # runs killed with a batch staged or committed but not rolled forward
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=root, path=spec, kw=KINDS[kind],
                                                                     ttl=TTL[kind])],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            out_pipe = proc.stdout
            seen: list[str] = []

            for _ in range(rnd.randint(1, 90)):  # kill it between two transactions, at a random one
                while True:
                    line = out_pipe.readline()
                    assert line, "the writer ended"
                    seen.append(line.strip())
                    if seen[-1] == "t":
                        break
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        acked = max([int(x) for x in seen + out.split() if x.isdigit()], default=acked)

        async def check(acked: int = acked) -> None:
            nonlocal left_midway
            s: KVStore = await opener()
            try:
                async with s.kv.snapshot() as snap:
                    from fornax_sched.sched.store.kv import Range

                    if await snap.read(Range("c/", "c0")) or await snap.read(Range("s/", "s0")):
                        left_midway += 1
                # a writer finishes what was left (on etcd, once the killed writer's lease has expired)
                await asyncio.wait_for(s.campaign("scheduler", "checker", TTL[kind], wait=True), TTL[kind] + 10)
                rows = await s.load("placements")
                gens = {v["gen"] for v in rows.values()}
                assert len(rows) == 120 and len(gens) == 1, gens
                # what the writer was told is committed is there (the last one may be newer)
                assert gens.pop() >= acked
            finally:
                await s.close()

        run(check())
    if KINDS[kind].get("max_ops"):
        assert left_midway > 0, "no kill landed inside a staged batch: the test proved nothing"


def test_reads_cut_short_at_any_point_leave_the_store_readable(opener: Opener) -> None:
    """A look at the store bounded by a timeout (the scheduler's probe) is cancelled wherever it
    happens to be, a snapshot's start included: the next read must work, and see what is there."""
    async def go() -> None:
        s = await opener()
        try:
            await s.apply(Batch().put("placements", "a", {"n": 1}))
            ident = await s.probe()
            cut = 0
            for i in range(60):
                try:
                    await asyncio.wait_for(s.probe() if i % 2 else s.get("placements", "a"), 0.0001 * (1 + i % 12))
                except TimeoutError:
                    cut += 1
                assert await s.probe() == ident, i  # (each look right after one cut short)
            assert cut > 0  # (the bounds did cut reads short)
            await s.apply(Batch().put("placements", "a", {"n": 2}))
            a = await s.get("placements", "a")
            assert a is not None and a.value == {"n": 2}
        finally:
            await s.close()

    run(go())


def test_two_schedulers_creating_one_new_store_at_once_share_its_identity(kind: str, spec: str) -> None:
    """Two replicas started on a new store: the one whose identity was written first wins, and the
    other, seeing its own write refused, takes that identity (it used to stop: "created twice")."""
    from fornax_sched.sched.store import open_kv
    from fornax_sched.sched.store.kv import IDENTITY, Put, encode

    extra = KINDS[kind]

    async def go() -> None:
        kv = await open_kv(spec, **extra)
        assert kv.created
        txn = kv.txn

        async def other_first(compares, ops):  # type: ignore[no-untyped-def]
            kv.txn = txn  # (once)
            await txn([], [Put(IDENTITY, encode({"cluster": "the-other", "created": 1.0, "format": 1}))])
            return await txn(compares, ops)

        kv.txn = other_first  # type: ignore[method-assign]
        s = await KVStore.open(kv)
        try:
            assert s.cluster == "the-other"
            await s.apply(Batch().put("meta", "x", 1))  # and it writes as that store
        finally:
            await s.close()
        again = await open_store_of(kind, spec)
        try:
            assert again.cluster == "the-other" and (await again.get("meta", "x")) is not None
        finally:
            await again.close()

    run(go())


async def open_store_of(kind: str, spec: str) -> KVStore:
    from fornax_sched.sched.store import open_store

    return await open_store(spec, **KINDS[kind])
