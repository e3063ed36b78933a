"""A small real AgentControl server (grpc.aio on loopback) answering registration and heartbeats
as the control contract's behaviour section says Persys' scheduler does; the tests' scheduler side."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from fornax_sched.persys import protos
from fornax_sched.persys.node import split_hostport

C = protos.control()


@dataclass
class ControlServer:
    port: int
    interval: int = 1  # heartbeat_interval_seconds answered (theirs is 60)
    drain: bool = False
    credentials: grpc.ServerCredentials | None = None
    nodes: dict[str, Any] = field(default_factory=dict)  # node_id -> last RegisterNodeRequest
    registrations: list[Any] = field(default_factory=list)
    heartbeats: list[Any] = field(default_factory=list)
    server: grpc.aio.Server | None = None

    async def start(self) -> ControlServer:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((protos.handler(C.service("AgentControl"), self),))
        addr = f"127.0.0.1:{self.port}"
        if self.credentials is not None:
            self.server.add_secure_port(addr, self.credentials)
        else:
            self.server.add_insecure_port(addr)
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    async def RegisterNode(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if not request.node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_id is required")
        try:
            split_hostport(request.grpc_endpoint)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"grpc_endpoint: {e}")
        self.nodes[request.node_id] = request
        self.registrations.append(request)
        lease = C.RegisterNodeResponse().lease_expires_at
        lease.FromSeconds(int(time.time()) + 3 * self.interval)
        return C.RegisterNodeResponse(accepted=True, reason="registered", heartbeat_interval_seconds=self.interval,
                                      lease_expires_at=lease)

    async def Heartbeat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if not request.node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_id is required")
        if request.node_id not in self.nodes:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {request.node_id!r} not registered")
        self.heartbeats.append(request)
        resp = C.HeartbeatResponse(acknowledged=True, drain_node=self.drain)
        resp.lease_expires_at.FromSeconds(int(time.time()) + 180)
        return resp
