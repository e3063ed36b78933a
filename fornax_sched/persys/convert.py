"""Between our Spec / ContainerInfo and the Persys messages: pure, no I/O, for both sides of the bridge.

The agent side (fornax-node serving AgentService) turns an
ApplyWorkloadRequest into a ``Spec`` (``spec_of_request``, which refuses
what a fornax-node cannot do, in one line naming the field) and a container
into a WorkloadStatus (``actual_of_state`` and the metadata keys below).
The scheduler side does the reverse: ``apply_request`` builds the request
for a Spec, ``info_of_status`` reads a WorkloadStatus back as the
ContainerInfo every backend returns, and ``control_status`` is the
heartbeat's form of a status.

Resources: ``cpu_shares`` are Docker's, 1024 to a CPU, so
``cpus = cpu_shares / 1024`` (a limit: 512 is half a CPU), and
``memory_bytes`` is the memory limit in bytes (at least 1M);
``memory_swap_bytes`` is accepted and not enforced (containers here have
no swap limit of their own).
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ..sched.backends.base import ContainerInfo, Spec
from . import protos

CPU_SHARES_PER_CPU = 1024
WORKLOAD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # also the container's name and a file name
RESTART_POLICIES = ("", "no", "always", "on-failure", "unless-stopped")
# Keys of WorkloadStatus.metadata the agent fills in (besides task_id / task_status while a task is queued).
META_CONTAINER = "container_id"  # the node's id of the container
META_STATE = "state"  # the node's own state word: created running stopped exited failed
META_IMAGE = "image"
META_EXIT_CODE = "exit_code"
META_NODE = "node"
META_LABEL = "label."  # one key per container label: label.KEY -> VALUE

# The node's container states as ActualState names (a container being started is PENDING).
ACTUAL_OF_STATE = {"created": "ACTUAL_STATE_PENDING", "running": "ACTUAL_STATE_RUNNING",
                   "stopped": "ACTUAL_STATE_STOPPED", "exited": "ACTUAL_STATE_STOPPED",
                   "failed": "ACTUAL_STATE_FAILED"}
# ActualState names as the control service's state strings (heartbeats, views).
CONTROL_STATE = {"ACTUAL_STATE_UNSPECIFIED": "Unknown", "ACTUAL_STATE_PENDING": "Pending",
                 "ACTUAL_STATE_RUNNING": "Running", "ACTUAL_STATE_STOPPED": "Stopped",
                 "ACTUAL_STATE_FAILED": "Failed", "ACTUAL_STATE_UNKNOWN": "Unknown"}
# And back to a node's state word, when the status carries none (an agent that is not a fornax-node).
STATE_OF_ACTUAL = {"ACTUAL_STATE_PENDING": "created", "ACTUAL_STATE_RUNNING": "running",
                   "ACTUAL_STATE_STOPPED": "stopped", "ACTUAL_STATE_FAILED": "failed",
                   "ACTUAL_STATE_UNKNOWN": "unknown", "ACTUAL_STATE_UNSPECIFIED": "unknown"}


class SpecError(ValueError):
    """A workload a fornax-node cannot run: the message names the field and says why (one line)."""


def actual_of_state(state: str) -> int:
    """The ActualState number of a node's container state word (UNKNOWN for any other)."""
    return int(protos.agent().values[ACTUAL_OF_STATE.get(state, "ACTUAL_STATE_UNKNOWN")])


def actual_name(actual: int) -> str:
    return str(protos.agent().ActualState.Name(actual))


def cpus_of_shares(shares: int) -> float:
    return shares / CPU_SHARES_PER_CPU


def shares_of_cpus(cpus: float) -> int:
    return max(round(cpus * CPU_SHARES_PER_CPU), 1) if cpus > 0 else 0


def check_id(wid: str) -> str:
    if not wid:
        raise SpecError("workload id is required")
    if not WORKLOAD_ID.fullmatch(wid):
        raise SpecError(f"bad workload id {wid!r}: letters, digits, '.', '_', ':' and '-', at most 64, "
                        f"starting with a letter or digit")
    return wid


def desired_running(req: Any) -> bool:
    """Whether an agent ApplyWorkloadRequest wants the workload running (UNSPECIFIED counts as running)."""
    return bool(req.desired_state != protos.agent().DESIRED_STATE_STOPPED)


