"""The backend conformance suite: what every kind of node does for the scheduler, the same way."""

from __future__ import annotations

import asyncio
import time

import pytest

from fornax_sched.sched.backends import (
    CLUSTER_LABEL,
    Discovery,
    NodeRefused,
    NodeUnreachable,
    NoSuchContainer,
    Spec,
)

from ..helpers import eventually, run
from .conftest import TIMEOUT, Kind


def test_what_a_node_says_of_itself(kind: Kind) -> None:
    async def go() -> None:
        b = kind.backend
        info = await b.info()
        assert info.name == kind.node_name and info.id and info.cpus > 0 and 0 < info.mem_free <= info.mem
        assert b.name == kind.node_name
        h = await b.health()
        assert h.ok and h.mem_free is not None
        if kind.name == "persys":  # AgentService tells neither its images nor other nodes
            assert info.images is None and not isinstance(b, Discovery) and info.kind == "persys"
            await b.close()
            return
        assert info.images is not None and {"hello", "web"} <= set(info.images)
        assert isinstance(b, Discovery)

        async def all_seen() -> bool:
            return sorted(p.name for p in await b.peers()) == kind.peers  # type: ignore[attr-defined]

        await eventually(all_seen, 10)
        await b.close()

    run(go())


def test_run_list_status_stop_destroy(kind: Kind) -> None:
    async def go() -> None:
        b = kind.backend
        spec = Spec("web-1", "hello", ("a=b", "two words"), 0.5, 64 << 20, labels=((CLUSTER_LABEL, "c0ffee"),),
                    env=(("GREETING", "hi there"),)).with_revision()
        assert spec.revision and dict(spec.labels)["fornax.sched/revision"] == spec.revision
        cid = await b.run(spec)
        st = await b.status(cid)
        assert (st.id, st.name, st.image, st.state) == (cid, "web-1", "hello", "running") and st.alive
        assert st.labels[CLUSTER_LABEL] == "c0ffee" and st.labels["fornax.sched/revision"] == spec.revision
        listed = {c.id: c for c in await b.list()}
        assert listed[cid].name == "web-1" and listed[cid].labels == st.labels
        if kind.name == "fornax":  # the arguments reach the command intact
            async def logged() -> bool:
                return "args: a=b two words" in (await b._read(f"cluster/containers/{cid}/log"))  # type: ignore

            await eventually(logged, 5)
        elif kind.name == "persys":  # the same, read over 9P from the agent's node
            from ..node.cluster import read
            from ..persys.agentproc import agent_stub, status

            async with agent_stub(b.endpoint) as stub:  # type: ignore[attr-defined]
                node_cid = (await status(stub, cid)).metadata["container_id"]

            async def logged_there() -> bool:
                return "args: a=b two words" in await read(kind.handle.addr, f"cluster/containers/{node_cid}/log")

            await eventually(logged_there, 5)
        else:
            assert kind.handle.specs[cid].args == ("a=b", "two words")
        await b.stop(cid)
        st = await b.status(cid)
        assert st.state == "stopped" and not st.alive and "by request" in st.reason
        await b.destroy(cid)
        with pytest.raises(NoSuchContainer):
            await b.status(cid)
        assert cid not in {c.id for c in await b.list()}
        await b.close()

    run(go())


def test_refusals_are_told_apart(kind: Kind) -> None:
    async def go() -> None:
        b = kind.backend
        with pytest.raises(NodeRefused, match="unknown image 'nope'") as e:
            await b.run(Spec("x-1", "nope"))
        assert not isinstance(e.value, NoSuchContainer)
        for op in (b.status, b.stop, b.destroy):
            with pytest.raises(NoSuchContainer):
                await op("424242")
        await b.close()

    run(go())


def test_an_unreachable_node_and_its_return(kind: Kind) -> None:
    async def go() -> None:
        b = kind.backend
        cid = await b.run(Spec("h-1", "hello"))
        kind.go_down()
        with pytest.raises(NodeUnreachable, match=kind.node_name):
            await b.info()
        kind.come_back()

        async def back() -> bool:
            return (await b.status(cid)).state == "running"  # reconnects by itself; the container lived on

        await eventually(back, 15)
        await b.close()

    run(go())


def test_a_hung_node_is_an_error_within_the_timeout(kind: Kind) -> None:
    """A node that takes the connection and never answers (SIGSTOP) must not hold a call for ever."""
    async def go() -> None:
        b = kind.backend
        await b.info()
        kind.hang()
        try:
            for op in (b.info, b.list):
                t = time.monotonic()
                with pytest.raises(NodeUnreachable):
                    await asyncio.wait_for(op(), 10 * TIMEOUT)  # the bound under test is the backend's own
                assert time.monotonic() - t <= 3 * TIMEOUT + 0.5
        finally:
            kind.unhang()

        async def back() -> bool:
            return (await b.info()).name == kind.node_name

        await eventually(back, 15)
        await b.close()

    run(go())
