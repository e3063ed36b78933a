"""A Persys compute agent, driven over gRPC (``persys.agent.v1.AgentService``), as a Backend.

Address: ``persys!HOST:PORT`` or ``persys!HOST:PORT!name=NAME,cpus=N,mem=SIZE,label.KEY=VALUE``.
AgentService says nothing of the node's name or capacity, so they come
with the address: given by ``--agent`` or learnt at registration
(AgentControl's ``node_id`` and capabilities); undeclared, the name is
``agent-HOST-PORT`` and the capacity 1 CPU and 1G.

The mapping, as Persys' own scheduler drives its agents:

- ``run(spec)``: ApplyWorkload with the placement's name as the workload id
  and ``spec.revision`` (Spec.with_revision: a hash of the spec) as
  ``revision_id``, then GetWorkloadStatus until the task is done: the first
  look after 5 ms, each wait half as long again, up to ``poll`` (1 s), so an
  agent that converges at once is seen at once.  The container id is the
  workload id.  A reply ``applied=false`` (a spec the agent cannot run) is
  NodeRefused at once, never retried, except one refused because the agent
  drains (it learns from its next heartbeat that it is cordoned, or no
  longer): that is NodeUnreachable, so the placement stays starting and the
  node's next look tries again; a transient failure (UNAVAILABLE,
  DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, a full task queue) is
  retried with the same id and revision, with exponential backoff and
  jitter, at most ``attempts`` times; past that UNAVAILABLE and
  DEADLINE_EXCEEDED are NodeUnreachable.  A workload that fails, or does not
  converge within ``apply_timeout`` (45 s), is NodeRefused with the agent's
  recent actions (ListActions) in the message.
- ``stop(cid)``: the same apply with desired state STOPPED (same revision:
  the agent stops only), polled until it is stopped.
- ``destroy(cid)``: DeleteWorkload, then GetWorkloadStatus until "not
  found" (``delete_timeout``, 60 s).
- ``status``/``list``: GetWorkloadStatus / ListWorkloads; "not found" is
  NoSuchContainer.  A workload the agent reports missing (its container is
  gone, the agent's reconcile runs it again) is shown as still starting for
  ``grace`` seconds (the agent's reconcile window), and only then as gone,
  so the scheduler re-places it only if the agent did not.
- ``info``/``health``: HealthCheck (its memory utilization gives the free
  memory); UNAVAILABLE and DEADLINE_EXCEEDED are NodeUnreachable, which the
  scheduler's liveness counts.

Every call is bounded by ``rpc_timeout`` (10 s; the scheduler passes its
node timeout).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc

from ...units import SizeError, parse_size
from .base import ContainerInfo, Health, NodeInfo, NodeRefused, NodeUnreachable, NoSuchContainer, Spec

T = TypeVar("T")

PREFIX = "persys!"
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
TRANSIENT = (*UNREACHABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED)
AGENT_LABELS = ("persys.agent/workload", "persys.agent/revision")  # the agent's own: never sent back
CHANNEL_OPTIONS = [  # a restarted agent is found again within a second, not after grpc's minutes of backoff
    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class Options:
    """How the scheduler drives agents (their scheduler's defaults)."""

    rpc_timeout: float = 10.0
    apply_timeout: float = 45.0
    delete_timeout: float = 60.0
    poll: float = 1.0  # the longest wait between two status looks
    first_poll: float = 0.005  # the first
    attempts: int = 4  # tries of one call that fails transiently
    backoff: float = 0.2  # the first retry's wait, doubled after each, jittered
    backoff_cap: float = 5.0
    grace: float = 15.0  # how long a workload missing on the agent is left to the agent's reconcile
    credentials: grpc.ChannelCredentials | None = None  # mTLS; None: plain
    observe: Callable[[str, str, str, float], None] | None = None  # told of every call (protos.RpcObserve)


@dataclass(frozen=True)
class Address:
    endpoint: str  # HOST:PORT
    name: str
    cpus: float
    mem: int
    labels: tuple[tuple[str, str], ...] = ()

    def text(self) -> str:
        return (f"{PREFIX}{self.endpoint}!name={self.name},cpus={self.cpus:g},mem={self.mem}"
                + "".join(f",label.{k}={v}" for k, v in self.labels))


def parse_address(addr: str) -> Address:
    """``persys!HOST:PORT[!name=N,cpus=C,mem=SIZE,label.KEY=VALUE...]``; ValueError naming the address and
    what is wrong."""
    from ...persys.node import split_hostport  # (lazy: fornax_sched.persys imports the backends)
    from ..lang import LABEL_KEY, NAME

    if not addr.startswith(PREFIX):
        raise ValueError(f"bad agent address {addr!r}: want persys!HOST:PORT")
    endpoint, _, opts = addr[len(PREFIX):].partition("!")
    try:
        host, port = split_hostport(endpoint)
    except ValueError as e:
        raise ValueError(f"bad agent address {addr!r}: {e}") from None
    name, cpus, mem = f"agent-{host}-{port}".replace(":", "."), 1.0, 1 << 30
    labels: list[tuple[str, str]] = []
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        try:
            if not eq:
                raise ValueError("want KEY=VALUE")
            if key == "name":
                if not NAME.match(value):
                    raise ValueError("a node name is letters, digits, '.', '_' and '-'")
                name = value
            elif key == "cpus":
                cpus = float(value)
                if not 0 < cpus <= 100_000:
                    raise ValueError("want more than 0 and at most 100000")
            elif key == "mem":
                mem = parse_size(value, "mem")
            elif key.startswith("label.") and LABEL_KEY.match(key[len("label."):]) and value:
                labels.append((key[len("label."):], value))
            else:
                raise ValueError("want name=, cpus=, mem= or label.KEY=")
        except (ValueError, SizeError) as e:
            raise ValueError(f"bad agent address {addr!r}: {item!r}: {e}") from None
    return Address(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", name, cpus, mem, tuple(labels))


class PersysAgent:
    """The Backend of a Persys agent at ``persys!HOST:PORT`` (see the module docstring)."""

    kind = "persys"

    def __init__(self, addr: str, *, timeout: float | None = None, options: Options | None = None,
                 rand: Callable[[], float] = random.random, monotonic: Callable[[], float] = time.monotonic) -> None:
        a = parse_address(addr)
        opts = options or Options()
        if timeout is not None:
            opts = replace(opts, rpc_timeout=timeout)
        self.addr, self.endpoint, self.name = addr, a.endpoint, a.name
        self.cpus, self.mem, self.labels = a.cpus, a.mem, dict(a.labels)
        self.opts = opts
        self.rand, self.monotonic = rand, monotonic
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._requests: dict[str, Any] = {}  # workload id -> the ApplyWorkloadRequest last sent (for stop)
        self._missing: dict[str, float] = {}  # workload id -> since when the agent reports it missing

    @property
    def longest(self) -> float:
        # An apply (retried until its deadline) and then the wait for its task; a delete has its own
        # deadline; a call begun just before a deadline may take its whole rpc timeout.
        o = self.opts
        return max(2 * o.apply_timeout, o.delete_timeout) + o.rpc_timeout

    def _where(self) -> str:
        return f"agent {self.name} at {self.endpoint}"

    def stub(self) -> Any:
        if self._stub is None:
            from ...persys import protos

            if self.opts.credentials is not None:
                self._channel = grpc.aio.secure_channel(self.endpoint, self.opts.credentials, options=CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.insecure_channel(self.endpoint, options=CHANNEL_OPTIONS)
            self._stub = protos.Stub(self._channel, protos.agent().service("AgentService"), self.opts.observe)
        return self._stub

    # ------------------------------------------------------------ calls
    async def _call(self, what: str, rpc: str, request: Any, timeout: float | None = None) -> Any:
        """One RPC, bounded; its failures as the backend errors."""
        try:
            return await getattr(self.stub(), rpc)(request, timeout=timeout or self.opts.rpc_timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(what, e) from None

    def _error(self, what: str, e: grpc.aio.AioRpcError) -> Exception:
        details = e.details() or e.code().name
        if e.code() in UNREACHABLE:
            return NodeUnreachable(f"{self._where()}: {what}: {e.code().name}: {details}")
        if "not found" in details:
            return NoSuchContainer(f"{self._where()}: {what}: {details}")
        return NodeRefused(f"{self._where()}: {what}: {e.code().name}: {details}")

    async def _retried(self, what: str, op: Callable[[], Awaitable[T]], deadline: float) -> T:
        """``op`` again after a transient failure, with backoff and jitter, at most ``attempts`` times
        and not past ``deadline`` (monotonic)."""
        n = 0
        while True:
            try:
                return await op()
            except _Transient as e:
                n += 1
                wait = min(self.opts.backoff_cap, self.opts.backoff * 2 ** (n - 1)) * (0.5 + self.rand() / 2)
                if n >= self.opts.attempts or self.monotonic() + wait >= deadline:
                    raise e.error from None
                await asyncio.sleep(wait)

    async def _transient(self, what: str, rpc: str, request: Any, timeout: float) -> Any:
        try:
            return await getattr(self.stub(), rpc)(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            err = self._error(what, e)
            if e.code() in TRANSIENT:
                raise _Transient(err) from None
            raise err from None

    async def _workload(self, wid: str, what: str) -> Any:
        A = _agent()
        return (await self._call(what, "GetWorkloadStatus", A.GetWorkloadStatusRequest(id=wid))).status

    # ------------------------------------------------------------ about the node
    async def info(self) -> NodeInfo:
        h = await self._health()
        return NodeInfo(self.name, self.name, self.addr, self.cpus, self.mem, self._free(h), dict(self.labels), None,
                        self.kind)

    async def _health(self) -> Any:
        return await self._call("health check", "HealthCheck", _agent().HealthCheckRequest())

    def _free(self, h: Any) -> int:
        util = min(max(float(h.memory_utilization), 0.0), 100.0)
        return max(int(self.mem * (1 - util / 100)), 1)

    async def health(self) -> Health:
        h = await self._health()
        bad = "; ".join(f"{k} {v}" for k, v in sorted(h.runtime_status.items()) if k == "container" and v != "healthy")
        return Health(bool(h.healthy), bad or ("" if h.healthy else "agent says unhealthy"), None, self._free(h))

    # ------------------------------------------------------------ containers
    async def run(self, spec: Spec) -> str:
        from ...persys import convert

        if not spec.revision:
            spec = spec.with_revision()
        req = convert.apply_request(spec, running=True)
        self._requests[spec.name] = req
        await self._apply(req, f"run {spec.name}")
        await self._converge(spec.name, spec.revision, running=True)
        return spec.name

    async def _apply(self, req: Any, what: str) -> Any:
        deadline = self.monotonic() + self.opts.apply_timeout

        async def once() -> Any:
            r = await self._transient(what, "ApplyWorkload", req, self._left(deadline))
            if not r.applied and "queue full" in r.message:
                raise _Transient(NodeUnreachable(f"{self._where()}: {what}: {r.message}"))
            return r

        r = await self._retried(what, once, deadline)
        if not r.applied and "draining" in r.message:
            # The agent learns that it is cordoned, or no longer, from its next heartbeat: a start
            # sent in between is refused for a state the scheduler has left.  Not the spec's fault:
            # the placement stays starting and the node's next look starts it again.
            raise NodeUnreachable(f"{self._where()}: {what}: {r.message} (until its next heartbeat)")
        if not r.applied:
            raise NodeRefused(f"{self._where()}: {what}: {r.message or 'not applied'}")
        return r

    def _left(self, deadline: float) -> float:
        return max(min(self.opts.rpc_timeout, deadline - self.monotonic()), 0.05)

    async def _converge(self, wid: str, revision: str, running: bool) -> Any:
        """Look at the workload until its task is done; its status then (NodeRefused if it failed)."""
        A = _agent()
        deadline = self.monotonic() + self.opts.apply_timeout
        wait = self.opts.first_poll
        st: Any = None
        while True:
            await asyncio.sleep(wait)
            try:
                st = await self._workload(wid, f"status of {wid}")
            except NoSuchContainer:
                st = None  # (an apply queued but not yet recorded)
            if st is not None and st.actual_state != A.ACTUAL_STATE_PENDING and st.revision_id == revision:
                if st.actual_state == A.ACTUAL_STATE_FAILED:
                    raise NodeRefused(f"{self._where()}: {wid} failed: {st.message}{await self._actions(wid)}")
                if st.actual_state in (A.ACTUAL_STATE_RUNNING, A.ACTUAL_STATE_STOPPED):
                    return st  # (stopped while meant to run: it ended on its own, which the listing tells)
            if self.monotonic() + wait >= deadline:
                state = A.ActualState.Name(st.actual_state) if st is not None else "not known"
                raise NodeRefused(f"{self._where()}: {wid} not {'running' if running else 'stopped'} after "
                                  f"{self.opts.apply_timeout:g}s (last {state}){await self._actions(wid)}")
            wait = min(wait * 1.5, self.opts.poll)

    async def _actions(self, wid: str) -> str:
        """The agent's last actions on a workload, for an error's text ('' if it cannot say)."""
        A = _agent()
        try:
            r = await self._call("list actions", "ListActions",
                                 A.ListActionsRequest(workload_id=wid, limit=3, newest_first=True))
        except (NodeRefused, NodeUnreachable):
            return ""
        acts = [f"{a.action_type} {a.status}" + (f": {a.error}" if a.error else "") for a in r.actions]
        return f" (agent's last actions: {'; '.join(acts)})" if acts else ""

    async def stop(self, cid: str) -> None:
        A = _agent()
        st = await self._workload(cid, f"stop {cid}")
        req = self._requests.get(cid) or _request_of_status(st)
        req = A.ApplyWorkloadRequest.FromString(req.SerializeToString())
        req.desired_state = A.DESIRED_STATE_STOPPED
        req.revision_id = st.revision_id or req.revision_id
        self._requests[cid] = req
        await self._apply(req, f"stop {cid}")
        await self._converge(cid, req.revision_id, running=False)

    async def destroy(self, cid: str) -> None:
        A = _agent()
        await self._workload(cid, f"destroy {cid}")  # NoSuchContainer if the agent does not know it
        deadline = self.monotonic() + self.opts.delete_timeout
        what = f"destroy {cid}"

        async def once() -> Any:
            return await self._transient(what, "DeleteWorkload", A.DeleteWorkloadRequest(id=cid), self._left(deadline))

        r = await self._retried(what, once, deadline)
        if not r.success:
            raise NodeRefused(f"{self._where()}: {what}: {r.message or 'not deleted'}")
        wait = self.opts.first_poll
        while True:
            await asyncio.sleep(wait)
            try:
                await self._workload(cid, what)
            except NoSuchContainer:
                self._requests.pop(cid, None)
                self._missing.pop(cid, None)
                return
            if self.monotonic() + wait >= deadline:
                raise NodeRefused(f"{self._where()}: {cid} still there {self.opts.delete_timeout:g}s after its "
                                  f"delete{await self._actions(cid)}")
            wait = min(wait * 1.5, self.opts.poll)

    async def status(self, cid: str) -> ContainerInfo:
        return self._info(await self._workload(cid, f"status of {cid}"))

    async def list(self) -> list[ContainerInfo]:
        A = _agent()
        r = await self._call("list workloads", "ListWorkloads", A.ListWorkloadsRequest())
        out = [self._info(st) for st in r.workloads]
        seen = {c.id for c in out}
        for wid in [w for w in self._missing if w not in seen]:
            del self._missing[wid]
        return [c for c in out if c.state != "gone"]

    def _info(self, st: Any) -> ContainerInfo:
        """A status as a ContainerInfo; a workload missing on the agent is "created" for ``grace`` seconds
        (the agent runs it again), then "gone" (list leaves it out: the scheduler places it again)."""
        from ...persys import convert

        c = convert.info_of_status(st)
        sent = self._requests.get(st.id)
        if not c.labels and sent is not None:  # (no container yet: a task queued) the labels it was sent with
            c.labels = dict(sent.spec.container.labels)
            c.image = c.image or sent.spec.container.image
        if c.state != "missing":
            self._missing.pop(st.id, None)
            return c
        since = self._missing.setdefault(st.id, self.monotonic())
        if self.monotonic() - since < self.opts.grace:
            c.state, c.reason = "created", f"missing on the agent since {self.monotonic() - since:.1f}s: " \
                                           f"its reconcile runs it again"
        else:
            c.state, c.reason = "gone", f"missing on the agent for {self.opts.grace:g}s"
        return c

    async def close(self) -> None:
        ch, self._channel, self._stub = self._channel, None, None
        if ch is not None:
            await ch.close()


class _Transient(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _agent() -> Any:
    from ...persys import protos

    return protos.agent()


def _request_of_status(st: Any) -> Any:
    """An apply request rebuilt from what a status tells (image, labels): for a stop of a workload this
    process did not apply (the scheduler restarted); the agent stops it only, the revision being the same."""
    from ...persys import convert

    A = _agent()
    meta = dict(st.metadata)
    labels = {k[len(convert.META_LABEL):]: v for k, v in meta.items() if k.startswith(convert.META_LABEL)}
    for k in AGENT_LABELS:
        labels.pop(k, None)
    return A.ApplyWorkloadRequest(id=st.id, type=A.WORKLOAD_TYPE_CONTAINER, revision_id=st.revision_id,
                                  desired_state=A.DESIRED_STATE_RUNNING, spec=A.WorkloadSpec(
                                      container=A.ContainerSpec(image=meta.get(convert.META_IMAGE, ""),
                                                                labels=labels)))


__all__ = ["PREFIX", "Address", "Options", "PersysAgent", "parse_address"]
