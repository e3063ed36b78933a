"""A real fornax-node serving AgentService, and a real grpc client of it, for the persys tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from fornax_sched.persys import protos
from tests.helpers import free_port
from tests.node.cluster import NodeProc

A = protos.agent()


def agent_node(tmp: Path, name: str = "agent-01", extra: list[str] | None = None) -> tuple[NodeProc, str]:
    """A fornax-node with --persys on a free loopback port (reconcile every 0.3 s); its AgentService address."""
    addr = f"127.0.0.1:{free_port()}"
    node = NodeProc(name, free_port(), free_port(socket.SOCK_DGRAM), tmp / name,
                    extra=["--persys", addr, "--persys-reconcile", "0.3", *(extra or [])])
    return node.start(), addr


@contextlib.asynccontextmanager
async def agent_stub(addr: str, credentials: grpc.ChannelCredentials | None = None) -> AsyncIterator[Any]:
    ch = grpc.aio.secure_channel(addr, credentials) if credentials else grpc.aio.insecure_channel(addr)
    async with ch:
        yield protos.Stub(ch, A.service("AgentService"))


def container_req(wid: str, revision: str = "r1", image: str = "hello", *, running: bool = True,
                  args: tuple[str, ...] = (), **container: Any) -> Any:
    return A.ApplyWorkloadRequest(
        id=wid, type=A.WORKLOAD_TYPE_CONTAINER, revision_id=revision,
        desired_state=A.DESIRED_STATE_RUNNING if running else A.DESIRED_STATE_STOPPED,
        spec=A.WorkloadSpec(container=A.ContainerSpec(image=image, args=list(args), **container)))


async def status(stub: Any, wid: str) -> Any:
    return (await stub.GetWorkloadStatus(A.GetWorkloadStatusRequest(id=wid), timeout=5)).status


def state_name(st: Any) -> str:
    return str(A.ActualState.Name(st.actual_state)).removeprefix("ACTUAL_STATE_")
