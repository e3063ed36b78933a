"""Looks at nodes paced by the cluster's size: at most ``max_looks`` a second in all, and a node gets
as many looks to answer before it is dead as at the configured interval (liveness.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fornax_sched.sched.backends import SimCluster, SimNode
from fornax_sched.sched.liveness import Liveness, look_every
from fornax_sched.sched.observe import Observer
from fornax_sched.sched.service import Scheduler
from fornax_sched.sched.store import open_store

from ..helpers import run


@given(interval=st.sampled_from([0.05, 0.1, 0.25, 1.0, 2.0]), nodes=st.integers(0, 200_000),
       max_looks=st.sampled_from([0.0, 1.0, 50.0, 500.0, 10_000.0]))
def test_the_pace_keeps_to_the_cap_and_never_looks_more_often_than_the_interval(
        interval: float, nodes: int, max_looks: float) -> None:
    every = look_every(interval, nodes, max_looks)
    assert every >= interval
    if max_looks == 0:
        assert every == interval
        return
    assert nodes / every <= max_looks * (1 + 1e-9)  # the cap holds
    if every > interval:  # the tightest step: one fewer would break the cap
        assert nodes / (every - interval) > max_looks * (1 - 1e-9)
    steps = every / interval
    assert abs(steps - round(steps)) < 1e-6  # whole multiples of the interval


def test_the_cap_in_numbers() -> None:
    assert look_every(1.0, 500, 500) == 1.0
    assert look_every(1.0, 501, 500) == 2.0
    assert look_every(1.0, 10_000, 500) == 20.0
    assert look_every(0.2, 10_000, 1000) == 10.0


def test_paced_liveness_scales_its_times_and_keeps_its_judgements() -> None:
    t = Liveness(suspect_after=3, dead_after=10)
    t.add("a", 0.0)
    t.ok("a", 0.0)
    assert t.pace(4.0) and not t.pace(4.0)
    assert (t.suspect_after, t.dead_after) == (12, 40)
    assert t.tick(11.0) == [] and t.status("a") == "online"
    assert [m.now for m in t.tick(12.0)] == ["suspect"]
    assert t.tick(39.0) == []
    assert [m.now for m in t.tick(40.0)] == ["dead"]
    t.pace(0.5)  # never faster than configured
    assert (t.suspect_after, t.dead_after) == (3, 10)


class Rounds(Observer):
    def __init__(self) -> None:
        self.at: list[float] = []

    def round(self, result: str, seconds: float) -> None:
        self.at.append(time.monotonic())


def test_a_big_cluster_is_looked_at_less_often_and_its_dead_node_waits_as_long(tmp_path: Path) -> None:
    """40 simulated nodes, an interval of 0.1 s, at most 100 looks a second: each node is looked at
    every 0.4 s, and a node that goes away is dead after 4 x 0.8 s, not after 0.8 s; what ran there
    runs elsewhere."""
    nodes = SimCluster()
    names = [f"pace-{i:02d}" for i in range(40)]
    for n in names:
        nodes.add(n)

    async def main() -> None:
        store = await open_store(str(tmp_path / "sched.db"))
        sched = Scheduler(store, seeds=[f"sim!{n}" for n in names], interval=0.1, dead_after=0.8,
                          node_timeout=0.2, max_looks=100,
                          connect=lambda addr: SimNode(addr, timeout=0.2, cluster=nodes))
        rounds = Rounds()
        sched.observer = rounds
        await sched.start()
        try:
            for _ in range(200):
                if len(sched.links) == 40 and sched.state.cluster.counts.get(("sim", "online")) == 40:
                    break
                await asyncio.sleep(0.05)
            assert sched.look_every == 0.4
            assert (sched.liveness.suspect_after, sched.liveness.dead_after) == pytest.approx((1.2, 3.2))
            assert any("31 nodes: looking at each every 0.4s (at most 100 looks a second); suspect after 1.2s, "
                       "dead after 3.2s" in line for line in sched.book.read(0, 1 << 20).decode().splitlines())
            await sched.command("place hello name=w replicas=40")
            await asyncio.sleep(1.0)
            window, began = 2.0, time.monotonic()
            await asyncio.sleep(window)
            looks = sum(1 for at in rounds.at if at >= began)
            assert 40 * window / 0.4 * 0.6 <= looks <= 100 * window * 1.1, looks  # about 200: the cap, kept

            victim = sched.state.cluster.placements["w-1"].node
            gone = time.monotonic()
            nodes.nodes[victim].down = True
            dead_at = None
            for _ in range(400):
                if sched.liveness.status(victim) == "dead":
                    dead_at = time.monotonic()
                    break
                await asyncio.sleep(0.025)
            assert dead_at is not None, sched.liveness.status(victim)
            # its last answer came at most one look before it went away
            assert dead_at - gone >= 3.2 - 0.4 - 0.05, dead_at - gone
            for _ in range(200):
                p = sched.state.cluster.placements["w-1"]
                if p.node != victim and sched.state.records["w-1"].status == "running":
                    break
                await asyncio.sleep(0.05)
            assert sched.state.cluster.placements["w-1"].node != victim
        finally:
            await sched.close()
            await store.close()

    run(main())


class Reconciles(Observer):
    def __init__(self) -> None:
        self.results: list[str] = []

    def reconcile(self, result: str, seconds: float) -> None:
        self.results.append(result)


def test_a_listing_that_says_what_the_last_one_said_needs_no_plan_until_something_changes(tmp_path: Path) -> None:
    """Nine looks in ten at a quiet node are not planned; a container stopped behind the scheduler's
    back (the listing changes) or a command (the node's placements change) is planned at once."""
    nodes = SimCluster()
    names = ["quiet-a", "quiet-b"]
    for n in names:
        nodes.add(n)

    async def main() -> None:
        store = await open_store(str(tmp_path / "sched.db"))
        sched = Scheduler(store, seeds=[f"sim!{n}" for n in names], interval=0.05,
                          connect=lambda addr: SimNode(addr, timeout=1.0, cluster=nodes))
        seen = Reconciles()
        sched.observer = seen
        await sched.start()

        async def until(what: str, ok) -> None:  # noqa: ANN001
            for _ in range(200):
                if ok():
                    return
                await asyncio.sleep(0.025)
            raise AssertionError(f"not {what}")

        try:
            await until("online", lambda: sched.state.cluster.counts.get(("sim", "online")) == 2)
            await sched.command("place hello name=q replicas=4")
            await until("running", lambda: sched.state.statuses.get("running") == 4)
            await asyncio.sleep(0.5)
            seen.results.clear()
            await asyncio.sleep(1.5)  # 2 nodes, a look every 0.05 s: about 60 looks
            counts = {r: seen.results.count(r) for r in set(seen.results)}
            assert counts.get("skipped", 0) >= 40 and counts.get("unchanged", 0) >= 2, counts
            assert set(counts) <= {"skipped", "unchanged"}, counts

            r = sched.state.records["q-1"]
            node, cid = sched.state.cluster.placements["q-1"].node, r.cid
            nodes.nodes[node].containers[cid].state = "stopped"  # behind the scheduler's back
            await until("started again", lambda: sched.state.records["q-1"].cid not in ("", cid)
                        and sched.state.records["q-1"].status == "running")

            await sched.command("stop q-2")
            await until("stopped", lambda: sched.state.records["q-2"].status == "stopped")
            node2 = sched.state.cluster.placements["q-2"].node
            assert not any(c.alive for c in nodes.nodes[node2].containers.values() if c.name == "q-2")
            v = sched.state.versions[node2]
            await sched.command("start q-2")  # its record changes: the node's version moves
            assert sched.state.versions[node2] > v
            await until("running again", lambda: sched.state.records["q-2"].status == "running")
        finally:
            await sched.close()
            await store.close()

    run(main())


def test_a_nodes_version_moves_with_everything_its_listing_is_compared_with() -> None:
    from fornax_sched.sched.model import Request
    from fornax_sched.sched.state import State, request_to_json

    s = State()
    row = {"addr": "sim!a", "kind": "sim", "cpus": 8, "mem": 1 << 34, "labels": {}, "cordoned": False, "images": None}
    s.apply([("nodes", "a", row), ("nodes", "b", {**row, "addr": "sim!b"})])
    place = {"request": request_to_json(Request("hello")), "node": "a", "reason": "r", "group": "w", "want": "run",
             "status": "starting", "cid": "", "since": 1.0, "detail": "", "created": 1.0, "restarts": 0,
             "restarted": 0.0}

    def moved(change: tuple[str, str, object] | None = None, foreign: tuple[str, set[str]] | None = None) -> set[str]:
        was = dict(s.versions)
        if change is not None:
            s.apply([change])
        if foreign is not None:
            s.observe_foreign(*foreign)
        return {n for n in s.versions if s.versions[n] != was.get(n)}

    assert moved(("placements", "w-1", place)) == {"a"}
    assert moved(("placements", "w-1", {**place, "status": "running", "cid": "7"})) == {"a"}
    assert moved(("placements", "w-1", {**place, "node": "b"})) == {"a", "b"}  # moved: both
    assert moved(("placements", "w-1", None)) == {"b"}
    assert moved(foreign=("a", {"hand-made"})) == {"a"}
    assert moved(("nodes", "b", {**row, "cordoned": True})) == {"b"}


def test_writing_observed_statuses_to_the_store_changes_nothing_in_memory(tmp_path: Path) -> None:
    """A container's start is observed in memory at once and written to the store a moment later,
    in a flush whose rows are copied from memory: writing them moves no node's version (so the next
    quiet look is still skipped) and leaves the placement as it was."""
    nodes = SimCluster()
    nodes.add("flush-a")

    async def main() -> None:
        store = await open_store(str(tmp_path / "sched.db"))
        sched = Scheduler(store, seeds=["sim!flush-a"], interval=0.05,
                          connect=lambda addr: SimNode(addr, timeout=1.0, cluster=nodes))
        await sched.start()

        async def until(what: str, ok) -> None:  # noqa: ANN001
            for _ in range(200):
                if await ok():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"not {what}")

        async def in_memory() -> bool:
            return sched.state.cluster.counts.get(("sim", "online")) == 1

        async def stored_running() -> bool:
            item = await store.get("placements", "f")
            return item is not None and item.value["status"] == "running"

        try:
            await until("online", in_memory)
            answer = await sched.command("place hello name=f")
            assert "status=running" in answer, answer
            version, placed = sched.state.versions["flush-a"], sched.state.cluster.placements["f"]
            await until("written", stored_running)
            assert sched.state.versions["flush-a"] == version
            assert sched.state.cluster.placements["f"] is placed
        finally:
            await sched.close()
            await store.close()

    run(main())


