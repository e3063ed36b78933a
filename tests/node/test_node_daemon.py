"""Three real fornax-node daemons on loopback, driven through their /cluster trees."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error

from ..helpers import run
from .cluster import IMAGES, NodeProc, alive, ctl, eventually, read, status, three_nodes


def images_with_hog(tmp: Path) -> Path:
    """The shipped example images plus 'hog', which allocates far past any small limit."""
    images = tmp / "images"
    shutil.copytree(IMAGES, images)
    (images / "hog").mkdir()
    (images / "hog" / "config").write_text(
        "python3 -c \"import time; x = bytearray(256 << 20); x[::4096] = b'x' * len(x[::4096]); time.sleep(30)\"\n")
    return images


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NodeProc]]:
    nodes = three_nodes(tmp_path, images_with_hog(tmp_path))
    yield nodes
    for n in nodes:
        n.stop()


async def names_seen(node: NodeProc) -> dict[str, str]:
    """name -> status of every node in node's /cluster/nodes."""
    async with await Client.connect(node.addr, timeout=5) as c:
        out = {}
        for e in await c.ls("cluster/nodes"):
            name = (await c.read_file(f"cluster/nodes/{e.name}/name")).decode().strip()
            out[name] = (await c.read_file(f"cluster/nodes/{e.name}/status")).decode().strip()
        return out


def test_three_nodes_discover_each_other(cluster: list[NodeProc]) -> None:
    async def main() -> None:
        want = {"fornax-01": "online", "fornax-02": "online", "fornax-03": "online"}
        for n in cluster:
            async def check(n: NodeProc = n) -> bool:
                return await names_seen(n) == want
            await eventually(check, 10)
        assert (await read(cluster[0].addr, "cluster/self/name")).strip() == "fornax-01"
        assert (await read(cluster[0].addr, "cluster/self/id")).strip() == cluster[0].id
        res = status(await read(cluster[0].addr, "cluster/self/resources"))
        assert {"cpus", "mem", "mem_free", "containers", "load"} <= set(res)
        peer = status(await read(cluster[1].addr, f"cluster/nodes/{cluster[0].id}/resources"))
        assert peer["cpus"] == res["cpus"] and peer["mem"] == res["mem"]
    run(main())


def test_run_status_log_stop_through_the_tree(cluster: list[NodeProc]) -> None:
    async def main() -> None:
        n = cluster[1]
        cid = (await ctl(n.addr, "cluster/ctl", "run hello mem=64M")).strip()
        assert cid.isdigit()
        st = status(await read(n.addr, f"cluster/containers/{cid}/status"))
        assert st["state"] == "running" and st["image"] == "hello" and int(st["pid"]) > 0
        pid = int(st["pid"])
        assert alive(pid)

        async def logged() -> bool:
            return f"hello from fornax container {cid}" in await read(n.addr, f"cluster/containers/{cid}/log")
        await eventually(logged, 5)
        assert f"{cid} hello running" in await read(n.addr, f"cluster/nodes/{n.id}/containers")
        await ctl(n.addr, f"cluster/containers/{cid}/ctl", "stop")
        st = status(await read(n.addr, f"cluster/containers/{cid}/status"))
        assert st["state"] == "stopped" and not alive(pid)
        await ctl(n.addr, "cluster/ctl", f"destroy {cid}")
        with pytest.raises(P9Error):
            await read(n.addr, f"cluster/containers/{cid}/status")
    run(main())


def test_bad_commands_are_clear_errors_and_change_nothing(cluster: list[NodeProc]) -> None:
    async def main() -> None:
        n = cluster[0]
        async with await Client.connect(n.addr, version="9P2000") as c:
            for cmd, text in [("run nope", "unknown image 'nope'"), ("run hello mem=lots", "lots"),
                              ("stop 999", "unknown container 999"), ("dance", "unknown command 'dance'")]:
                with pytest.raises(P9Error, match=text):
                    await c.write_file("cluster/ctl", cmd.encode())
            assert await c.ls("cluster/containers") == []
    run(main())


def test_concurrent_runs_each_learn_their_own_id(cluster: list[NodeProc]) -> None:
    async def main() -> None:
        n = cluster[2]
        async with await Client.connect(n.addr) as c:
            ids = await asyncio.gather(*[c.write_file("cluster/ctl", f"run hello name=h{i}".encode(),
                                                      read_reply=True) for i in range(8)])
            ids = [i.decode().strip() for i in ids]
            assert len(set(ids)) == 8
            for i, cid in enumerate(ids):
                st = status((await c.read_file(f"cluster/containers/{cid}/status")).decode())
                assert st["name"] == f"h{i}"
    run(main())


def test_kill9_daemon_peers_see_suspect_then_dead_and_restart_adopts(cluster: list[NodeProc]) -> None:
    async def main() -> None:
        a, b, _ = cluster
        await eventually(lambda: _sees_all(a), 10)
        cid = (await ctl(b.addr, "cluster/ctl", "run hello")).strip()
        pid = int(status(await read(b.addr, f"cluster/containers/{cid}/status"))["pid"])
        b.kill9()
        assert alive(pid)  # containers outlive a crashed daemon

        async def st() -> str:
            return (await read(a.addr, f"cluster/nodes/{b.id}/status")).strip()
        await eventually(lambda: _is(st, "suspect"), 5, 0.05)
        await eventually(lambda: _is(st, "dead"), 5, 0.05)
        b.start()
        await eventually(lambda: _is(st, "online"), 5)
        s = status(await read(b.addr, f"cluster/containers/{cid}/status"))
        assert s["state"] == "running" and int(s["pid"]) == pid  # adopted, not restarted
        await ctl(b.addr, f"cluster/containers/{cid}/ctl", "stop")
        assert not alive(pid)
    run(main())


async def _sees_all(n: NodeProc) -> bool:
    return set((await names_seen(n)).values()) == {"online"} and len(await names_seen(n)) == 3


async def _is(get: Any, want: str) -> bool:
    return bool(await get() == want)


def test_clean_shutdown_leaves_no_process(tmp_path: Path) -> None:
    async def main() -> None:
        nodes = three_nodes(tmp_path)
        try:
            pids = []
            for n in nodes:
                cid = (await ctl(n.addr, "cluster/ctl", "run hello")).strip()
                pids.append(int(status(await read(n.addr, f"cluster/containers/{cid}/status"))["pid"]))
        finally:
            codes = [n.stop() for n in nodes]
        assert codes == [0, 0, 0]
        assert [p for p in pids if alive(p)] == []
    run(main())


def test_container_over_its_memory_limit_is_stopped_and_reported(cluster: list[NodeProc]) -> None:
    async def main() -> None:
        n = cluster[0]
        cid = (await ctl(n.addr, "cluster/ctl", "run hog mem=32M")).strip()

        async def failed() -> dict[str, str] | None:
            s = status(await read(n.addr, f"cluster/containers/{cid}/status"))
            return s if s["state"] == "failed" else None
        s = await eventually(failed, 15)
        assert "memory" in s.get("reason", ""), s
    run(main())
