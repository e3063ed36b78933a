"""What a scheduler reads from and writes to one real node daemon, over 9P.

Each section is one thing the scheduler relies on, tested through the ctl
file and the /cluster tree of a real daemon, across its crashes and restarts.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error

from ..helpers import run
from .cluster import IMAGES, NodeProc, alive, ctl, eventually, free_port, read, status

SHUTDOWN = "stopped: node shutting down"



def images(tmp: Path) -> Path:
    """The example images, and some that run does not accept (so self/images must not list them)."""
    d = tmp / "images"
    shutil.copytree(IMAGES, d)
    for name, config in {
        "stubborn": "sh -c \"trap '' TERM; echo stubborn; while :; do sleep 0.1; done\"\n",
        "quick": "sh -c 'exit \"${1:-0}\"' quick\n",
        "missing": "no-such-command-anywhere\n",  # its command is not found
        "empty": "# nothing to run\n",  # no command
        "x" * 64: "sleep 1\n",  # a name run refuses (at most 63)
    }.items():
        (d / name).mkdir()
        (d / name / "config").write_text(config)
    (d / "noconfig").mkdir()
    (d / ".hidden").mkdir()
    (d / ".hidden" / "config").write_text("sleep 1\n")
    return d


def new_node(tmp: Path, *extra: str) -> NodeProc:
    return NodeProc("fornax-files", free_port(), free_port(socket.SOCK_DGRAM), tmp / "state",
                    images=images(tmp), extra=list(extra)).start()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProc]:
    n = new_node(tmp_path)
    yield n
    n.stop()


async def st(n: NodeProc, cid: str) -> dict[str, str]:
    return status(await read(n.addr, f"cluster/containers/{cid}/status"))


def pid_environ(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")


# ------------------------------------------------------------ labels and env
def test_run_with_labels_and_env(node: NodeProc) -> None:
    async def main() -> None:
        cid = (await ctl(node.addr, "cluster/ctl", "run hello label=owner=fornax-sched label=fornax.rev=7 "
                                                   "'env=GREETING=hello world' env=EMPTY= name=web-0")).strip()
        text = await read(node.addr, f"cluster/containers/{cid}/status")
        assert text.endswith("env EMPTY,GREETING\nlabel.fornax.rev 7\nlabel.owner fornax-sched\n")
        assert "hello world" not in text  # env values may be secrets
        s = status(text)
        assert (s["state"], s["name"]) == ("running", "web-0")
        environ = pid_environ(int(s["pid"]))
        assert "GREETING=hello world" in environ and "EMPTY=" in environ and f"FORNAX_CONTAINER={cid}" in environ
        assert environ.index("GREETING=hello world") > environ.index("FORNAX_IMAGE=hello")

        # bad labels and env are clear errors and start nothing (9P2000 carries the error text)
        async with await Client.connect(node.addr, version="9P2000") as c:
            for cmd, message in [
                ("run hello env=FORNAX_NODE=elsewhere", "env FORNAX_NODE: FORNAX_ variables are set by the node"),
                ("run hello label=a=1 label=a=2", "label a given twice"),
                ("run hello env=A=1 env=A=2", "env A given twice"),
                ("run hello env=1X=y", "bad env name '1X'"),
                ("run hello 'label=zone=two words'", "bad value 'two words' of label zone"),
                ("run hello label=zone", "want label=KEY=VALUE"),
            ]:
                with pytest.raises(P9Error, match=message):
                    await c.write_file("cluster/ctl", cmd.encode())
            assert [e.name for e in await c.ls("cluster/containers")] == [cid]
            assert "label=KEY=VALUE" in (await c.read_file("cluster/ctl")).decode()
        # after "--" they are arguments
        cid2 = (await ctl(node.addr, "cluster/ctl", "run hello -- label=a=1 env=B=2")).strip()
        s2 = await st(node, cid2)
        assert s2["cmd"].endswith(" label=a=1 env=B=2") and "env" not in s2 and "label.a" not in s2
    run(main())


def test_labels_survive_crash_and_restart_and_shutdown_is_not_a_user_stop(node: NodeProc) -> None:
    async def main() -> None:
        a = (await ctl(node.addr, "cluster/ctl", "run hello label=owner=sched label=rev=3 env=TOKEN=s3cret")).strip()
        b = (await ctl(node.addr, "cluster/ctl", "run hello label=owner=sched")).strip()
        await ctl(node.addr, "cluster/ctl", f"stop {b}")
        before = await st(node, a)

        node.kill9()  # the daemon crashes; its containers run on
        node.start()
        s = await st(node, a)
        assert s == before and alive(int(s["pid"]))  # adopted, with its labels and env keys
        assert (s["label.owner"], s["label.rev"], s["env"]) == ("sched", "3", "TOKEN")
        sb = await st(node, b)
        assert (sb["state"], sb["reason"], sb["label.owner"]) == ("stopped", "stopped by request", "sched")

        assert node.stop() == 0  # SIGTERM: a clean shutdown stops a
        assert not alive(int(s["pid"]))
        node.start()
        s = await st(node, a)
        assert (s["state"], s["reason"], s["label.owner"], s["env"]) == ("stopped", SHUTDOWN, "sched", "TOKEN")
        assert (await st(node, b))["reason"] == "stopped by request"
        record = (node.state / "containers" / a / "container.json").read_text()
        assert "s3cret" not in record
    run(main())


def test_shutdown_cut_short_by_kill9_still_reads_shutdown(tmp_path: Path) -> None:
    """The daemon dies (kill -9) while its shutdown waits out a container's grace: the
    next daemon finishes that stop, and the reason is still the shutdown's."""
    n = new_node(tmp_path, "--grace", "60")
    try:
        cid = run(ctl(n.addr, "cluster/ctl", "run stubborn label=owner=sched")).strip()
        record = n.state / "containers" / cid / "container.json"

        async def trap_set() -> bool:
            return "stubborn" in await read(n.addr, f"cluster/containers/{cid}/log")
        run(eventually(trap_set, 10, 0.05))
        pid = int(run(st(n, cid))["pid"])
        assert n.proc is not None
        n.proc.terminate()
        deadline = time.monotonic() + 10
        while json.loads(record.read_text()).get("stopping") is None:  # the shutdown's intent, saved first
            assert time.monotonic() < deadline, "the shutdown did not record its stop"
            time.sleep(0.02)
        n.kill9()
        assert alive(pid)  # it ignores SIGTERM, and nobody sent SIGKILL yet
        n.extra = ["--grace", "0.2"]
        n.start()

        async def stopped() -> dict[str, str] | None:
            s = await st(n, cid)
            return s if s["state"] == "stopped" else None
        s = run(eventually(stopped, 10))
        assert s["reason"].startswith(SHUTDOWN + " (killed after"), s
        assert s["label.owner"] == "sched" and not alive(pid)
    finally:
        n.stop()


