"""An agent's side of persys.control.v1.AgentControl: RegisterNode, then a Heartbeat every interval.

As a Persys agent does: register with the node's capabilities and the
address the scheduler dials (``grpc_endpoint``, required), then heartbeat
every ``heartbeat_interval_seconds`` the scheduler answered (60 when it
answers 0) with the node's usage and every workload's status.  A heartbeat
answered NOT_FOUND (the scheduler forgot the node: it restarted, say)
registers again at once.  Any other failure, and a registration not
accepted, wait ``backoff(n)``: exponential from 1 s with jitter, never more
than 30 s, reset by the first success.  The last heartbeat's ``drain_node``
sets the agent's ``draining`` (it then refuses applies).  Every call has a
timeout (10 s); clocks, randomness and sleeping are passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

from ..node.runtime import Runtime
from . import convert, protos
from .agent import VERSION, Agent

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60  # seconds, when the scheduler answers 0
RPC_TIMEOUT = 10.0
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0
CHANNEL_OPTIONS = [  # our loop paces the retries; grpc's own reconnect backoff must not add minutes to them
    ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class Facts(Protocol):
    """What registration tells of the node (the node daemon has all of it)."""

    name: str
    labels: dict[str, str]
    cpus: int
    mem: int  # bytes offered
    runtime: Runtime

    def mem_free(self) -> int: ...


def backoff(attempt: int, rand: Callable[[], float], base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait after the ``attempt``-th failure in a row (0 first).

    base * 2^n, capped; the upper half of that is jittered, so retries spread
    out and a wait is never more than ``cap``.
    """
    step = min(cap, base * 2.0 ** min(attempt, 32))
    return step / 2 + rand() * step / 2


class Refused(Exception):
    """The scheduler answered, but did not accept the registration."""


class Registrar:
    def __init__(self, agent: Agent, facts: Facts, scheduler: str, endpoint: str, *,
                 credentials: grpc.ChannelCredentials | None = None, state: str = ".",
                 clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, timeout: float = RPC_TIMEOUT,
                 base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> None:
        if not endpoint:
            raise ValueError("persys: grpc_endpoint is required to register")
        self.agent, self.facts, self.scheduler, self.endpoint = agent, facts, scheduler, endpoint
        self.credentials, self.state = credentials, state
        self.clock, self.rand, self.sleep, self.timeout = clock, rand, sleep, timeout
        self.base, self.cap = base, cap
        self.registered = False
        self.interval = DEFAULT_INTERVAL
        self.failures = 0  # in a row
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        if self.credentials is not None:
            self._channel = grpc.aio.secure_channel(self.scheduler, self.credentials, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(self.scheduler, options=CHANNEL_OPTIONS)
        self._task = asyncio.ensure_future(self._run(protos.Stub(self._channel, protos.control().service(
            "AgentControl"))))

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close()

    async def _run(self, stub: Any) -> None:
        while True:
            try:
                if not self.registered:
                    await self._register(stub)
                else:
                    await self._heartbeat(stub)
                self.failures = 0
                await self.sleep(self.interval)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND and self.registered:
                    log.warning("persys: scheduler %s does not know this node (%s): registering again",
                                self.scheduler, e.details())
                    self.registered = False
                    continue
                await self._back_off(f"{e.code().name}: {e.details()}")
            except Refused as e:
                await self._back_off(f"registration not accepted: {e}")
            except Exception as e:  # a bug: logged, and registration goes on
                log.exception("persys: registration with %s", self.scheduler)
                await self._back_off(f"{type(e).__name__}: {e}")

    async def _back_off(self, why: str) -> None:
        delay = backoff(self.failures, self.rand, self.base, self.cap)
        (log.warning if self.failures == 0 else log.info)(
            "persys: scheduler %s: %s; again in %.1fs", self.scheduler, why, delay)
        self.failures += 1
        await self.sleep(delay)

    async def _register(self, stub: Any) -> None:
        r = await stub.RegisterNode(self.register_request(), timeout=self.timeout)
        if not r.accepted:
            raise Refused(r.reason or "no reason given")
        self.registered = True
        self.interval = r.heartbeat_interval_seconds if r.heartbeat_interval_seconds > 0 else DEFAULT_INTERVAL
        log.info("persys: registered with %s as %s (%s); heartbeat every %ds", self.scheduler, self.facts.name,
                 r.reason, self.interval)

    async def _heartbeat(self, stub: Any) -> None:
        r = await stub.Heartbeat(self.heartbeat_request(), timeout=self.timeout)
        if r.drain_node != self.agent.draining:
            log.warning("persys: scheduler %s says %s", self.scheduler,
                        "drain: applies are refused" if r.drain_node else "stop draining: applies are taken again")
        self.agent.draining = r.drain_node

    # ------------------------------------------------------------ messages
    def register_request(self) -> Any:
        C = protos.control()
        f = self.facts
        caps = C.NodeCapabilities(cpu_total_millicores=int(f.cpus * 1000), memory_total_mb=f.mem >> 20,
                                  supported_workload_types=["container"])
        total, _ = _disk(self.state)
        caps.storage_pools.add(name="state", type="dir", total_gb=total >> 30)
        return C.RegisterNodeRequest(node_id=f.name, capabilities=caps, labels=dict(f.labels),
                                     agent_version=VERSION, grpc_endpoint=self.endpoint,
                                     timestamp=convert.timestamp(self.clock()))

    def heartbeat_request(self) -> Any:
        C = protos.control()
        f = self.facts
        running = [c for c in f.runtime.list() if c.state == "running"]
        _, used = _disk(self.state)
        usage = C.NodeUsage(
            cpu_allocated_millicores=int(sum(c.limits.cpus or 0 for c in running) * 1000),
            cpu_used_millicores=int(self.agent.cpu_utilization() / 100 * f.cpus * 1000),
            memory_allocated_mb=sum(c.limits.mem or 0 for c in running) >> 20,
            memory_used_mb=max(f.mem - f.mem_free(), 0) >> 20, disk_used_gb=used >> 30)
        statuses = [self.agent.status_of(w) for w in self.agent.workloads()]
        return C.HeartbeatRequest(
            node_id=f.name, usage=usage, timestamp=convert.timestamp(self.clock()),
            workload_statuses=[convert.control_status(st) for st in statuses],
            workload_usage=[convert.control_usage(st.usage) for st in statuses if st.HasField("usage")])


def _disk(path: str) -> tuple[int, int]:
    """(total, used) bytes of the file system holding path."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0, 0
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize
