"""The Fornax node backend against real fornax-node daemons."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fornax_sched.sched.backends import FornaxNode, NodeRefused, NodeUnreachable

from ..node.cluster import NodeProc, alive, eventually, three_nodes


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeProc]]:
    ns = three_nodes(tmp_path)
    yield ns
    for n in ns:
        n.stop()


def test_run_status_stop_destroy(nodes: list[NodeProc]) -> None:
    async def main() -> None:
        b = FornaxNode(nodes[0].addr)
        info = await b.info()
        assert (info.name, info.id, info.addr) == ("fornax-01", nodes[0].id, nodes[0].addr)
        assert info.cpus > 0 and 0 < info.mem_free <= info.mem
        cid = await b.run("hello", ("a=b", "two words"), 0.5, 64 << 20, "web-1")
        st = await b.status(cid)
        assert st is not None and (st.name, st.image, st.state) == ("web-1", "hello", "running")

        async def logged() -> bool:
            return "args: a=b two words" in (await b._read(f"cluster/containers/{cid}/log"))
        await eventually(logged, 5)  # arguments that look like options reach the command intact
        assert [c.name for c in await b.containers()] == ["web-1"]
        await b.stop(cid)
        st = await b.status(cid)
        assert st is not None and st.state == "stopped"
        await b.destroy(cid)
        assert await b.status(cid) is None
        with pytest.raises(NodeRefused, match="node fornax-01: .*unknown image 'nope'"):
            await b.run("nope", (), 0, 0, "x-1")
        await b.close()
    run(main())


def test_peers_and_an_unreachable_node(nodes: list[NodeProc]) -> None:
    async def main() -> None:
        b = FornaxNode(nodes[1].addr)

        async def all_seen() -> bool:
            return sorted(p.name for p in await b.peers()) == ["fornax-01", "fornax-02", "fornax-03"]
        await eventually(all_seen, 10)
        addrs = {p.name: p.addr for p in await b.peers()}
        assert addrs["fornax-03"] == nodes[2].addr
        cid = await b.run("hello", (), 0, 0, "h-1")
        pid = int((await b._read(f"cluster/containers/{cid}/status")).split("pid ")[1].split()[0])
        nodes[1].kill9()
        with pytest.raises(NodeUnreachable, match="node fornax-02 at tcp!127.0.0.1"):
            await b.info()
        nodes[1].start()  # the backend reconnects by itself
        st = await b.status(cid)
        assert st is not None and st.state == "running" and alive(pid)
        await b.close()
    run(main())
