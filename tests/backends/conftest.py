"""The backend kinds the conformance suite runs over, each with a way to make its node fail.

``fornax``: a real fornax-node daemon over 9P (unreachable: kill -9; hung:
SIGSTOP).  ``sim``: a simulated node in this process.  ``persys``: a real
fornax-node serving AgentService, driven over gRPC (the same failures).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fornax_sched.sched.backends import Backend, SimCluster, SimNode

from ..node.cluster import NodeProc, three_nodes

TIMEOUT = 1.0  # the backends' call timeout in these tests


@dataclass
class Kind:
    name: str
    backend: Backend
    node_name: str
    peers: list[str]
    handle: Any  # NodeProc, or the SimState

    def go_down(self) -> None:
        if isinstance(self.handle, NodeProc):
            self.handle.kill9()
        else:
            self.handle.down = True

    def come_back(self) -> None:
        if isinstance(self.handle, NodeProc):
            self.handle.start()
        else:
            self.handle.down = False

    def hang(self) -> None:
        if isinstance(self.handle, NodeProc):
            assert self.handle.proc is not None
            self.handle.proc.send_signal(signal.SIGSTOP)
        else:
            self.handle.hung = True

    def unhang(self) -> None:
        if isinstance(self.handle, NodeProc):
            assert self.handle.proc is not None
            self.handle.proc.send_signal(signal.SIGCONT)
        else:
            self.handle.hung = False


@pytest.fixture(params=["fornax", "sim", "persys"])
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kind]:
    if request.param == "fornax":
        nodes = three_nodes(tmp_path)
        from fornax_sched.sched.backends import FornaxNode

        try:
            yield Kind("fornax", FornaxNode(nodes[0].addr, timeout=TIMEOUT), "fornax-01",
                       ["fornax-01", "fornax-02", "fornax-03"], nodes[0])
        finally:
            for n in nodes:
                if n.proc is not None and n.proc.poll() is None:
                    n.proc.send_signal(signal.SIGCONT)
                n.stop()
    elif request.param == "persys":
        from fornax_sched.sched.backends import PersysAgent
        from fornax_sched.sched.backends.persys import Options

        from ..persys.agentproc import agent_node

        node, endpoint = agent_node(tmp_path, "agent-01")
        opts = Options(rpc_timeout=TIMEOUT, apply_timeout=10, delete_timeout=10, poll=0.2)
        try:
            yield Kind("persys", PersysAgent(f"persys!{endpoint}!name=agent-01,cpus=2,mem=2G", options=opts),
                       "agent-01", [], node)
        finally:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
            node.stop()
    else:
        sims = SimCluster()
        st = sims.add("sim-01")
        sims.add("sim-02")
        yield Kind("sim", SimNode("sim!sim-01", timeout=TIMEOUT, cluster=sims), "sim-01", ["sim-01", "sim-02"], st)
