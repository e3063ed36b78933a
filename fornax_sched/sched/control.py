"""``persys.control.v1.AgentControl``, served by the scheduler on its own event loop (grpc.aio).

Agents register and heartbeat here as they do with Persys' scheduler (the
control contract's behaviour section): a registered agent becomes a node
at ``persys!ENDPOINT!name=NODE_ID,cpus=..,mem=..`` that the scheduler
follows as it follows any node; each registration and heartbeat renews a
lease (``lease_intervals`` heartbeat intervals); a lease that runs out
makes the node dead through the scheduler's liveness (its containers are
placed again), and it stays dead until the agent registers or heartbeats
again.  ``drain_node`` in a heartbeat's answer comes from ``drain_node()``,
the one place that decides it: a cordoned node, or a scheduler whose mode
is not normal.

The client half (ApplyWorkload, DeleteWorkload, RetryWorkload,
SubmitAutomationSuggestion) writes ctl commands: each request becomes the
text of a command and goes through ``Scheduler.command``, the path a ctl
write takes (the same checks, the same log lines, the refusal logged with
its reason); the reads (ListNodes, GetNode, ListWorkloads, GetWorkload,
GetClusterSummary) answer from the scheduler's state.  ControlStream is
left out: grpc answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ..persys import protos, tls
from ..persys.convert import timestamp
from ..persys.node import split_hostport
from ..units import format_size
from .backends.persys import Address
from .bridge import CONTROL_USER
from .lang import LABEL_KEY, NAME
from .modes import NORMAL
from .plans import CommandError
from .service import Scheduler

log = logging.getLogger("fornax_sched.sched.control")

USER = CONTROL_USER
FROZEN_LEASE = 30.0  # seconds of lease given while the mode is not normal (theirs)
# A placement status as the workload state words of Persys views.
VIEW_STATE = {"running": "Running", "starting": "Pending", "pending": "Pending", "unschedulable": "Pending",
              "lost": "Pending", "stopped": "Stopped", "succeeded": "Stopped", "exited": "Stopped",
              "failed": "Failed", "refused": "Failed"}


def drain_node(sched: Scheduler, node: str) -> bool:
    """Whether the agent ``node`` is told to drain: cordoned, or the scheduler not in normal mode."""
    if sched.mode.name != NORMAL:
        return True
    n = sched.state.cluster.nodes.get(node)
    return n is not None and n.cordoned


@dataclass
class Lease:
    expires: float  # monotonic
    endpoint: str
    registered: float  # wall clock
    last_heartbeat: float = 0.0  # wall clock; 0: none yet
    expired: bool = False


class ControlService:
    """The AgentControl methods (grpc.aio handlers) over one scheduler; see the module docstring."""

    def __init__(self, sched: Scheduler, *, heartbeat_interval: int = 60, lease_intervals: int = 3,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 plain: bool = True, insecure: bool = False) -> None:
        self.sched = sched
        self.plain, self.insecure = plain, insecure  # calls to agents without TLS; allowed off loopback
        self.interval = heartbeat_interval
        self.lease = heartbeat_interval * lease_intervals
        self.clock, self.monotonic = clock, monotonic
        self.leases: dict[str, Lease] = {}

    # ------------------------------------------------------------ leases
    def expired(self) -> list[str]:
        """The nodes whose lease has run out since the last look (marked, so each is told once)."""
        now = self.monotonic()
        out = []
        for node, ls in self.leases.items():
            if not ls.expired and now >= ls.expires:
                ls.expired = True
                out.append(node)
        return out

    async def watch_leases(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            if not self.sched.leading:  # a follower acts on no node; the leader sees a silent agent itself
                continue
            for node in self.expired():
                with contextlib.suppress(Exception):
                    await self.sched.node_lost(node, f"lease expired: no heartbeat for {self.lease}s")

    def _renew(self, node: str, seconds: float) -> Any:
        ls = self.leases[node]
        ls.expires = self.monotonic() + seconds
        if ls.expired:
            ls.expired = False
            self.sched.node_back(node)
        return timestamp(self.clock() + seconds)

    # ------------------------------------------------------------ agents
    async def RegisterNode(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        node = request.node_id
        if not node:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "node_id is required")
        if not NAME.match(node):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"node_id {node!r}: a node name is letters, "
                         f"digits, '.', '_' and '-', at most 63, starting with a letter or digit")
        try:
            if not request.grpc_endpoint:
                raise ValueError("grpc_endpoint is required")
            host, port = split_hostport(request.grpc_endpoint)
            if not port:
                raise ValueError(f"bad address {request.grpc_endpoint!r}: port 0")
        except ValueError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"node {node}: {e}")
        if self.sched.mode.name != NORMAL:
            return C.RegisterNodeResponse(accepted=False, reason=f"scheduler {self.sched.mode.name} mode")
        if self.plain and not self.insecure and not tls.is_loopback(host):
            return C.RegisterNodeResponse(accepted=False, reason=f"grpc_endpoint {request.grpc_endpoint}: this "
                                          f"scheduler speaks plain gRPC to loopback addresses only (no --tls-*)")
        caps = request.capabilities
        cpus = caps.cpu_total_millicores / 1000 if caps.cpu_total_millicores > 0 else 1.0
        mem = caps.memory_total_mb << 20 if caps.memory_total_mb > 0 else 1 << 30
        labels = {k: v for k, v in request.labels.items() if LABEL_KEY.match(k) and _plain(v)}
        endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        addr = Address(endpoint, node, cpus, mem, tuple(sorted(labels.items()))).text()
        known = self.leases.get(node)
        self.leases[node] = Lease(0.0, endpoint, self.clock())
        if known is not None and known.expired:
            self.leases[node].expired = True  # (renewed below: the node comes back)
        lease = self._renew(node, self.lease)
        if known is None or known.endpoint != endpoint:
            self.sched.note(f"agent {node} registered at {endpoint} ({cpus:g} cpus, {format_size(mem)}, "
                            f"{request.agent_version or 'version not told'})")
        try:  # the ctl path: a follower forwards it to the leader, which follows the agent
            await self.sched.command(f"join {addr}", USER)
        except CommandError as e:
            return C.RegisterNodeResponse(accepted=False, reason=str(e).splitlines()[0])
        return C.RegisterNodeResponse(accepted=True, reason="registered", heartbeat_interval_seconds=self.interval,
                                      lease_expires_at=lease)

    async def Heartbeat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        node = request.node_id
        if not node:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "node_id is required")
        known = self.leases.get(node)
        if known is not None and node not in self.sched.state.cluster.nodes and \
                self.clock() - known.registered > self.lease:
            # Forgotten (ctl forget, on whichever replica ran it; the state says so on all of them): an
            # agent alive after all registers again, as a new node.  (A node just registered is in the
            # state once the leader has reached it: a lease's time is more than that takes.)
            del self.leases[node]
            known = None
        if known is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"node {node!r} not registered")
        self.leases[node].last_heartbeat = self.clock()
        if self.sched.mode.name != NORMAL:
            return C.HeartbeatResponse(acknowledged=True, drain_node=True,
                                       lease_expires_at=self._renew(node, FROZEN_LEASE))
        lease = self._renew(node, self.lease)
        return C.HeartbeatResponse(acknowledged=True, drain_node=drain_node(self.sched, node), lease_expires_at=lease)

    # ------------------------------------------------------------ clients: writes, as ctl commands
    async def _command(self, text: str) -> tuple[bool, str]:
        try:
            return True, await self.sched.command(text, USER)
        except CommandError as e:
            return False, str(e).splitlines()[0] if str(e) else "refused"

    async def ApplyWorkload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        wid = request.workload_id
        if not wid:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "workload_id is required")
        if self.sched.mode.name != NORMAL:
            return C.ApplyWorkloadResponse(success=False, failure_reason=C.RUNTIME_ERROR,
                                           error_message=f"scheduler {self.sched.mode.name} mode")
        try:
            running = _desired(request.desired_state)
            place = place_command(wid, request.spec)
        except ValueError as e:
            return C.ApplyWorkloadResponse(success=False, failure_reason=C.INVALID_SPEC,
                                           error_message=f"workload {wid}: {e}")
        if wid in self.sched.state.records:
            ok, why = await self._command(f"{'start' if running else 'stop'} {wid}")
        else:
            ok, why = await self._command(place)
            if ok and not running:
                ok, why = await self._command(f"stop {wid}")
        if ok:
            return C.ApplyWorkloadResponse(success=True)
        reason = C.RUNTIME_ERROR if why.startswith("nothing changed") else C.INVALID_SPEC
        return C.ApplyWorkloadResponse(success=False, failure_reason=reason, error_message=why)

    async def DeleteWorkload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        if not request.workload_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "workload_id is required")
        ok, why = await self._command(f"remove {_word(request.workload_id)}")
        return C.DeleteWorkloadResponse(success=ok, error_message="" if ok else why)

    async def RetryWorkload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        wid = request.workload_id
        if self.sched.mode.name != NORMAL or wid not in self.sched.state.records:
            return C.RetryWorkloadResponse(accepted=False)
        ok, _ = await self._command(f"start {wid}")
        return C.RetryWorkloadResponse(accepted=ok)

    async def SubmitAutomationSuggestion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        s = request.suggestion
        wid = s.target_workload
        text = ""
        why = ""
        if not wid or not NAME.match(wid):
            why = f"bad target_workload {wid!r}"
        elif s.action_type == C.AUTOMATION_ACTION_SET_DESIRED_STATE:
            try:
                text = f"{'start' if _desired(s.desired_state) else 'stop'} {wid}"
            except ValueError as e:
                why = str(e)
        elif s.action_type == C.AUTOMATION_ACTION_RETRY_WORKLOAD:
            text = f"start {wid}"
        elif s.action_type == C.AUTOMATION_ACTION_DELETE_WORKLOAD:
            text = f"remove {wid}"
        elif s.action_type == C.AUTOMATION_ACTION_SCALE_REPLICAS:
            group = self.sched.state.records[wid].group if wid in self.sched.state.records else wid
            have = sum(1 for r in self.sched.state.records.values() if r.group == group)
            want = s.desired_replicas if s.desired_replicas > 0 else have + s.replica_delta
            text = f"scale {group} {want}" if want >= 0 else ""
            why = "" if text else f"replicas {want}: want 0 or more"
        else:
            why = f"unknown action_type {s.action_type}"
        if self.sched.mode.name != NORMAL:
            text, why = "", f"scheduler {self.sched.mode.name} mode"
        ok = False
        if text:
            ok, why = await self._command(text)
        return C.SubmitAutomationSuggestionResponse(accepted=ok, decision="applied" if ok else "rejected",
                                                    reason=why.strip() if not ok else f"{text}: done",
                                                    applied_action=text if ok else "",
                                                    decided_at=timestamp(self.clock()))

    # ------------------------------------------------------------ clients: reads
    def node_view(self, row: dict[str, Any]) -> Any:
        C = protos.control()
        name = row["name"]
        status, cordoned = row["status"].split(" ")[0], "cordoned" in row["status"]
        ls = self.leases.get(name)
        word = "Draining" if cordoned else "Ready" if status == "online" else "NotReady"
        v = C.NodeView(node_id=name, status=word, status_reason=row["status"], status_updated_by="fornax-sched",
                       grpc_endpoint=row["addr"].split("!")[1] if row["kind"] == "persys" else row["addr"],
                       total_cpu_cores=row["cpus"], available_cpu_cores=max(row["cpus"] - row["cpus_reserved"], 0),
                       total_memory_mb=row["mem"] >> 20,
                       available_memory_mb=max(row["mem"] - row["mem_reserved"], 0) >> 20,
                       supported_workload_types=["container"], labels=self._labels(name))
        if ls is not None and ls.last_heartbeat:
            v.last_heartbeat.CopyFrom(timestamp(ls.last_heartbeat))
        return v

    def _labels(self, node: str) -> dict[str, str]:
        n = self.sched.state.cluster.nodes.get(node)
        return dict(n.facts.labels) if n is not None else {}

    async def ListNodes(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        views = [self.node_view(r) for r in self.sched.node_rows()]
        return C.ListNodesResponse(nodes=[v for v in views if not request.status or v.status == request.status])

    async def GetNode(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        for r in self.sched.node_rows():
            if r["name"] == request.node_id:
                return C.GetNodeResponse(node=self.node_view(r))
        await _abort(context, grpc.StatusCode.NOT_FOUND, f"node {request.node_id!r} not found")

    def workload_view(self, row: dict[str, Any]) -> Any:
        C = protos.control()
        name = row["name"]
        r = self.sched.state.records[name]
        p = self.sched.state.cluster.placements[name]
        spec = self.sched._spec(name, p.request)
        status = "Deleted" if r.want == "remove" else VIEW_STATE.get(r.status, r.status.capitalize())
        return C.WorkloadView(workload_id=name, type="container", desired_state="Running" if r.want == "run"
                              else "Stopped", status=status, assigned_node_id=row["node"] if row["node"] != "-"
                              else "", revision_id=spec.revision, retry_attempts=r.restarts,
                              failure_reason=r.detail if status == "Failed" else "",
                              last_updated=timestamp(r.since))

    async def ListWorkloads(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        rows, _ = self.sched.status_rows()
        views = [self.workload_view(r) for r in rows if not request.node_id or r["node"] == request.node_id]
        return C.ListWorkloadsResponse(workloads=[v for v in views if not request.status or v.status == request.status])

    async def GetWorkload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        rows, _ = self.sched.status_rows()
        for r in rows:
            if r["name"] == request.workload_id:
                return C.GetWorkloadResponse(workload=self.workload_view(r))
        await _abort(context, grpc.StatusCode.NOT_FOUND, f"workload {request.workload_id!r} not found")

    async def GetClusterSummary(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        C = protos.control()
        nodes = [self.node_view(r) for r in self.sched.node_rows()]
        rows, _ = self.sched.status_rows()
        states = [self.workload_view(r).status for r in rows]
        return C.GetClusterSummaryResponse(
            total_nodes=len(nodes), ready_nodes=sum(v.status == "Ready" for v in nodes),
            not_ready_nodes=sum(v.status != "Ready" for v in nodes), total_workloads=len(states),
            running_workloads=states.count("Running"), pending_workloads=states.count("Pending"),
            failed_workloads=states.count("Failed"), deleted_workloads=states.count("Deleted"),
            generated_at=timestamp(self.clock()))


def place_command(wid: str, spec: Any) -> str:
    """The ctl ``place`` of a control WorkloadSpec (ValueError naming the field a place cannot express)."""
    if not NAME.match(wid):
        raise ValueError("a workload id here is a container name: letters, digits, '.', '_' and '-', at most 63")
    which = spec.WhichOneof("workload")
    if spec.type not in ("", "container") or which not in (None, "container"):
        raise ValueError(f"{spec.type or which} workloads are not supported (fornax-sched places containers)")
    c = spec.container
    if not c.image:
        raise ValueError("container image is required")
    for name in ("command", "volumes", "ports", "managed_volumes"):
        if len(getattr(c, name)):
            raise ValueError(f"container {name} are not supported by a place")
    if c.privileged:
        raise ValueError("privileged containers are not supported")
    restart = {"": "", "no": "never", "never": "never", "always": "always", "on-failure": "on-failure",
               "unless-stopped": "always"}.get(c.restart_policy)
    if restart is None:
        raise ValueError(f"unknown restart_policy {c.restart_policy!r}")
    words = ["place", c.image, f"name={wid}"]
    r = spec.resources
    if r.cpu_millicores < 0 or r.memory_mb < 0:
        raise ValueError("resources must not be negative")
    if r.cpu_millicores:
        words.append(f"cpu={r.cpu_millicores / 1000:g}")
    if r.memory_mb:
        words.append(f"mem={r.memory_mb}M")
    if restart:
        words.append(f"restart={restart}")
    words += [f"env:{k}={v}" for k, v in sorted(c.env.items())]  # (checked by place, with the node's rules)
    return " ".join(shlex.quote(w) for w in words)


def _desired(word: str) -> bool:
    if word in ("", "Running", "running"):
        return True
    if word in ("Stopped", "stopped"):
        return False
    raise ValueError(f"bad desired_state {word!r}: want Running or Stopped")


def _word(text: str) -> str:
    return text if NAME.match(text) else shlex.quote(text)


def _plain(value: str) -> bool:
    return bool(value) and all(ch.isprintable() and ch not in ",!= " for ch in value)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, why: str) -> None:
    await context.abort(code, why)
    raise AssertionError("abort returned")


class ControlServer:
    """The grpc.aio server of a ControlService, with its lease watcher."""

    def __init__(self, service: ControlService, listen: str, *, tls_files: tls.TLSFiles | None = None,
                 insecure: bool = False, observe: protos.RpcObserve | None = None) -> None:
        host, _ = split_hostport(listen)
        if tls_files is None:
            tls.check_plain(f"--control {listen}", host, insecure)
        self.service, self.listen, self.tls = service, listen, tls_files
        self.server: grpc.aio.Server | None = None
        self.address = listen
        self._watch: asyncio.Task[None] | None = None
        self.observe = observe  # told of every call served

    async def start(self) -> None:
        # (a taken port is an error, not shared; a 32nd of the file limit as agents' connections)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *protos.server_options()])
        server.add_generic_rpc_handlers((protos.handler(protos.control().service("AgentControl"), self.service,
                                                        self.observe),))
        try:
            port = (server.add_secure_port(self.listen, tls.server_credentials(self.tls)) if self.tls is not None
                    else server.add_insecure_port(self.listen))
        except RuntimeError as e:
            port, why = 0, str(e)
        else:
            why = "address in use or not this machine's"
        if not port:
            raise OSError(f"--control: cannot listen on {self.listen}: {why}")
        await server.start()
        self.server = server
        host, _ = split_hostport(self.listen)
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        every = max(min(self.service.interval / 2, 1.0), 0.1)
        self._watch = asyncio.create_task(self.service.watch_leases(every), name="sched-persys-leases")
        log.info("AgentControl on %s (%s)", self.address, "mTLS" if self.tls else "plain")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.server is not None:
            await self.server.stop(0.5)