# ------------------------------------------------------------ self/images
def test_images_lists_what_run_accepts(node: NodeProc) -> None:
    async def main() -> None:
        listed = (await read(node.addr, "cluster/self/images")).splitlines()
        assert listed == ["hello", "quick", "stubborn", "web"]
        for image in listed:
            cid = (await ctl(node.addr, "cluster/ctl", f"run {image}")).strip()
            assert (await st(node, cid))["image"] == image
        async with await Client.connect(node.addr) as c:
            for image in ["missing", "empty", "x" * 64, "noconfig", ".hidden", "nosuchimage"]:
                with pytest.raises(P9Error):
                    await c.write_file("cluster/ctl", f"run {image}".encode())
        # the file follows the images directory, without a restart
        (node.images / "late").mkdir()
        (node.images / "late" / "config").write_text("sleep 1\n")
        assert "late" in (await read(node.addr, "cluster/self/images")).splitlines()
        shutil.rmtree(node.images / "web")
        assert "web" not in (await read(node.addr, "cluster/self/images")).splitlines()
    run(main())


# ------------------------------------------------------------ self/containers
def blocks(listing: str) -> list[str]:
    """self/containers cut into one status text per container (each block ends in a blank line)."""
    assert listing == "" or listing.endswith("\n\n"), listing[-200:]
    return [b + "\n" for b in listing[:-2].split("\n\n")] if listing else []


