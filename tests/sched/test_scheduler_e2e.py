"""The scheduler end to end: a real `fornax-sched serve` over three real fornax-node daemons.

The acceptance scenario of the scheduler issue, then each ctl command, the
policy file, access control, and a kill -9 of the scheduler in the middle of
a burst of places.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error

from ..node.cluster import NodeProc, alive, eventually, read, three_nodes
from ..node.cluster import ctl as node_ctl
from .harness import SchedProc, ctl, discovered, ls, placement, rounds_pass, running_on, scheduler_over_three

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[SchedProc, list[NodeProc]]]:
    with scheduler_over_three(tmp_path) as c:
        yield c


async def where_running(nodes: list[NodeProc]) -> dict[str, list[str]]:
    """Container name -> the nodes that say they run it."""
    out: dict[str, list[str]] = {}
    for n in nodes:
        if n.proc is not None and n.proc.poll() is None:
            for name in await running_on(n):
                out.setdefault(name, []).append(n.name)
    return out


def test_acceptance_scenario(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    """Three nodes discovered; place hello runs a real process; kill -9 its node and it is placed
    again elsewhere; the node returns and the copy there is stopped; evacuate empties a node."""
    sched, nodes = cluster
    by_name = {n.name: n for n in nodes}

    async def scenario() -> None:
        assert await discovered(sched) == ["fornax-01", "fornax-02", "fornax-03"]
        reply = await ctl(sched.addr, "place hello")
        name = reply.split()[0]
        assert name == "hello-1" and "status=running" in reply
        p = await placement(sched.addr, name)
        first = by_name[p["node"]]
        assert p["image"] == "hello" and p["status"] == "running"
        # a real process on that node, under the scheduler's name
        ids = await running_on(first)
        assert name in ids
        text = await read(first.addr, f"cluster/containers/{ids[name]}/status")
        st = dict(line.partition(" ")[::2] for line in text.splitlines())
        assert alive(int(st["pid"]))

        first.kill9()  # the daemon only: its container keeps running, as on a machine cut off

        async def moved() -> dict[str, str] | None:
            q = await placement(sched.addr, name)
            return q if q["node"] != first.name and q["status"] == "running" else None

        q = await eventually(moved, timeout=15)
        assert name in await running_on(by_name[q["node"]])
        log = await read(sched.addr, "cluster/scheduler/log")
        assert f"node {first.name} dead" in log and f"re-place {name}: -> {q['node']}" in log

        first.start()  # it comes back with the old copy still running: that copy is stopped

        async def once() -> bool:
            return (await where_running(nodes)).get(name) == [q["node"]]

        await eventually(once, timeout=15)
        assert "also runs on" in await read(sched.addr, "cluster/scheduler/log")

        # evacuate fornax-02 after giving it something to carry
        await ctl(sched.addr, "place hello replicas=4 name=web")
        await discovered(sched)
        before = (await read(sched.addr, "cluster/nodes/fornax-02/containers")).splitlines()
        assert before, "spread put nothing on fornax-02"
        reply = await ctl(sched.addr, "evacuate fornax-02")
        assert reply.startswith(f"evacuated fornax-02: {len(before)} moved, 0 pending")
        assert (await read(sched.addr, "cluster/nodes/fornax-02/containers")) == ""
        assert (await read(sched.addr, "cluster/nodes/fornax-02/status")).strip() == "online cordoned"
        assert await running_on(by_name["fornax-02"]) == {}, (reply, await read(sched.addr, "cluster/scheduler/log"))
        runs = await where_running(nodes)
        assert all(len(v) == 1 for v in runs.values()), runs
        assert set(runs) == {"hello-1", "web-1", "web-2", "web-3", "web-4"}

    asyncio.run(scenario())


def test_commands(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    sched, nodes = cluster
    by_name = {n.name: n for n in nodes}

    async def go() -> None:
        await discovered(sched)
        # bad commands: an error that says what is wrong, and nothing changes
        log_before = await read(sched.addr, "cluster/scheduler/log")
        for bad, words in [("dance", "unknown command 'dance'"), ("place", "usage: place"),
                           ("place hello cpu>=x", "bad cpu constraint"), ("migrate a b", "usage: migrate"),
                           ("stop nosuch", "no container or group 'nosuch'"), ("evacuate nosuch", "no node 'nosuch'"),
                           ("place nosuchimage", "unknown image 'nosuchimage'")]:
            with pytest.raises(P9Error, match=words):
                await ctl(sched.addr, bad)
        assert await ls(sched.addr, "cluster/scheduler/placements") == []
        new_lines = (await read(sched.addr, "cluster/scheduler/log"))[len(log_before):]
        assert "nosuchimage" in new_lines
        assert "refused 'dance': unknown command 'dance'" in new_lines  # where a 9P2000.L user finds the words

        # constraints, and a place no node could take waits as unschedulable with the reason
        reply = await ctl(sched.addr, "place hello node=fornax-03 name=c3")
        assert reply.startswith("c3 node=fornax-03 status=running")
        with pytest.raises(P9Error, match=r"c3 does not fit on fornax-01 \(constraints node=fornax-03 exclude it\)"):
            await ctl(sched.addr, "migrate c3 fornax-03 fornax-01")
        reply = await ctl(sched.addr, "place hello cpu>=64 name=big")
        assert reply.startswith("big node=- status=unschedulable (no node fits cpu>=64: 3 too small (it asks for "
                                "more than any node offers))"), reply
        # migrate: stop on the source, start on the target
        src = (await ctl(sched.addr, "place hello node!=fornax-03 name=pinned")).split()[1][len("node="):]
        dst = "fornax-02" if src == "fornax-01" else "fornax-01"
        reply = await ctl(sched.addr, f"migrate pinned {src} {dst}")
        assert reply.startswith(f"pinned node={dst} status=running")
        assert "pinned" in await running_on(by_name[dst])
        assert "pinned" not in await running_on(by_name[src])
        with pytest.raises(P9Error, match=f"pinned is on {dst}, not {src}"):
            await ctl(sched.addr, f"migrate pinned {src} fornax-03")
        await ctl(sched.addr, "remove c3")
        # stop, start, remove
        assert "status=stopped" in await ctl(sched.addr, "stop pinned")
        assert await running_on(by_name[dst]) == {}
        assert "status=running" in await ctl(sched.addr, "start pinned")
        assert "pinned" in await running_on(by_name[dst])
        assert await ctl(sched.addr, "remove pinned") == "removed pinned\n"
        assert await where_running(nodes) == {}
        # replicas and scale
        reply = await ctl(sched.addr, "place hello name=web replicas=3 anti-affinity=web-*")
        homes = [line.split()[1] for line in reply.splitlines()]
        assert len(set(homes)) == 3, reply
        assert "web-4" in await ctl(sched.addr, "scale web 4")
        assert "removed web-3 web-4" in await ctl(sched.addr, "scale web 2")
        assert sorted(await where_running(nodes)) == ["web-1", "web-2"]
        # cordon keeps new work off a node
        await ctl(sched.addr, "cordon fornax-01")
        await ctl(sched.addr, "cordon fornax-02")
        assert "node=fornax-03" in await ctl(sched.addr, "place hello name=c1")
        await ctl(sched.addr, "uncordon fornax-01")
        await ctl(sched.addr, "uncordon fornax-02")
        # ctl reads back the state
        summary = await read(sched.addr, "cluster/scheduler/ctl")
        assert summary.startswith("nodes 3 online 3\nplacements 4 running 3 unschedulable 1\npolicy spread")
        # rebalance moves at most the number asked for (four could move here: it moves two)
        await ctl(sched.addr, "cordon fornax-01")
        await ctl(sched.addr, "cordon fornax-02")
        await ctl(sched.addr, "place hello replicas=4 name=crowd")
        await ctl(sched.addr, "uncordon fornax-01")
        await ctl(sched.addr, "uncordon fornax-02")
        reply = await ctl(sched.addr, "rebalance 2")
        assert reply.startswith("rebalanced: 2 moved"), reply
        runs = await where_running(nodes)
        assert all(len(v) == 1 for v in runs.values()), runs

    asyncio.run(go())


def test_pending_is_placed_when_capacity_appears(tmp_path: Path) -> None:
    nodes = three_nodes(tmp_path)
    big = NodeProc("fornax-big", nodes[0].port + 0, 0, tmp_path / "big", extra=["--cpus", "64"])
    sched = SchedProc(tmp_path / "sched", [n.addr for n in nodes]).start()
    try:
        async def go() -> None:
            await discovered(sched)
            assert "status=unschedulable" in await ctl(sched.addr, "place hello cpu=32 name=big")  # no node is that big
            from ..node.cluster import free_port
            big.port, big.gossip = free_port(), free_port(2)
            big.peers = [nodes[0].gossip]
            big.start()

            async def placed() -> dict[str, str] | None:
                p = await placement(sched.addr, "big")
                return p if p["status"] == "running" else None

            p = await eventually(placed, timeout=15)
            assert p["node"] == "fornax-big"
            assert "place pending big: -> fornax-big" in await read(sched.addr, "cluster/scheduler/log")

        asyncio.run(go())
    finally:
        sched.stop()
        if big.proc is not None:
            big.stop()
        for n in nodes:
            n.stop()


def test_policy_file(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    sched, _ = cluster

    async def go() -> None:
        async with await Client.connect(sched.addr, version="9P2000.u", timeout=10) as c:
            assert await c.read_file("cluster/scheduler/policy") == b"spread\n"
            with pytest.raises(P9Error, match="line 2: unknown rule 'afinity'"):
                await c.write_file("cluster/scheduler/policy", b"pack\nafinity cpu>=2\n")
            assert await c.read_file("cluster/scheduler/policy") == b"spread\n"
            await c.write_file("cluster/scheduler/policy", b"pack\nanti-affinity web-* spread\n")
            assert await c.read_file("cluster/scheduler/policy") == b"pack\nanti-affinity web-* spread\n"
        await discovered(sched)
        homes = {(await ctl(sched.addr, "place hello")).split()[1] for _ in range(3)}
        assert len(homes) == 1  # pack
        # the policy survives a restart
        sched.stop()
        sched.start()
        assert await read(sched.addr, "cluster/scheduler/policy") == "pack\nanti-affinity web-* spread\n"

    asyncio.run(go())


def test_only_writers_may_write(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    sched, _ = cluster

    async def go() -> None:
        async with await Client.connect(sched.addr, version="9P2000.u", uname="mallory", timeout=10) as c:
            assert b"policy spread" in await c.read_file("cluster/scheduler/ctl")  # everyone may read
            for f in ("ctl", "policy"):
                with pytest.raises(P9Error, match=f"mallory may not write {f}; the writers are"):
                    await c.write_file(f"cluster/scheduler/{f}", b"pack\n")
        assert await read(sched.addr, "cluster/scheduler/policy") == "spread\n"

    asyncio.run(go())


def test_kill9_of_the_scheduler_during_a_burst(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    """Every acknowledged place survives; after the restart each container runs exactly once."""
    sched, nodes = cluster

    async def go() -> None:
        await discovered(sched)
        acked: list[str] = []

        async def placer(k: int) -> None:
            for i in range(40):
                try:
                    reply = await ctl(sched.addr, f"place hello name=b{k}x{i}")
                except (ConnectionError, TimeoutError, P9Error, OSError):
                    return
                acked.append(reply.split()[0])

        tasks = [asyncio.create_task(placer(k)) for k in range(4)]
        while len(acked) < 25:
            await asyncio.sleep(0.01)
        sched.kill9()
        await asyncio.gather(*tasks)
        assert len(acked) >= 25
        sched.start()

        async def settled() -> bool:
            names = {e.name for e in await ls(sched.addr, "cluster/scheduler/placements")}
            assert set(acked) <= names, f"lost: {set(acked) - names}"
            runs = await where_running(nodes)
            statuses = [(await placement(sched.addr, n))["status"] for n in names]
            missing = {n: await read(sched.addr, f"cluster/scheduler/placements/{n}") for n in names - set(runs)}
            if missing:
                views = []
                for n in missing:
                    q = await placement(sched.addr, n)
                    node = {x.name: x for x in nodes}[q["node"]]
                    views.append(await read(node.addr, f"cluster/containers/{q['cid']}/status"))
                raise AssertionError(f"{missing} {views}")
            assert set(runs) == names, f"not placed: {set(runs) - names}"
            twice = {k: v for k, v in runs.items() if len(v) > 1}
            assert not twice, f"running twice: {twice}"
            return all(s == "running" for s in statuses)

        await eventually(settled, timeout=20)

    asyncio.run(go())


def test_concurrent_places_start_each_container_once(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    """Places from eight writers while the reconcilers list the nodes five times a second: a
    reconciler whose listing began before a place must not start that container as well."""
    sched, nodes = cluster

    async def go() -> None:
        await discovered(sched)

        async def writer(k: int) -> None:
            async with await Client.connect(sched.addr, version="9P2000.u", timeout=60) as c:
                for i in range(30):
                    await c.write_file("cluster/scheduler/ctl", f"place hello name=w{k}x{i}".encode())

        async def instances() -> dict[str, int]:
            out: dict[str, int] = {}
            for n in nodes:  # one read a node: every container's status
                for st in (await read(n.addr, "cluster/self/containers")).split("\n\n"):
                    kv = dict(line.partition(" ")[::2] for line in st.splitlines())
                    if kv.get("state") in ("created", "running"):
                        out[kv["name"]] = out.get(kv["name"], 0) + 1
            return out

        await asyncio.gather(*(writer(k) for k in range(8)))
        got = await instances()
        assert len(got) == 240
        twice = {k: v for k, v in got.items() if v > 1}
        if twice:
            # Only a start whose call timed out may have run twice (the node ran it after the
            # scheduler gave up on the answer, and the retry ran it again): that is in the log, and
            # the reconciler stops the extra copy.
            log = await read(sched.addr, "cluster/scheduler/log")
            unanswered = {line.split()[2] for line in log.splitlines() if "; will retry" in line}
            assert set(twice) <= unanswered, (twice, sorted(unanswered))

            async def once_each() -> bool:
                return all(v == 1 for v in (await instances()).values())

            await eventually(once_each, timeout=30)

        # A second instance of one of ours on the same node (as a crash between a start and its
        # record leaves): the reconciler stops it and keeps the one recorded.  One started by hand
        # under the same name is not ours: it is left alone.
        p = await placement(sched.addr, "w0x0")
        node = {n.name: n for n in nodes}[p["node"]]
        cluster_id = (await read(sched.addr, "cluster/scheduler/ctl")).split("cluster ")[1].split()[0]
        await node_ctl(node.addr, "cluster/ctl", f"run hello name=w0x0 label=fornax.sched/cluster={cluster_id}")
        await node_ctl(node.addr, "cluster/ctl", "run hello name=w0x0")
        # (the reconciler may already have stopped our extra copy: rounds run every 0.2 s)

        async def once() -> bool:
            return (await instances())["w0x0"] == 2

        await eventually(once, timeout=10)
        assert (await placement(sched.addr, "w0x0"))["cid"] == p["cid"]
        # (the two runs may land in different rounds: the stop in one, the foreign one seen in the next)
        async def both_logged() -> bool:
            log = await read(sched.addr, "cluster/scheduler/log")
            return f"w0x0 runs twice on {node.name} (containers {p['cid']} and " in log and \
                f"w0x0 on {node.name} was not placed by this scheduler; left alone" in log

        await eventually(both_logged, timeout=10)
        await rounds_pass(sched, node.name, 3)  # a few more rounds: the hand-started one is still there
        assert (await instances())["w0x0"] == 2

    asyncio.run(go())


def test_a_store_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    run = subprocess.run([sys.executable, "-m", "fornax_sched", "serve", "--listen", "tcp!127.0.0.1!0",
                          "--state", str(tmp_path / "file" / "state")], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert f"cannot open the store {tmp_path / 'file' / 'state' / 'sched.db'}" in run.stdout + run.stderr
    # a corrupt store file too, and it is left as it was for the user to look at
    state = tmp_path / "corrupt"
    state.mkdir()
    (state / "sched.db").write_bytes(b"this is not SQLite" * 100)
    run = subprocess.run([sys.executable, "-m", "fornax_sched", "serve", "--listen", "tcp!127.0.0.1!0",
                          "--state", str(state)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "is not a SQLite file" in run.stdout + run.stderr, run.stdout + run.stderr
    assert (state / "sched.db").read_bytes() == b"this is not SQLite" * 100