def test_a_node_that_names_peers_without_end_gets_a_bounded_number_dialled(tmp_path: Path) -> None:
    """A node whose gossip names 500 peers that do not answer, before one that does: at most 64 are
    reached at once, each given up after 10 tries (then left to rest), and the real one listed last
    is still found."""
    from fornax_sched.sched import service
    from fornax_sched.sched.backends.base import PeerInfo

    nodes = SimCluster()
    nodes.add("liar")
    nodes.add("real-b")

    class Liar(SimNode):
        async def peers(self) -> list[PeerInfo]:
            ghosts = [PeerInfo(f"g{i}", f"ghost-{i:03d}", f"sim!ghost-{i:03d}", "online") for i in range(500)]
            return ghosts + [PeerInfo("b", "real-b", "sim!real-b", "online")]

    async def main() -> None:
        store = await open_store(str(tmp_path / "sched.db"))
        sched = Scheduler(store, seeds=["sim!liar"], interval=0.05,
                          connect=lambda addr: (Liar if addr == "sim!liar" else SimNode)(addr, timeout=1.0,
                                                                                          cluster=nodes))
        await sched.start()
        most = 0
        try:
            for _ in range(400):
                most = max(most, len(sched._learning))
                if "real-b" in sched.links:
                    break
                await asyncio.sleep(0.025)
            assert "real-b" in sched.links, "the real peer was never reached"
            assert 0 < most <= service.MAX_LEARNING, most
            assert sched._peer_retry and all(times >= 1 for _, times in sched._peer_retry.values())
            assert not any(n.startswith("ghost-") for n in sched.links)
        finally:
            await sched.close()
            await store.close()

    run(main())


