"""Several `fornax-sched serve` replicas on one real etcd: one leads (a lease), the others follow
through watches and forward writes; a leader killed or paused past its lease is replaced, and a
deposed one commits nothing."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import pytest

from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error
from fornax_sched.sched.store import open_store

from ..etcd_cluster import EtcdCluster
from ..helpers import eventually, free_port, run
from ..node.cluster import read, three_nodes
from .harness import SchedProc, ctl, running_on

TTL = 3.0  # the leadership's lease in these tests (short, with room for a loaded machine)


def replicas(tmp_path: Path, spec: str, n: int = 2, nodes: list[str] | None = None) -> list[SchedProc]:
    seeds = nodes or []
    # (--dead 10: what a dead node means is not under test, and a loaded machine stalls a scheduler's loop
    # for seconds; the harness's 2 s would re-place containers of nodes that are fine)
    extra = ["--store", spec, "--lease-ttl", str(TTL), "--dead", "10"] + ([] if seeds else ["--sim-nodes", "3"])
    return [SchedProc(tmp_path / f"sched{i}", seeds, extra=extra).start() for i in range(n)]


async def leader_of(procs: list[SchedProc], within: float = 10.0) -> SchedProc:
    """The replica whose ctl says it leads (waiting for one)."""
    async def check() -> SchedProc | None:
        for p in procs:
            if p.proc is None or p.proc.poll() is not None:
                continue
            with contextlib.suppress(OSError, P9Error, ConnectionError, TimeoutError):
                if "(this replica)" in await read(p.addr, "cluster/scheduler/ctl"):
                    return p
        return None

    return await eventually(check, within, interval=0.05)


def stop_all(procs: list[SchedProc]) -> None:
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            with contextlib.suppress(OSError):
                p.proc.send_signal(signal.SIGCONT)
            p.stop()


async def stored(spec: str) -> dict[str, dict[str, object]]:
    s = await open_store(spec, create=False)
    try:
        return await s.load("placements")
    finally:
        await s.close()


def test_a_write_to_a_follower_is_applied_once_and_answered(etcd: EtcdCluster, tmp_path: Path) -> None:
    spec = etcd.spec("fw", timeout=5)
    procs = replicas(tmp_path, spec)
    try:
        async def go() -> None:
            lead = await leader_of(procs)
            follower = next(p for p in procs if p is not lead)
            text = await read(follower.addr, "cluster/scheduler/ctl")
            assert f"\nleader {lead.addr}\n" in text, text  # ctl on a follower names the leader
            answer = await ctl(follower.addr, "place hello name=fw")
            assert answer.startswith("fw node=sim-"), answer
            # the follower refuses what the leader refuses, with the leader's words
            with pytest.raises(P9Error, match="container 'fw' exists"):
                await ctl(follower.addr, "place hello name=fw")
            assert list(await stored(spec)) == ["fw"]
            log = await read(lead.addr, "cluster/scheduler/log")
            assert log.count("place fw (place hello name=fw)") == 1 and log.count("started fw on") == 1, log
            # the follower's tree shows it, from its watch
            async def seen() -> bool:
                return "node=sim-" in await read(follower.addr, "cluster/scheduler/placements/fw")

            await eventually(seen, 5, interval=0.05)
            # the nodes' liveness as the leader recorded it (a follower watches the store, not the nodes)
            async def nodes_online() -> bool:
                return "\nnodes 3 online 3\n" in "\n" + await read(follower.addr, "cluster/scheduler/ctl")

            await eventually(nodes_online, 5, interval=0.05)
            assert (await read(follower.addr, "cluster/nodes/sim-0001/status")).strip() == "online"
            health = await read(follower.addr, "cluster/nodes/sim-0001/health")
            assert health.startswith("online since ") and f"as the leader {lead.addr} saw it" in health, health
            async with await Client.connect(follower.addr, timeout=5, version="9P2000.u") as c:
                await c.write_file("cluster/scheduler/policy", b"pack\n")

            async def policy_everywhere() -> bool:
                return all([(await read(p.addr, "cluster/scheduler/policy")).strip() == "pack" for p in procs])

            await eventually(policy_everywhere, 5, interval=0.05)

        run(go(), timeout=60)
    finally:
        stop_all(procs)


def test_a_paused_leader_is_replaced_commits_nothing_and_follows(etcd: EtcdCluster, tmp_path: Path) -> None:
    spec = etcd.spec("pause", timeout=5)
    procs = replicas(tmp_path, spec)
    try:
        async def go() -> None:
            old = await leader_of(procs)
            new = next(p for p in procs if p is not old)
            await ctl(old.addr, "place hello name=before")
            assert old.proc is not None
            old.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            assert await leader_of([new], TTL + 5) is new
            took = time.monotonic() - t0
            assert took < TTL + 2, took
            assert (await ctl(new.addr, "place hello name=after")).startswith("after node=sim-")
            # A write to the paused one waits in its socket; on waking it either still thinks it leads
            # (its commit is refused by the store) or has stepped down (the write goes to the new leader).
            pending = asyncio.ensure_future(ctl(old.addr, "place hello name=woken"))
            await asyncio.sleep(0.2)  # (the write reaches the paused process's socket)
            before = await stored(spec)
            old.proc.send_signal(signal.SIGCONT)
            try:
                answer = await asyncio.wait_for(pending, 30)
            except P9Error as e:
                assert "no longer leads" in str(e) and "nothing was written" in str(e), str(e)
                assert "woken" not in await stored(spec)
            else:
                assert answer.startswith("woken node=sim-"), answer
            async def follows() -> bool:
                text = await read(old.addr, "cluster/scheduler/ctl")
                return f"\nleader {new.addr}\n" in text
            await eventually(follows, 10, interval=0.05)
            after = await stored(spec)
            # nothing the old leader did landed: only the new leader's (and a forwarded) write
            assert set(after) - set(before) <= {"woken"}, (sorted(before), sorted(after))
            assert {"before", "after"} <= set(after)
            log = await read(old.addr, "cluster/scheduler/log")
            assert f"this replica ({old.addr}) no longer leads" in log

        run(go(), timeout=90)
    finally:
        stop_all(procs)


WRITERS, PLACES = 8, 300


def test_kill9_of_the_leader_under_8_writers_placing_300(etcd: EtcdCluster, tmp_path: Path) -> None:
    """Another replica leads within TTL + 2 s; every acknowledged place is there and runs exactly once."""
    nodes = three_nodes(tmp_path)
    spec = etcd.spec("kill", timeout=5)
    procs = replicas(tmp_path, spec, nodes=[n.addr for n in nodes])
    try:
        async def go() -> tuple[set[str], float]:
            lead = await leader_of(procs)
            other = next(p for p in procs if p is not lead)
            acked: set[str] = set()
            killed = asyncio.Event()

            async def writer(w: int) -> None:
                targets = [other.addr, lead.addr] if w % 2 else [lead.addr, other.addr]
                for j in range(w, PLACES, WRITERS):
                    name = f"c{j:03d}"
                    deadline = time.monotonic() + 30
                    k = 0
                    last = ""
                    while True:
                        addr = targets[k % 2] if not killed.is_set() else other.addr
                        try:
                            out = await ctl(addr, f"place hello name={name}")
                            assert out.startswith(f"{name} node="), out  # (pending while a new leader first looks)
                            acked.add(name)
                            break
                        except P9Error as e:
                            if f"container '{name}' exists" in str(e):  # an earlier try was applied
                                acked.add(name)
                                break
                            last = str(e)
                        except (OSError, ConnectionError, TimeoutError, EOFError) as e:
                            last = repr(e)
                        assert time.monotonic() < deadline, (name, last)
                        k += 1
                        await asyncio.sleep(0.1)

            tasks = [asyncio.ensure_future(writer(w)) for w in range(WRITERS)]
            await eventually(lambda: _at_least(acked, 60), 60, interval=0.02)
            lead.kill9()
            killed.set()
            t0 = time.monotonic()
            assert await leader_of([other], TTL + 10) is other
            took = time.monotonic() - t0
            await asyncio.gather(*tasks)
            print(f"kill9: leader again after {took:.2f}s; {len(acked)} acknowledged in {time.monotonic() - t0:.1f}s")
            return acked, took

        try:
            acked, took = run(go(), timeout=240)
        except BaseException:
            for p in procs:  # what the replicas said of themselves, for the failure's report
                if p.proc is not None and p.proc.poll() is None:
                    with contextlib.suppress(Exception):
                        print(f"--- {p.addr}\n" + run(read(p.addr, "cluster/scheduler/log"), timeout=10)[-3000:])
            raise
        assert took < TTL + 2, took
        assert len(acked) == PLACES
        survivor = next(p for p in procs if p.proc is not None and p.proc.poll() is None)

        async def all_run_once() -> bool:
            counts: dict[str, int] = {}
            for n in nodes:
                for name in await running_on(n):
                    counts[name] = counts.get(name, 0) + 1
            assert all(v == 1 for v in counts.values()), {k: v for k, v in counts.items() if v > 1}
            return set(counts) >= acked

        t1 = time.monotonic()
        try:
            run(eventually(all_run_once, 60, interval=0.5), timeout=90)
        except BaseException:
            with contextlib.suppress(Exception):
                print("--- survivor\n" + "\n".join(line for line in run(read(survivor.addr, "cluster/scheduler/log"),
                                                                         timeout=10).splitlines()
                                               if any(f"c{x}" in line for x in ("258", "267", "272"))
                                               or "mode" in line or "lead" in line))
            raise
        print(f"kill9: all running once {time.monotonic() - t1:.1f}s later")
        placed = run(stored(spec))
        assert acked <= set(placed)
        text = run(read(survivor.addr, "cluster/scheduler/ctl"))
        assert "(this replica)" in text
    finally:
        stop_all(procs)
        for n in nodes:
            n.stop()


async def _at_least(s: set[str], n: int) -> bool:
    return len(s) >= n


def test_an_agent_registering_with_a_follower_is_followed_by_the_leader(etcd: EtcdCluster, tmp_path: Path) -> None:
    """Registration is a ctl ``join`` on the ctl path, so a follower's AgentControl forwards it."""
    from ..persys.agentproc import agent_node

    spec = etcd.spec("ag", timeout=5)
    ports = [free_port(), free_port()]
    procs = [SchedProc(tmp_path / f"sched{i}", [], extra=["--store", spec, "--lease-ttl", str(TTL), "--dead", "10",
                                                         "--control", f"127.0.0.1:{ports[i]}"]).start()
             for i in range(2)]
    agent = None
    try:
        async def go() -> None:
            nonlocal agent
            lead = await leader_of(procs)
            follower = next(p for p in procs if p is not lead)
            port = ports[procs.index(follower)]
            agent, _ = agent_node(tmp_path, "agent-f", ["--persys-scheduler", f"127.0.0.1:{port}"])

            async def followed() -> bool:
                return (await read(lead.addr, "cluster/nodes/agent-f/status")).strip() == "online"

            await eventually(followed, 20, interval=0.1)
            log = await read(lead.addr, "cluster/scheduler/log")
            assert "join persys!127.0.0.1:" in log and "(by persys-control)" in log, log
            answer = await ctl(follower.addr, "place hello name=on-agent")
            assert answer.startswith("on-agent node=agent-f"), answer
            # the follower does not reach the agent itself: what it shows is what the leader recorded
            health = await read(follower.addr, "cluster/nodes/agent-f/health")
            assert health.startswith("online since ") and f"as the leader {lead.addr} saw it" in health, health

        run(go(), timeout=90)
    finally:
        if agent is not None:
            agent.stop()
        stop_all(procs)
