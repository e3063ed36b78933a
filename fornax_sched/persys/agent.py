"""persys.agent.v1.AgentService, served by fornax-node over its own container runtime.

A workload is one container of the node (the same ones its 9P tree shows),
named after the workload id and labelled with it (``persys.agent/workload``)
and with its revision (``persys.agent/revision``), so an adopted container
is still known after a node restart.  What the scheduler asked for (the
intent: revision, desired state, the request itself) is kept per workload
in ``<state>/persys/workloads/<id>.json`` (mode 0600: the request holds the
env values, which a restart or a reconcile needs to run the container again).

As a Persys agent does, apply and delete are queued: the reply comes at
once (``applied=true``, PENDING, "task pending execution", metadata
``task_id`` and ``task_status``), the intent is saved, and a task converges
the container to it: the tasks of one workload run one after another in
the order they came, at most ``workers`` at once in all.  Idempotency by
revision: the same revision and desired state, not failed, container
present in that state: nothing is queued (``skipped=true``); the same
revision with the other desired state: start or stop only (a container that
ended is started as a new process of the same spec: a process cannot be
resumed); a failed or missing container, or a new revision: the old one is
destroyed and the new one run.  A reconcile pass (every ``reconcile_every``
seconds) queues a ``reconcile`` task for each workload whose container is
missing, of another revision, running when it should not be, or ended when
its restart policy says to restart it.  Every task is in the bounded action
history that ListActions reads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from ..node import rt_cgroup
from ..node.rt_monitor import atomic_write
from ..node.runtime import MIN_MEM, STOPPED, Container, ContainerError, Limits, Runtime, check_env, check_labels
from ..sched.backends.base import Spec
from . import convert, protos
from .convert import SpecError
from .machine import CpuSampler, disk_utilization, memory_utilization

log = logging.getLogger(__name__)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fornax-sched")
    except PackageNotFoundError:
        return "0"


VERSION = f"fornax-node {_package_version()}"

WORKLOAD_LABEL = "persys.agent/workload"
REVISION_LABEL = "persys.agent/revision"
APPLY, DELETE, RECONCILE = "apply_workload", "delete_workload", "reconcile"
ACTION_TYPES = (APPLY, DELETE, RECONCILE)
PENDING, RUNNING, COMPLETED, FAILED = "pending", "running", "completed", "failed"
ACTION_STATUSES = (PENDING, RUNNING, COMPLETED, FAILED)
QUEUED = "task pending execution"
DRAINING = "node is draining"
MISSING = "container missing: the agent's reconcile runs it again"
HISTORY = 1000  # actions kept for ListActions
MAX_QUEUED = 10_000  # tasks pending or running at once; an apply beyond is refused
_PREFIX = {APPLY: "apply", DELETE: "delete", RECONCILE: "reconcile"}


class Host(Protocol):
    """What the agent needs of the node daemon."""

    name: str
    runtime: Runtime


@dataclass
class Action:
    """One task, as ListActions shows it (times in unix seconds, 0 until they happen)."""

    task_id: str
    workload_id: str
    action_type: str
    status: str = PENDING
    error: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0


@dataclass
class Workload:
    """The intent for one workload and where it stands on the node (persisted as JSON)."""

    id: str
    revision: str = ""
    running: bool = True  # desired state
    request: bytes = b""  # the ApplyWorkloadRequest as last applied
    created: float = 0.0
    updated: float = 0.0
    cid: str = ""  # its container on the node ("" while it has none)
    failed: str = ""  # why the last task could not converge it ("" if it could)
    deleting: bool = False
    restarts: int = 0  # by its restart policy, for on-failure's max_retry_count

    def to_json(self) -> bytes:
        raw = asdict(self)
        raw["request"] = base64.b64encode(self.request).decode()
        return json.dumps(raw).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Workload:
        raw = json.loads(data)
        raw["request"] = base64.b64decode(raw.get("request", ""))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})

    def req(self) -> Any:
        return protos.agent().ApplyWorkloadRequest.FromString(self.request)


class TaskFailed(Exception):
    """A task that could not do its work: the message is the action's error."""


