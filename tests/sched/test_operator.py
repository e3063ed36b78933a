"""The operator's everyday through the real file tree: group commands and one-read listings.

A real `fornax-sched serve` over three real fornax-node daemons; everything
goes through 9P as a user's `echo` and `cat` would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error

from ..helpers import free_port
from ..node.cluster import NodeProc, eventually, read
from .harness import SchedProc, ctl, discovered, ls, running_on, scheduler_over_three

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[SchedProc, list[NodeProc]]]:
    with scheduler_over_three(tmp_path, every_seed=True) as c:
        yield c


async def running_everywhere(nodes: list[NodeProc]) -> list[str]:
    """Names running on any node, each once per copy."""
    names: list[str] = []
    for n in nodes:
        names += await running_on(n)
    return sorted(names)


def test_group_stop_start_remove_act_on_every_replica(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    sched, nodes = cluster

    async def go() -> None:
        await discovered(sched)
        reply = await ctl(sched.addr, "place hello name=web replicas=4")
        assert reply.count("status=running") == 4, reply
        assert len({line.split()[1] for line in reply.splitlines()}) == 3  # spread over every node
        await ctl(sched.addr, "place hello name=api")
        assert await running_everywhere(nodes) == ["api", "web-1", "web-2", "web-3", "web-4"]

        reply = await ctl(sched.addr, "stop web")
        assert sorted(line.split()[0] for line in reply.splitlines()) == ["web-1", "web-2", "web-3", "web-4"], reply

        async def only_api() -> bool:
            return await running_everywhere(nodes) == ["api"]

        await eventually(only_api, timeout=15)
        status = await read(sched.addr, "cluster/scheduler/status")
        assert status.count("stopped (stop)") == 4, status

        reply = await ctl(sched.addr, "start web")
        assert reply.count("status=running") == 4, reply

        async def all_back() -> bool:
            return await running_everywhere(nodes) == ["api", "web-1", "web-2", "web-3", "web-4"]

        await eventually(all_back, timeout=15)
        reply = await ctl(sched.addr, "remove web")
        assert reply.split() == ["removed", "web-1", "removed", "web-2", "removed", "web-3", "removed", "web-4"]
        await eventually(only_api, timeout=15)
        with pytest.raises(P9Error, match="no container or group 'web'"):
            await ctl(sched.addr, "stop web")
        with pytest.raises(P9Error, match=r"no group 'nosuch': a group is the name= of a place"):
            await ctl(sched.addr, "scale nosuch 2")

    asyncio.run(go())


def test_status_and_nodes_are_one_read_each(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    sched, nodes = cluster

    async def go() -> None:
        await discovered(sched)
        await ctl(sched.addr, "place hello name=web replicas=2")
        await ctl(sched.addr, "place hello name=big cpu>=64")  # fits nowhere: waits, saying why
        table = (await read(sched.addr, "cluster/scheduler/status")).splitlines()
        assert table[0].split() == ["NAME", "IMAGE", "NODE", "STATUS", "AGE", "WHY"]
        blank = table.index("")
        rows = {line.split()[0]: line for line in table[1:blank]}
        assert set(rows) == {"web-1", "web-2", "big"}, table
        assert " running " in rows["web-1"] and "fornax-0" in rows["web-1"]
        assert " unschedulable " in rows["big"], rows["big"]
        assert "no node fits cpu>=64: 3 too small (it asks for more than any node offers" in rows["big"], rows["big"]
        assert table[blank + 1].split() == ["GROUP", "WANTED", "RUNNING", "PENDING", "OTHER"]
        groups = {line.split()[0]: line.split()[1:] for line in table[blank + 2:]}
        assert groups == {"web": ["2", "2", "0", "0"], "big": ["1", "0", "1", "0"]}, groups

        doc = json.loads(await read(sched.addr, "cluster/scheduler/status.json"))
        by_name = {p["name"]: p for p in doc["placements"]}
        assert by_name["web-2"]["status"] == "running" and by_name["big"]["why"].startswith("no node fits")
        assert {g["group"]: g["running"] for g in doc["groups"]} == {"big": 0, "web": 2}

        async def loads_known() -> list[dict] | None:  # type: ignore[type-arg]
            listed = json.loads(await read(sched.addr, "cluster/scheduler/nodes.json"))["nodes"]
            return listed if all(n["load"] is not None for n in listed) else None

        listed = await eventually(loads_known, timeout=15)
        assert [n["name"] for n in listed] == ["fornax-01", "fornax-02", "fornax-03"]
        assert sum(n["containers"] for n in listed) == 2
        for n in listed:
            assert n["kind"] == "fornax" and n["status"] == "online" and n["cpus"] > 0
            assert 0 <= n["mem_used"] <= n["mem"]  # (as the node says: limits, or use if larger)
        table = (await read(sched.addr, "cluster/scheduler/nodes")).splitlines()
        assert table[0].split()[:4] == ["NAME", "KIND", "STATUS", "CPUS"] and len(table) == 4

    asyncio.run(go())


def test_the_log_reads_the_same_after_a_restart(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    """Every line keeps its time: lines noted outside a plan (a node coming online, a container that
    started) reach the store with a later commit, and once came back out of order, restamped."""
    sched, nodes = cluster

    async def before() -> list[str]:
        await discovered(sched)
        await ctl(sched.addr, "place hello name=web replicas=3")
        await ctl(sched.addr, "stop web-2")
        await ctl(sched.addr, "place hello")
        return (await read(sched.addr, "cluster/scheduler/log")).splitlines()

    lines = asyncio.run(before())
    sched.stop()
    sched.start()

    async def after() -> list[str]:
        await discovered(sched)
        return (await read(sched.addr, "cluster/scheduler/log")).splitlines()

    again = asyncio.run(after())
    # Every line is back with the time it was shown with, and the log reads in time order (live, a
    # line noted while a commit is under way may show just before that commit's earlier-stamped lines).
    assert not set(lines) - set(again), sorted(set(lines) - set(again))
    stamps = [line.split()[0] for line in again]
    assert stamps == sorted(stamps)


def test_unclear_messages_name_what_they_are_about(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    sched, nodes = cluster

    async def go() -> None:
        await discovered(sched)
        with pytest.raises(P9Error, match=r"migrate: '-' is not a source node name .*; usage: migrate CONTAINER"):
            await ctl(sched.addr, "migrate web-5 - fornax-01")
        with pytest.raises(P9Error, match=r"stop: 'a b' is not|usage: stop NAME"):
            await ctl(sched.addr, "stop a b")
        nodes[2].kill9()

        async def suspect() -> str | None:
            log = await read(sched.addr, "cluster/scheduler/log")
            return next((line for line in log.splitlines() if "node fornax-03 suspect" in line), None)

        line = await eventually(suspect, timeout=15)
        assert line.count(nodes[2].addr) == 1, line  # the address once, not three times
        assert "Connection refused" in line or "timed out" in line or "closed" in line, line

    asyncio.run(go())


def crash_images(tmp: Path) -> Path:
    """The example images and `crash`, which ends with exit code 3 at once."""
    import shutil

    images = tmp / "images"
    shutil.copytree(Path(__file__).resolve().parents[2] / "examples" / "images", images)
    (images / "crash").mkdir()
    (images / "crash" / "config").write_text("sh -c 'echo crashing; exit 3'\n")
    (images / "done").mkdir()
    (images / "done" / "config").write_text("sh -c 'echo done'\n")
    (images / "greet").mkdir()  # says two of its variables, then idles
    (images / "greet" / "config").write_text(
        """sh -c 'echo "GREETING=$GREETING TWO=$TWO"; while :; do sleep 1; done'\n""")
    return images


def test_statuses_say_what_happened(tmp_path: Path) -> None:
    """succeeded (exit 0), failed (with the code), pending (no room now), unschedulable (no node could),
    lost (its node died and no other has room), each placed or kept as it should."""
    from ..node.cluster import three_nodes

    nodes = three_nodes(tmp_path, images=crash_images(tmp_path))
    sched = SchedProc(tmp_path / "sched", [n.addr for n in nodes], extra=["--dead", "2"]).start()
    try:
        async def status_of(name: str) -> dict[str, str]:
            return fields_of(await read(sched.addr, f"cluster/scheduler/placements/{name}"))

        async def go() -> None:
            await discovered(sched)
            await ctl(sched.addr, "place done name=ok")
            await ctl(sched.addr, "place crash name=bad")

            async def ended() -> bool:
                ok, bad = await status_of("ok"), await status_of("bad")
                return ok["status"] == "succeeded" and bad["status"] == "failed"

            await eventually(ended, timeout=15)
            assert "detail=exit code 0" in await read(sched.addr, "cluster/scheduler/placements/ok")
            assert "detail=exit code 3" in await read(sched.addr, "cluster/scheduler/placements/bad")
            await ctl(sched.addr, "remove ok")
            await ctl(sched.addr, "remove bad")

            cpus = json.loads(await read(sched.addr, "cluster/scheduler/nodes.json"))["nodes"][0]["cpus"]
            fill = await ctl(sched.addr, f"place hello name=fill cpu={cpus:g} replicas=3")
            assert fill.count("status=running") == 3, fill
            reply = await ctl(sched.addr, "place hello name=wait cpu=1")
            assert reply.startswith("wait node=- status=pending (no node fits cpu>=1: 3 full)"), reply
            reply = await ctl(sched.addr, f"place hello name=huge cpu={cpus * 4:g}")
            assert reply.startswith("huge node=- status=unschedulable"), reply
            table = await read(sched.addr, "cluster/scheduler/status")
            assert "fill   3       3        0        0" in table, table
            assert "wait   1       0        1        0" in table, table

            victim = (await status_of("fill-1"))["node"]
            next(n for n in nodes if n.name == victim).kill9()

            async def lost() -> dict[str, str] | None:
                st = await status_of("fill-1")
                return st if st["status"] == "lost" else None

            await eventually(lost, timeout=20)
            text = await read(sched.addr, "cluster/scheduler/placements/fill-1")
            assert f"detail=lost with {victim}; no node fits cpu>={cpus:g}: " in text, text
            assert (await status_of("wait"))["status"] == "pending"
            await ctl(sched.addr, "remove wait")
            await ctl(sched.addr, "remove fill-2")  # room again: what was lost is placed there

            async def back() -> bool:
                return (await status_of("fill-1"))["status"] == "running"

            await eventually(back, timeout=15)
            # (a node down is still known to be too small: it stays unschedulable, saying so the same way)
            assert (await status_of("huge"))["status"] == "unschedulable"
            assert "3 too small (it asks for more" in (await read(sched.addr, "cluster/scheduler/placements/huge"))

        asyncio.run(go())
    finally:
        sched.stop()
        for n in nodes:
            n.stop()  # (the one killed is started again first, so that it stops the containers it left)


def test_a_crash_loop_restarts_with_backoff_then_moves_node(tmp_path: Path) -> None:
    from ..node.cluster import three_nodes

    nodes = three_nodes(tmp_path, images=crash_images(tmp_path))
    sched = SchedProc(tmp_path / "sched", [n.addr for n in nodes]).start()
    try:
        async def go() -> None:
            await discovered(sched)
            with pytest.raises(P9Error, match="bad restart policy 'restart=sometimes'"):
                await ctl(sched.addr, "place crash restart=sometimes")
            first = (await ctl(sched.addr, "place crash name=loop restart=on-failure")).split()[1][len("node="):]
            await ctl(sched.addr, "place crash name=once")  # restart=never, the default: it stays failed

            async def moved() -> str | None:
                log = await read(sched.addr, "cluster/scheduler/log")
                return log if "loop: crash loop on " + first in log else None

            log = await eventually(moved, timeout=90)
            lines = log.splitlines()
            cut = next(i for i, line in enumerate(lines) if "loop: crash loop on" in line)
            restarts = [line for line in lines[:cut] if "loop: restart " in line]
            assert [line.split("loop: restart ")[1].split()[0] for line in restarts] == ["1", "2", "3"], restarts
            stamps = [float(line.split()[0][17:23]) + 60 * int(line.split()[0][14:16]) for line in restarts]
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            assert gaps[0] >= 1.5 and gaps[1] >= 3.5, gaps  # backoff 1 s, 2 s, 4 s (plus the run itself)
            line = next(line for line in log.splitlines() if "loop: crash loop on" in line)
            assert "(3 restarts, last: exit code 3)" in line and f"placing it on {first}" not in line, line
            text = await read(sched.addr, "cluster/scheduler/placements/loop")
            assert f"node={first} " not in text and "restart=on-failure restarts=" in text, text
            once = await read(sched.addr, "cluster/scheduler/placements/once")
            assert "status=failed" in once and "exit code 3" in once
            assert "once: restart" not in log

        asyncio.run(go())
    finally:
        sched.stop()
        for n in nodes:
            n.stop()


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "fornax-sched"), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


class Follower:
    """A `fornax-sched ... -f` process whose output is collected as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "fornax-sched"), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.out = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            self.out += chunk

    def text(self) -> str:
        return self.out.decode(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(timeout=5)


def test_logs_of_a_container_and_of_the_scheduler_follow(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    """logs/NAME is the container's output through its node; `logs -f` and `9p read -f` follow,
    across a restart; the log's length grows as lines come (what tail -f watches)."""
    sched, nodes = cluster
    env = {"FORNAX_SCHED": sched.addr}

    async def go() -> None:
        await discovered(sched)
        await ctl(sched.addr, "place hello name=talk -- one two")
        cid = fields_of(await read(sched.addr, "cluster/scheduler/placements/talk"))["cid"]
        want = f"hello from fornax container {cid}\nargs: one two\n"

        async def said() -> bool:
            return await read(sched.addr, "cluster/scheduler/logs/talk") == want

        await eventually(said, timeout=10)
        with pytest.raises(P9Error, match="logs/nosuch: (No such file or directory|file does not exist)"):
            await read(sched.addr, "cluster/scheduler/logs/nosuch")
        await ctl(sched.addr, "place hello name=big cpu>=64")
        async with await Client.connect(sched.addr, timeout=10, version="9P2000.u") as c:  # (.u carries the words)
            with pytest.raises(P9Error, match=r"big has no container yet: it is unschedulable \(no node fits cpu>=64"):
                await c.read_file("cluster/scheduler/logs/big")

        # the log: its length is where it ends, and grows
        async def log_length() -> int:
            async with await Client.connect(sched.addr, timeout=10) as c:
                return (await c.stat_path("cluster/scheduler/log")).length

        before = await log_length()
        assert before == len((await read(sched.addr, "cluster/scheduler/log")).encode())
        await ctl(sched.addr, "place hello name=more")
        assert await log_length() > before

    asyncio.run(go())

    logs = Follower("logs", "-f", "talk", sched.addr)
    tail = Follower("9p", "read", "-f", sched.addr, "/cluster/scheduler/log")
    try:
        until(lambda: "args: one two" in logs.text())
        until(lambda: "place more " in tail.text())
        asyncio.run(ctl(sched.addr, "stop talk"))
        asyncio.run(ctl(sched.addr, "start talk"))
        cid = fields_of(asyncio.run(read(sched.addr, "cluster/scheduler/placements/talk")))["cid"]
        until(lambda: f"hello from fornax container {cid}\nargs: one two\n" in logs.text())
        until(lambda: "started talk on " in tail.text().split("stop talk", 1)[-1])
    finally:
        rc_logs, rc_tail = logs.stop(), tail.stop()
    text = logs.text()
    assert text.count("args: one two") == 2, text  # the first container's output once, the second's once
    assert f"--- talk is now container {cid} on " in text, text
    assert tail.text().count("place more ") == 1, tail.text()
    assert rc_logs == rc_tail == 130

    # the listings on the command line: one read each, the address from $FORNAX_SCHED
    st = _cli("status", env=env)
    assert st.returncode == 0 and st.stdout.splitlines()[0].split() == ["NAME", "IMAGE", "NODE", "STATUS", "AGE", "WHY"]
    assert json.loads(_cli("status", "--json", env=env).stdout)["groups"]
    nd = _cli("nodes", sched.addr)
    assert nd.returncode == 0 and len(nd.stdout.splitlines()) == 4, nd
    assert [n["name"] for n in json.loads(_cli("nodes", "--json", sched.addr).stdout)["nodes"]] == \
        ["fornax-01", "fornax-02", "fornax-03"]
    assert _cli("logs", "talk", env=env).stdout.endswith("args: one two\n")
    nosuch = _cli("logs", "nosuch", env=env)
    assert (nosuch.returncode, nosuch.stderr) == \
        (1, "fornax-sched logs: no placement 'nosuch' (fornax-sched status lists them)\n")
    gone = _cli("status", "tcp!127.0.0.1!1")
    assert gone.returncode == 3 and "cannot dial 9P server tcp!127.0.0.1!1" in gone.stderr, gone


def until(check: Callable[[], bool], timeout: float = 10) -> None:
    async def ok() -> bool:
        return check()

    asyncio.run(eventually(ok, timeout=timeout))


def fields_of(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        for word in line.split():
            k, sep, v = word.partition("=")
            if sep and k not in out:
                out[k] = v
    return out


def test_join_adds_a_node_at_run_time(tmp_path: Path) -> None:
    """An operator's new node, told to a running scheduler (ctl join), with every refusal clear."""
    sched = SchedProc(tmp_path / "sched", []).start()
    node = NodeProc("fornax-09", free_port(), free_port(socket.SOCK_DGRAM), tmp_path / "n9").start()
    try:
        async def go() -> None:
            assert "join ADDR" in await read(sched.addr, "cluster/scheduler/ctl")  # the usage names it
            answer = await ctl(sched.addr, f"join {node.addr}")
            assert answer.startswith(f"joining {node.addr}: its name is learnt on first contact"), answer

            async def online() -> bool:
                with contextlib.suppress(P9Error):
                    return (await read(sched.addr, "cluster/nodes/fornax-09/status")).strip() == "online"
                return False

            await eventually(online, 15)
            assert (await ctl(sched.addr, f"join {node.addr}")) == f"{node.addr} is node fornax-09 already\n"
            assert (await ctl(sched.addr, "place hello name=j")).startswith("j node=fornax-09")
            for bad, words in (("join", "usage: join ADDR"), ("join a b", "usage: join ADDR"),
                               ("join udp!x!1", "join udp!x!1: "), ("join persys!10.9.9.9:1", "loopback")):
                with pytest.raises(P9Error, match=words):
                    await ctl(sched.addr, bad)
            with pytest.raises(P9Error, match="permission denied: mallory may not write ctl"):
                await ctl(sched.addr, f"join {node.addr}", uname="mallory")
            log = await read(sched.addr, "cluster/scheduler/log")
            assert f"join {node.addr} (by " in log and log.count(f"join {node.addr} (by ") == 1

        asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        node.stop()
        sched.stop()


def test_env_reaches_the_container_and_stays_with_the_placement(tmp_path: Path) -> None:
    """place ... env:KEY=VALUE: the container has the variables; the placement file shows them; they
    are kept in the store (a restart of the scheduler) and go with the container when its node dies
    and it is placed again.  What a node would refuse is refused at place, with the node's words."""
    from ..node.cluster import three_nodes

    nodes = three_nodes(tmp_path, images=crash_images(tmp_path))
    sched = SchedProc(tmp_path / "sched", [n.addr for n in nodes]).start()
    try:
        async def said(name: str) -> str:
            async def line() -> str | None:
                try:
                    text = await read(sched.addr, f"cluster/scheduler/logs/{name}")
                except P9Error:
                    return None
                return text if text.endswith("\n") else None
            return await eventually(line, timeout=15)

        async def go() -> None:
            await discovered(sched)
            reply = await ctl(sched.addr, "place greet name=g env:GREETING=hi 'env:TWO=a b'")
            assert "status=running" in reply, reply
            assert await said("g") == "GREETING=hi TWO=a b\n"
            text = await read(sched.addr, "cluster/scheduler/placements/g")
            assert "env.GREETING=hi\n" in text and "env.TWO=a b\n" in text, text
            assert "place g (place greet name=g env:GREETING=hi 'env:TWO=a b')" in \
                await read(sched.addr, "cluster/scheduler/log")
            for bad, why in (("env:FORNAX_NODE=x", "FORNAX_ variables are set by the node"),
                             ("env:1X=y", "bad env name '1X'"), ("env:X", "want env:KEY=VALUE"),
                             ("env:X=1 env:X=2", "env X given twice")):
                with pytest.raises(P9Error, match=why):
                    await ctl(sched.addr, f"place greet name=bad {bad}")
            assert "bad" not in await read(sched.addr, "cluster/scheduler/status")
            await ctl(sched.addr, "place greet name=nl 'env:ML=one\ntwo' -- 'a\tb'")  # each line stays one
            text = await read(sched.addr, "cluster/scheduler/placements/nl")
            assert "\nenv.ML=one\\ntwo\n" in text and "\nargs=a\\tb\n" in text, text
            await ctl(sched.addr, "remove nl")

        asyncio.run(go())
        sched.stop()
        sched.start()  # the variables were kept in the store

        async def after() -> None:
            await discovered(sched)
            text = await read(sched.addr, "cluster/scheduler/placements/g")
            assert "env.GREETING=hi\n" in text and "env.TWO=a b\n" in text, text
            victim = fields_of(text)["node"]
            next(n for n in nodes if n.name == victim).kill9()

            async def moved() -> dict[str, str] | None:
                st = fields_of(await read(sched.addr, "cluster/scheduler/placements/g"))
                return st if st["node"] != victim and st["status"] == "running" else None

            await eventually(moved, timeout=20)
            assert await said("g") == "GREETING=hi TWO=a b\n"

        asyncio.run(after())
    finally:
        sched.stop()
        for n in nodes:
            n.stop()


def test_forget_drops_a_dead_node_and_a_join_that_never_answers(tmp_path: Path) -> None:
    """A join to an address that does not answer is said in the log (at the 1st, 10th, 100th try), and
    `forget ADDR` stops it; a dead node stays listed, dialled every look, until `forget NODE`, which
    refuses a node that is not dead.  After a restart the forgotten node is not followed again.
    At most 1,000 joins wait for an answer at once: the next is refused, saying what to do."""
    sched = SchedProc(tmp_path / "sched", []).start()
    nodes = [NodeProc(f"fornax-0{i}", free_port(), free_port(socket.SOCK_DGRAM), tmp_path / f"n{i}").start()
             for i in (1, 2)]
    nowhere = f"tcp!127.0.0.1!{free_port()}"
    try:
        async def log() -> str:
            return await read(sched.addr, "cluster/scheduler/log")

        async def logged(text: str) -> bool:
            return text in await log()

        async def listed() -> list[str]:
            return sorted(e.name for e in await ls(sched.addr, "cluster/nodes"))

        async def go() -> None:
            for n in nodes:
                await ctl(sched.addr, f"join {n.addr}")
            await ctl(sched.addr, f"join {nowhere}")
            await eventually(lambda: logged(f"{nowhere} not reached (1 try; trying again, at most 2s apart, or: "
                                            f"forget {nowhere}): cannot connect: Connection refused"), 10)
            assert await ctl(sched.addr, f"forget {nowhere}") == f"{nowhere}: no longer tried\n"
            with pytest.raises(P9Error, match=f"forget {nowhere}: no such node, nor an address being joined"):
                await ctl(sched.addr, f"forget {nowhere}")

            async def two() -> bool:
                return await listed() == ["fornax-01", "fornax-02"]

            await eventually(two, 15)
            with pytest.raises(P9Error, match="forget fornax-02: it is online; a node is forgotten once it is dead"):
                await ctl(sched.addr, "forget fornax-02")
            assert (await ctl(sched.addr, "place hello name=f replicas=2")).count("status=running") == 2
            nodes[1].kill9()

            async def dead() -> bool:
                return (await read(sched.addr, "cluster/nodes/fornax-02/status")).strip() == "dead"

            await eventually(dead, 15)
            assert await ctl(sched.addr, "forget fornax-02") == "fornax-02 forgotten\n"
            assert await listed() == ["fornax-01"]
            assert await logged(f"forget fornax-02 (at {nodes[1].addr}, by ")
            assert "fornax-02" not in await read(sched.addr, "cluster/scheduler/status")  # (f-2 ran again on 01)
            said = (await log()).count(f"{nowhere} not reached")
            await asyncio.sleep(2.5)  # a dozen looks: the forgotten join is not tried (nor said) again
            assert (await log()).count(f"{nowhere} not reached") == said
            # 1,000 joins that no one answers (a script with the wrong ports), all on one connection
            async with await Client.connect(sched.addr, timeout=30, version="9P2000.u") as c:
                for port in range(2, 1002):  # (privileged ports: nothing here serves 9P on them)
                    await c.write_file("cluster/scheduler/ctl", f"join tcp!127.0.0.1!{port}".encode(),
                                       read_reply=True)
                with pytest.raises(P9Error, match="1000 addresses are being joined and have not answered yet, "
                                                  "the most there may be: forget some"):
                    await c.write_file("cluster/scheduler/ctl", b"join tcp!127.0.0.1!1", read_reply=True)
                assert (await c.write_file("cluster/scheduler/ctl", b"forget tcp!127.0.0.1!2",
                                           read_reply=True)).endswith(b"no longer tried\n")
                assert (await c.write_file("cluster/scheduler/ctl", b"join tcp!127.0.0.1!1", read_reply=True)) \
                    .startswith(b"joining tcp!127.0.0.1!1")

        asyncio.run(asyncio.wait_for(go(), 90))
        sched.stop()
        sched.start()

        async def after() -> None:
            async def back() -> bool:
                return (await read(sched.addr, "cluster/nodes/fornax-01/status")).strip() == "online"

            await eventually(back, 15)
            assert await listed() == ["fornax-01"]

        asyncio.run(after())
    finally:
        sched.stop()
        for n in nodes:
            n.stop()


def test_a_node_dead_past_forget_dead_is_forgotten_on_its_own(tmp_path: Path) -> None:
    """serve --forget-dead S: a node dead that long is forgotten as `forget NODE` would, by the scheduler."""
    nodes = [NodeProc(f"fornax-0{i}", free_port(), free_port(socket.SOCK_DGRAM), tmp_path / f"n{i}").start()
             for i in (1, 2)]
    sched = SchedProc(tmp_path / "sched", [n.addr for n in nodes], extra=["--forget-dead", "3"]).start()
    try:
        async def go() -> None:
            await discovered(sched, 2)
            assert (await ctl(sched.addr, "place hello name=f replicas=2")).count("status=running") == 2
            nodes[1].kill9()

            async def forgotten() -> bool:
                return sorted(e.name for e in await ls(sched.addr, "cluster/nodes")) == ["fornax-01"]

            await eventually(forgotten, 20)
            log = await read(sched.addr, "cluster/scheduler/log")
            assert f"forget fornax-02 (at {nodes[1].addr}, by scheduler): no longer followed; dead for " in log, log
            assert log.index("node fornax-02 dead") < log.index("forget fornax-02")  # (dead first, 2 s; then 3 s)
            text = await read(sched.addr, "cluster/scheduler/status")
            assert "fornax-02" not in text, text  # (f-2 was placed again on fornax-01 when its node died)

        asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        sched.stop()
        for n in nodes:
            n.stop()