def test_a_claim_outlives_the_slowest_backends_calls(tmp_path: Path) -> None:
    """A name being acted on is kept from the reconcilers until the action ends, or, should its release
    be lost, until three of the slowest followed backend's calls could have run: a Persys agent's run
    may take an apply and its wait (90 s by default), so its claims must not lapse at the 30 s that
    bounds a Fornax node's (a start still under way was started a second time)."""
    from fornax_sched.sched.backends.persys import PersysAgent
    from fornax_sched.sched.store import open_store

    async def main() -> None:
        now = [1000.0]
        store = await open_store(str(tmp_path / "sched.db"))
        sched = Scheduler(store, interval=0.2, node_timeout=5.0, monotonic=lambda: now[0])
        try:
            fornax_only = 4 * 5.0 + 10
            sched._claim({"slow-1"})
            now[0] += fornax_only + 1
            assert "slow-1" not in sched._busy_now()  # (no agent followed: the old bound)
            agent = PersysAgent("persys!127.0.0.1:9")
            sched._link("agent-x", agent.addr, agent)
            assert agent.longest == 2 * 45 + 10
            sched._claim({"slow-2"})
            now[0] += 90 + 10
            assert "slow-2" in sched._busy_now()  # an agent's run and its wait: still claimed
            now[0] += 3 * agent.longest
            assert "slow-2" not in sched._busy_now()  # a lost release lapses all the same
        finally:
            await sched.close()
            await store.close()

    asyncio.run(main())
