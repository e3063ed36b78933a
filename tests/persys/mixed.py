"""A mixed cluster for the bridge tests: two Fornax nodes over 9P, one fornax-node reached only through
``--agent`` (agent-01) and one that registers through the scheduler's AgentControl (agent-02)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fornax_sched.persys import protos

from ..helpers import free_port
from ..node.cluster import NodeProc, eventually, read
from ..sched.harness import SchedProc, ls
from .agentproc import agent_node

C = protos.control()
# A heartbeat a second, so a lease is 3 s; status looked at every 0.2 s at most; drift every second.
BRIDGE = ["--heartbeat-interval", "1", "--persys-poll", "0.2", "--missing-grace", "1", "--drift-interval", "1"]


@dataclass
class Mixed:
    sched: SchedProc
    fornax: list[NodeProc]
    agents: list[NodeProc]
    endpoints: dict[str, str]  # agent name -> its AgentService address
    control: str  # the scheduler's AgentControl address
    extra: list[str] = field(default_factory=list)  # nodes a test added

    def node(self, name: str) -> NodeProc:
        return next(n for n in self.fornax + self.agents if n.name == name)


@contextmanager
def mixed_cluster(tmp: Path, extra: list[str] | None = None, agent_extra: list[str] | None = None,
                  ) -> Iterator[Mixed]:
    gossip = [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    started: list[NodeProc] = []
    sched = None
    try:
        fornax = [NodeProc(f"fornax-0{i + 1}", free_port(), gossip[i], tmp / f"fornax-0{i + 1}",
                           peers=[gossip[1 - i]]).start() for i in range(2)]
        started += fornax
        control = f"127.0.0.1:{free_port()}"
        a1, e1 = agent_node(tmp, "agent-01", agent_extra)
        started.append(a1)
        a2, e2 = agent_node(tmp, "agent-02", ["--persys-scheduler", control, *(agent_extra or [])])
        started.append(a2)
        sched = SchedProc(tmp / "sched", [n.addr for n in fornax],
                          extra=["--control", control, "--agent", f"{e1},name=agent-01,cpus=2,mem=2G",
                                 *BRIDGE, *(extra or [])])
        # (the harness's --control off comes first: the later --control wins)
        sched.start()
        yield Mixed(sched, fornax, [a1, a2], {"agent-01": e1, "agent-02": e2}, control)
    finally:
        if sched is not None and sched.proc is not None:
            sched.stop()
        for n in started:
            n.stop()


async def all_online(m: Mixed) -> dict[str, str]:
    """Node name -> kind, once all four are online."""
    async def check() -> dict[str, str] | None:
        names = sorted(e.name for e in await ls(m.sched.addr, "cluster/nodes"))
        if len(names) != 4:
            return None
        for n in names:
            if (await read(m.sched.addr, f"cluster/nodes/{n}/status")).strip() != "online":
                return None
        return {n: (await read(m.sched.addr, f"cluster/nodes/{n}/kind")).strip() for n in names}

    return await eventually(check, timeout=20)


def control_stub(channel: grpc.aio.Channel) -> Any:
    return protos.Stub(channel, C.service("AgentControl"))