def test_containers_is_every_status_in_one_read(node: NodeProc) -> None:
    async def main() -> None:
        assert await read(node.addr, "cluster/self/containers") == ""
        ids = [(await ctl(node.addr, "cluster/ctl", "run quick 3")).strip() for _ in range(9)]
        ids.append((await ctl(node.addr, "cluster/ctl", "run hello label=owner=sched 'env=A=x y'")).strip())
        ids.append((await ctl(node.addr, "cluster/ctl", "run stubborn")).strip())  # id 11: "11" sorts after "9"
        await ctl(node.addr, "cluster/ctl", f"kill {ids[-1]}")

        async def quick_ended() -> bool:
            return [(await st(node, cid))["state"] for cid in ids[:9]] == ["failed"] * 9
        await eventually(quick_ended, 10)

        async with await Client.connect(node.addr) as c:
            listing = (await c.read_file("cluster/self/containers")).decode()
            one_by_one = [(await c.read_file(f"cluster/containers/{cid}/status")).decode() for cid in ids]
        assert blocks(listing) == one_by_one
        assert [status(b)["id"] for b in blocks(listing)] == [str(i) for i in range(1, 12)]
        assert status(blocks(listing)[9])["label.owner"] == "sched"

        await ctl(node.addr, "cluster/ctl", f"destroy {ids[0]}")
        assert [status(b)["id"] for b in blocks(await read(node.addr, "cluster/self/containers"))] == ids[1:]
    run(main())


def test_containers_stays_whole_while_containers_start(node: NodeProc) -> None:
    """Each read is one snapshot: every block a whole status, whatever starts meanwhile."""
    async def main() -> None:
        async def runs() -> None:
            async with await Client.connect(node.addr) as c:
                for i in range(20):
                    await c.write_file("cluster/ctl", f"run hello name=n{i} label=i={i}".encode())

        async def reads() -> int:
            seen = 0
            async with await Client.connect(node.addr) as c:
                while seen < 20:
                    bs = blocks((await c.read_file("cluster/self/containers")).decode())
                    for b in bs:
                        s = status(b)
                        assert s["state"] in ("created", "running") and s["name"] == f"n{int(s['id']) - 1}"
                        assert s["label.i"] == str(int(s["id"]) - 1)
                    seen = len(bs)
            return seen

        _, seen = await asyncio.gather(runs(), reads())
        assert seen == 20
    run(main())


# ------------------------------------------------------------ names
def test_names_may_repeat_and_hide_nothing(node: NodeProc) -> None:
    """Ids, not names, identify containers: two may share a name (given, or given and default)."""
    async def main() -> None:
        one = (await ctl(node.addr, "cluster/ctl", "run hello name=web")).strip()
        two = (await ctl(node.addr, "cluster/ctl", "run hello name=web")).strip()
        three = (await ctl(node.addr, "cluster/ctl", "run hello name=hello-4")).strip()
        four = (await ctl(node.addr, "cluster/ctl", "run hello")).strip()  # default name hello-4
        assert (one, two, three, four) == ("1", "2", "3", "4")
        names = {cid: (await st(node, cid))["name"] for cid in (one, two, three, four)}
        assert names == {"1": "web", "2": "web", "3": "hello-4", "4": "hello-4"}
        listing = await read(node.addr, f"cluster/nodes/{node.id}/containers")
        assert listing.splitlines()[0] == "count 4"
        assert [status(b)["id"] for b in blocks(await read(node.addr, "cluster/self/containers"))] == list(names)
        await ctl(node.addr, "cluster/ctl", f"stop {one}")
        assert ((await st(node, one))["state"], (await st(node, two))["state"]) == ("stopped", "running")
    run(main())