def spec_of_request(req: Any) -> Spec:
    """The Spec of an agent ApplyWorkloadRequest; SpecError for what a fornax-node cannot run.

    Refused: compose and VM workloads, a ``command`` (an image's command is
    its config's: ``args`` are appended to it), volumes, ports, managed
    volumes, an unknown restart policy, negative resources.  The id, the
    revision and the container's labels and env are taken as they are
    (the runtime checks labels and env when it runs them).
    """
    A = protos.agent()
    wid = check_id(req.id)
    which = req.spec.WhichOneof("spec")
    kinds = {A.WORKLOAD_TYPE_CONTAINER: "container", A.WORKLOAD_TYPE_COMPOSE: "compose", A.WORKLOAD_TYPE_VM: "vm",
             A.WORKLOAD_TYPE_MICROVM: "microvm"}
    kind = kinds.get(req.type, "" if req.type == A.WORKLOAD_TYPE_UNSPECIFIED else f"type {req.type}")
    for k in (kind, which or ""):
        if k and k != "container":
            raise SpecError(f"workload {wid}: {k} workloads are not supported by fornax-node (it runs containers)")
    if which is None:
        raise SpecError(f"workload {wid}: no spec given (want spec.container)")
    if not req.revision_id.isprintable() or any(ch.isspace() for ch in req.revision_id) \
            or len(req.revision_id) > 255:
        raise SpecError(f"workload {wid}: bad revision_id {req.revision_id!r}: one word of printable characters, "
                        f"at most 255")
    c = req.spec.container
    if not c.image:
        raise SpecError(f"workload {wid}: container image is required")
    if c.command:
        raise SpecError(f"workload {wid}: container command is not supported: an image's command is fixed by its "
                        f"config; pass args (appended to it)")
    for name in ("volumes", "ports", "managed_volumes"):
        if len(getattr(c, name)):
            raise SpecError(f"workload {wid}: container {name} are not supported by fornax-node")
    if c.restart_policy.policy not in RESTART_POLICIES:
        raise SpecError(f"workload {wid}: unknown restart policy {c.restart_policy.policy!r}: want one of "
                        f"{', '.join(p for p in RESTART_POLICIES if p)}")
    if c.restart_policy.max_retry_count < 0:
        raise SpecError(f"workload {wid}: restart policy max_retry_count must not be negative")
    r = c.resources
    for name in ("cpu_shares", "memory_bytes", "memory_swap_bytes"):
        if getattr(r, name) < 0:
            raise SpecError(f"workload {wid}: resources {name} must not be negative")
    for a in c.args:
        if "\0" in a:
            raise SpecError(f"workload {wid}: bad argument {a!r}")
    return Spec(name=wid, image=c.image, args=tuple(c.args), cpus=cpus_of_shares(r.cpu_shares),
                mem=r.memory_bytes, labels=tuple(sorted(c.labels.items())), env=tuple(sorted(c.env.items())),
                revision=req.revision_id)


def apply_request(spec: Spec, *, running: bool = True, restart_policy: str = "") -> Any:
    """The agent ApplyWorkloadRequest of a Spec: id is its name, revision_id its revision."""
    A = protos.agent()
    container = A.ContainerSpec(
        image=spec.image, args=list(spec.args), env=dict(spec.env), labels=dict(spec.labels),
        resources=A.ResourceLimits(cpu_shares=shares_of_cpus(spec.cpus), memory_bytes=spec.mem),
        restart_policy=A.RestartPolicy(policy=restart_policy))
    return A.ApplyWorkloadRequest(
        id=spec.name, type=A.WORKLOAD_TYPE_CONTAINER, revision_id=spec.revision,
        desired_state=A.DESIRED_STATE_RUNNING if running else A.DESIRED_STATE_STOPPED,
        spec=A.WorkloadSpec(container=container))


def info_of_status(st: Any) -> ContainerInfo:
    """A WorkloadStatus as the ContainerInfo of the backend interface (id and name: the workload id)."""
    meta = dict(st.metadata)
    state = meta.get(META_STATE) or STATE_OF_ACTUAL.get(actual_name(st.actual_state), "unknown")
    if st.actual_state == protos.agent().ACTUAL_STATE_PENDING:
        state = "created"
    code = meta.get(META_EXIT_CODE, "")
    labels = {k[len(META_LABEL):]: v for k, v in meta.items() if k.startswith(META_LABEL)}
    return ContainerInfo(st.id, st.id, meta.get(META_IMAGE, ""), state,
                         int(code) if code.lstrip("-").isdigit() else None, st.message, labels)


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def failure_reason(st: Any) -> int:
    """The control FailureReason of an agent status (UNSPECIFIED unless it failed)."""
    C = protos.control()
    if st.actual_state != protos.agent().ACTUAL_STATE_FAILED:
        return int(C.FAILURE_REASON_UNSPECIFIED)
    msg = st.message
    if msg.startswith("unknown image") or " unknown image " in msg:
        return int(C.IMAGE_NOT_FOUND)
    if "memory limit" in msg:
        return int(C.INSUFFICIENT_RESOURCES)
    return int(C.RUNTIME_ERROR)


def control_status(st: Any) -> Any:
    """An agent WorkloadStatus in the control service's form (a heartbeat's workload_statuses)."""
    C = protos.control()
    return C.WorkloadStatus(workload_id=st.id, state=CONTROL_STATE[actual_name(st.actual_state)],
                            failure_reason=failure_reason(st), message=st.message,
                            last_transition=timestamp(st.updated_at))


def control_usage(u: Any) -> Any:
    """An agent WorkloadUsageSnapshot in the control service's form (type a word, collected_at a Timestamp)."""
    C = protos.control()
    kind = protos.agent().WorkloadType.Name(u.type).removeprefix("WORKLOAD_TYPE_").lower()
    return C.WorkloadUsageSnapshot(workload_id=u.workload_id, type=kind, cpu_percent=u.cpu_percent,
                                   memory_bytes=u.memory_bytes, disk_read_bytes=u.disk_read_bytes,
                                   disk_write_bytes=u.disk_write_bytes, net_rx_bytes=u.net_rx_bytes,
                                   net_tx_bytes=u.net_tx_bytes, collected_at=timestamp(u.collected_at),
                                   source=u.source)