class Agent:
    """The AgentService's methods (grpc.aio handlers) over a node's runtime; see the module docstring."""

    def __init__(self, host: Host, state: Path, *, clock: Callable[[], float] = time.time, workers: int = 8,
                 history: int = HISTORY, max_queued: int = MAX_QUEUED, reconcile_every: float = 10.0) -> None:
        self.host = host
        self.runtime = host.runtime
        self.clock = clock
        self.reconcile_every = reconcile_every
        self.max_queued = max_queued
        self.draining = False  # set by the scheduler's heartbeat answers (register.Registrar)
        self.history: deque[Action] = deque(maxlen=history)
        self._state = Path(state)
        self._dir = self._state / "persys" / "workloads"
        self._w: dict[str, Workload] = {}
        self._inflight: dict[str, list[Action]] = {}  # workload id -> its tasks not yet ended, in order
        self._locks: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_ns = 0
        self._cpu = CpuSampler()
        self._loop_task: asyncio.Task[None] | None = None
        self._images: tuple[float, list[str]] = (-1.0, [])  # (when listed, monotonic; the names)

    # ------------------------------------------------------------ life
    async def start(self) -> None:
        """Load the intents, find their containers (adopted by the runtime), start the reconcile pass."""
        self._dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self._dir.parent, 0o700)
        for p in sorted(self._dir.glob("*.json")):
            try:
                w = Workload.from_json(p.read_bytes())
                w.req()
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.warning("persys workload file %s unreadable, ignored: %s", p, e)
                continue
            if w.id != p.stem:
                log.warning("persys workload file %s holds workload %r, ignored", p, w.id)
                continue
            self._w[w.id] = w
            if self._container(w) is None:
                mine = [c for c in self.runtime.list() if c.labels.get(WORKLOAD_LABEL) == w.id]
                w.cid = mine[-1].id if mine else ""
            if w.deleting:  # the node went down before the delete was done: finish it
                self._queue(DELETE, w.id, functools.partial(self._delete, w.id))
        known = {c.labels.get(WORKLOAD_LABEL) for c in self.runtime.list()} - {None} - set(self._w)
        for wid in sorted(k for k in known if k):
            log.warning("container of workload %s has no persys record (not managed)", wid)
        if self.reconcile_every > 0:
            self._loop_task = asyncio.ensure_future(self._reconcile_loop())

    async def close(self) -> None:
        """Stop the reconcile pass and the tasks under way (their containers stay as they are)."""
        tasks = [t for t in [self._loop_task, *self._tasks] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ------------------------------------------------------------ RPCs
    async def ApplyWorkload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        A = protos.agent()
        if self.draining:
            return self._refused(request, DRAINING)
        try:
            spec = convert.spec_of_request(request)
            self._check_runnable(spec)
        except SpecError as e:
            return self._refused(request, str(e))
        running = convert.desired_running(request)
        wid, now = spec.name, self.clock()
        w = self._w.get(wid)
        if w is not None and not w.deleting and w.revision == spec.revision and w.running == running \
                and not w.failed:
            acts = self._inflight.get(wid)
            if (acts and acts[-1].action_type != DELETE) or (not acts and self._converged(w)):
                return A.ApplyWorkloadResponse(applied=True, skipped=True, message="revision already applied",
                                               status=self.status_of(w))
        if sum(len(v) for v in self._inflight.values()) >= self.max_queued:
            return self._refused(request, f"task queue full ({self.max_queued} tasks): try again later")
        if w is None or w.deleting:
            w = Workload(id=wid, created=now)
        if w.revision != spec.revision:
            w.restarts = 0
        w.revision, w.running, w.request = spec.revision, running, request.SerializeToString()
        w.updated, w.failed, w.deleting = now, "", False
        self._w[wid] = w
        self._save(w)
        self._queue(APPLY, wid, lambda: self._converge(wid))
        return A.ApplyWorkloadResponse(applied=True, message=QUEUED, status=self.status_of(w))

    async def DeleteWorkload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        A = protos.agent()
        wid = request.id
        w = self._w.get(wid)
        if w is None and wid not in self._inflight:
            return A.DeleteWorkloadResponse(success=True, message=f"workload {wid} not found: nothing to delete")
        if sum(len(v) for v in self._inflight.values()) >= self.max_queued:
            return A.DeleteWorkloadResponse(success=False, message=f"task queue full ({self.max_queued} tasks)")
        if w is not None:
            w.deleting, w.updated = True, self.clock()
            self._save(w)
        self._queue(DELETE, wid, lambda: self._delete(wid))
        return A.DeleteWorkloadResponse(success=True, message=QUEUED)

    async def GetWorkloadStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        A = protos.agent()
        w = self._w.get(request.id)
        if w is None:
            acts = self._inflight.get(request.id)
            if not acts:
                await context.abort(grpc.StatusCode.UNKNOWN, f"workload {request.id} not found")
                raise AssertionError("abort returned")
            return A.GetWorkloadStatusResponse(status=self._pending(A.WorkloadStatus(id=request.id), acts))
        return A.GetWorkloadStatusResponse(status=self.status_of(w))

    async def ListWorkloads(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        A = protos.agent()
        if request.type not in (A.WORKLOAD_TYPE_UNSPECIFIED, A.WORKLOAD_TYPE_CONTAINER):
            return A.ListWorkloadsResponse()  # this agent runs containers only
        return A.ListWorkloadsResponse(workloads=[self.status_of(self._w[k]) for k in sorted(self._w)])

    async def HealthCheck(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        A = protos.agent()
        if not self.runtime.backend:
            container = "unhealthy: the container runtime is not running"
        elif not self._runnable_images():
            container = "unhealthy: no runnable images on this node"
        else:
            container = "healthy"
        status = {"container": container,
                  "compose": "unhealthy: compose is not supported by fornax-node",
                  "vm": "unhealthy: vm is not supported by fornax-node"}
        return A.HealthCheckResponse(
            healthy=container == "healthy", version=VERSION, runtime_status=status,
            memory_utilization=memory_utilization(), cpu_utilization=self.cpu_utilization(),
            disk_utilization=disk_utilization(str(self._state)))

    async def ListActions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        A = protos.agent()
        if request.action_type and request.action_type not in ACTION_TYPES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown action_type {request.action_type!r}: "
                                f"want {', '.join(ACTION_TYPES)}")
        if request.status and request.status not in ACTION_STATUSES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown status {request.status!r}: "
                                f"want {', '.join(ACTION_STATUSES)}")
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad limit {request.limit}: want 0 (all) or more")
        return A.ListActionsResponse(actions=[self._action_msg(a) for a in self.actions(
            request.workload_id, request.action_type, request.status, request.limit, request.newest_first)])

    # ------------------------------------------------------------ queries
    def actions(self, workload_id: str = "", action_type: str = "", status: str = "", limit: int = 0,
                newest_first: bool = False) -> list[Action]:
        """The history, filtered; oldest first unless ``newest_first``; the first ``limit`` of that order (0: all)."""
        out = [a for a in self.history if (not workload_id or a.workload_id == workload_id)
               and (not action_type or a.action_type == action_type) and (not status or a.status == status)]
        if newest_first:
            out.reverse()
        return out[:limit] if limit > 0 else out

    def cpu_utilization(self) -> float:
        """The machine's CPU utilization in percent, since the previous reading (HealthCheck's and heartbeats')."""
        return self._cpu.utilization()

    def workloads(self) -> list[Workload]:
        return [self._w[k] for k in sorted(self._w)]

    def status_of(self, w: Workload) -> Any:
        """The WorkloadStatus of a workload: PENDING while a task of it is queued or running."""
        A = protos.agent()
        st = A.WorkloadStatus(id=w.id, type=A.WORKLOAD_TYPE_CONTAINER, revision_id=w.revision,
                              desired_state=A.DESIRED_STATE_RUNNING if w.running else A.DESIRED_STATE_STOPPED,
                              created_at=int(w.created), updated_at=int(w.updated))
        st.metadata[convert.META_NODE] = self.host.name
        c = self._container(w)
        if c is not None:
            self._describe(st, c)
        acts = self._inflight.get(w.id)
        if acts:
            return self._pending(st, acts)
        if w.failed:
            st.actual_state, st.message = A.ACTUAL_STATE_FAILED, w.failed
        elif c is None and w.running:
            st.actual_state, st.message = A.ACTUAL_STATE_UNKNOWN, MISSING
            st.metadata[convert.META_STATE] = "missing"
        elif c is None:
            st.actual_state, st.message = A.ACTUAL_STATE_STOPPED, "not running (desired stopped)"
        else:
            st.actual_state = convert.actual_of_state(c.state)
            st.message = c.reason or (f"exited, exit code {c.exit_code}" if c.state == "exited" else c.state)
        return st

    def _pending(self, st: Any, acts: list[Action]) -> Any:
        a = acts[-1]
        st.actual_state = protos.agent().ACTUAL_STATE_PENDING
        st.message = QUEUED if a.status == PENDING else f"task {a.action_type} running"
        st.metadata["task_id"] = a.task_id
        st.metadata["task_status"] = a.status
        return st

    def _describe(self, st: Any, c: Container) -> None:
        A = protos.agent()
        m = st.metadata
        m[convert.META_CONTAINER], m[convert.META_STATE], m[convert.META_IMAGE] = c.id, c.state, c.image
        if c.exit_code is not None:
            m[convert.META_EXIT_CODE] = str(c.exit_code)
        for k, v in c.labels.items():
            m[convert.META_LABEL + k] = v
        now = self.clock()
        u = A.WorkloadUsageSnapshot(workload_id=st.id, type=A.WORKLOAD_TYPE_CONTAINER, collected_at=int(now),
                                    source="fornax-node")
        if c.state == "running":
            u.memory_bytes = rt_cgroup.mem_usage(c.backend, c.cgroups) or 0
            u.cpu_percent = _cpu_percent(c, now)
        st.usage.CopyFrom(u)

    def _converged(self, w: Workload) -> bool:
        """Whether its container is in the desired state, at its revision (a skip needs that)."""
        c = self._container(w)
        if c is None:
            return not w.running
        if c.labels.get(REVISION_LABEL) != w.revision or c.state == "failed":
            return False
        return _alive(c) if w.running else not _alive(c)

    def _container(self, w: Workload) -> Container | None:
        if not w.cid:
            return None
        try:
            c = self.runtime.get(w.cid)
        except ContainerError:
            return None
        return c if c.labels.get(WORKLOAD_LABEL) == w.id else None

    def _refused(self, request: Any, why: str) -> Any:
        A = protos.agent()
        log.info("apply %s refused: %s", request.id, why)
        w = self._w.get(request.id)
        status = self.status_of(w) if w is not None else A.WorkloadStatus(id=request.id, type=request.type)
        return A.ApplyWorkloadResponse(applied=False, message=why, status=status)

    def _check_runnable(self, spec: Spec) -> None:
        """What the runtime would refuse, refused now (in the reply) rather than as a failed task."""
        wid = spec.name
        images = self._runnable_images()
        if spec.image not in images:
            raise SpecError(f"workload {wid}: unknown image {spec.image!r} (images on node {self.host.name}: "
                            f"{', '.join(images) or 'none'})")
        mine = [k for k, _ in spec.labels if k in (WORKLOAD_LABEL, REVISION_LABEL)]
        if mine:
            raise SpecError(f"workload {wid}: label {mine[0]} is the agent's own and cannot be given")
        try:
            check_labels(self._labels(spec))
            check_env(dict(spec.env))
        except ContainerError as e:
            raise SpecError(f"workload {wid}: {e}") from None
        if spec.mem and spec.mem < MIN_MEM:
            raise SpecError(f"workload {wid}: resources memory_bytes {spec.mem} is below 1M")
        if spec.cpus and not 0.01 <= spec.cpus <= 1024:
            raise SpecError(f"workload {wid}: resources cpu_shares {convert.shares_of_cpus(spec.cpus)} is "
                            f"{spec.cpus:g} CPUs: want 0.01 to 1024 CPUs (10 to 1048576 shares)")

    def _runnable_images(self) -> list[str]:
        """The runtime's images, listed again at most once a second (each listing checks every image's command)."""
        at, names = self._images
        now = time.monotonic()
        if at < 0 or now - at >= 1.0 or not names:
            names = self.runtime.images()
            self._images = (now, names)
        return names

    @staticmethod
    def _labels(spec: Spec) -> dict[str, str]:
        return {**dict(spec.labels), WORKLOAD_LABEL: spec.name, REVISION_LABEL: spec.revision or "-"}

    # ------------------------------------------------------------ tasks
    def _queue(self, kind: str, wid: str, work: Callable[[], Any]) -> Action:
        ns = max(int(self.clock() * 1e9), self._last_ns + 1)
        self._last_ns = ns
        a = Action(f"{_PREFIX[kind]}-{wid}-{ns}", wid, kind, created_at=self.clock())
        self.history.append(a)
        self._inflight.setdefault(wid, []).append(a)
        lock = self._locks.setdefault(wid, asyncio.Lock())
        t = asyncio.ensure_future(self._run_task(a, lock, work))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return a

    async def _run_task(self, a: Action, lock: asyncio.Lock, work: Callable[[], Any]) -> None:
        try:
            async with lock, self._slots:
                a.status, a.started_at = RUNNING, self.clock()
                try:
                    await work()
                    a.status = COMPLETED
                except TaskFailed as e:
                    a.status, a.error = FAILED, str(e)
                    log.info("%s: %s", a.task_id, e)
                except Exception as e:  # a bug: the task fails, the agent goes on
                    log.exception("%s failed", a.task_id)
                    a.status, a.error = FAILED, f"{type(e).__name__}: {e}"
        finally:
            if a.status in (PENDING, RUNNING):  # cancelled (the node is shutting down)
                a.status, a.error = FAILED, "cancelled: the node is shutting down"
            a.ended_at = self.clock()
            acts = self._inflight.get(a.workload_id, [])
            if a in acts:
                acts.remove(a)
            if not acts:
                self._inflight.pop(a.workload_id, None)
                self._locks.pop(a.workload_id, None)

    async def _converge(self, wid: str, reconcile: bool = False) -> None:
        """Make the workload's container what its intent says (see the module docstring)."""
        w = self._w.get(wid)
        if w is None or w.deleting:
            return
        try:
            spec = convert.spec_of_request(w.req())
            c = self._container(w)
            stale = c is not None and (c.labels.get(REVISION_LABEL) != w.revision or c.state == "failed")
            if w.running:
                if c is None or stale or not _alive(c):
                    if c is not None:
                        if reconcile and not stale:
                            w.restarts += 1
                        await self.runtime.destroy(c.id)
                        w.cid = ""
                    new = await self.runtime.run(spec.image, spec.args, Limits(spec.mem or None, spec.cpus or None),
                                                 name=wid, labels=self._labels(spec), env=dict(spec.env))
                    w.cid = new.id
                    if new.state == "failed":
                        raise TaskFailed(f"container {new.id}: {new.reason}")
            elif c is not None and stale:
                await self.runtime.destroy(c.id)
                w.cid = ""
            elif c is not None and _alive(c):
                await self.runtime.stop(c.id)
            w.failed = ""
        except (ContainerError, SpecError) as e:
            w.failed = str(e)
            raise TaskFailed(str(e)) from None
        except TaskFailed as e:
            w.failed = str(e)
            raise
        finally:
            w.updated = self.clock()
            if self._w.get(wid) is w:
                self._save(w)

    async def _delete(self, wid: str) -> None:
        try:
            for c in [c for c in self.runtime.list() if c.labels.get(WORKLOAD_LABEL) == wid]:
                await self.runtime.destroy(c.id)
        except ContainerError as e:
            raise TaskFailed(str(e)) from None
        w = self._w.get(wid)
        if w is not None and w.deleting:
            del self._w[wid]
            with contextlib.suppress(FileNotFoundError):
                (self._dir / f"{wid}.json").unlink()

    # ------------------------------------------------------------ reconcile
    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_every)
            try:
                self.reconcile_once()
            except Exception:
                log.exception("persys reconcile pass failed")

    def reconcile_once(self) -> list[str]:
        """Queue a reconcile task for every workload that drifted; the ids queued."""
        out = []
        for w in self.workloads():
            if w.deleting or w.failed or w.id in self._inflight:
                continue
            why = self._drift(w)
            if why:
                log.info("persys reconcile %s: %s", w.id, why)
                self._queue(RECONCILE, w.id, functools.partial(self._converge, w.id, reconcile=True))
                out.append(w.id)
        return out

    def _drift(self, w: Workload) -> str:
        c = self._container(w)
        if not w.running:
            return "running, desired stopped" if c is not None and _alive(c) else ""
        if c is None:
            return "container missing"
        if c.labels.get(REVISION_LABEL) != w.revision:
            return "container of another revision"
        if _alive(c):
            return ""
        rp = w.req().spec.container.restart_policy
        if rp.policy in ("always", "unless-stopped") and not c.reason.startswith(STOPPED):
            return f"container {c.state}; restart policy {rp.policy}"
        if rp.policy == "on-failure" and c.state == "failed" and (
                rp.max_retry_count == 0 or w.restarts < rp.max_retry_count):
            return f"container failed; restart policy on-failure ({w.restarts} restarts so far)"
        return ""

    # ------------------------------------------------------------ small things
    def _save(self, w: Workload) -> None:
        path = self._dir / f"{w.id}.json"
        atomic_write(str(path), w.to_json())
        os.chmod(path, 0o600)

    @staticmethod
    def _action_msg(a: Action) -> Any:
        return protos.agent().AgentAction(task_id=a.task_id, workload_id=a.workload_id, action_type=a.action_type,
                                          status=a.status, error=a.error, created_at=int(a.created_at),
                                          started_at=int(a.started_at), ended_at=int(a.ended_at))


def _alive(c: Container) -> bool:
    return c.state in ("created", "running")


def _cpu_percent(c: Container, now: float) -> float:
    """The container's main process's CPU time (its waited-for children's included) over its life, in percent."""
    if not c.pid or not c.started:
        return 0.0
    try:
        with open(f"/proc/{c.pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
        ticks = sum(int(x) for x in rest[11:15])  # utime stime cutime cstime
    except (OSError, ValueError, IndexError):
        return 0.0
    life = now - c.started
    return round(100.0 * ticks / os.sysconf("SC_CLK_TCK") / life, 2) if life > 0 else 0.0
