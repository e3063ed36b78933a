"""The pure parts of the bridge: Spec <-> messages, state words, machine figures."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fornax_sched.persys import convert, protos
from fornax_sched.persys.machine import CpuSampler, cpu_times_of, memory_utilization_of
from fornax_sched.sched.backends.base import CLUSTER_LABEL, Spec

A = protos.agent()
C = protos.control()


def test_a_spec_goes_there_and_back() -> None:
    spec = Spec("web-1", "web", ("8080",), 0.5, 64 << 20, ((CLUSTER_LABEL, "c1"), ("team", "a")),
                (("K", "v"),)).with_revision()
    req = convert.apply_request(spec)
    assert (req.id, req.revision_id, req.type) == ("web-1", spec.revision, A.WORKLOAD_TYPE_CONTAINER)
    assert req.spec.container.resources.cpu_shares == 512
    assert req.spec.container.resources.memory_bytes == 64 << 20
    back = convert.spec_of_request(A.ApplyWorkloadRequest.FromString(req.SerializeToString()))
    assert back == replace(spec, labels=tuple(sorted(spec.labels)))  # (labels come back sorted)
    assert back.with_revision().revision == spec.revision
    assert convert.desired_running(req)
    assert not convert.desired_running(convert.apply_request(spec, running=False))


@pytest.mark.parametrize("change, why", [
    (lambda r: setattr(r, "id", ""), "workload id is required"),
    (lambda r: setattr(r, "id", "a/b"), "bad workload id 'a/b'"),
    (lambda r: setattr(r, "type", A.WORKLOAD_TYPE_MICROVM), "microvm workloads are not supported"),
    (lambda r: r.spec.ClearField("container"), "no spec given"),
    (lambda r: setattr(r, "revision_id", "two words"), "bad revision_id"),
    (lambda r: r.spec.container.volumes.add(host_path="/x"), "volumes are not supported"),
    (lambda r: r.spec.container.managed_volumes.add(name="v"), "managed_volumes are not supported"),
    (lambda r: setattr(r.spec.container.resources, "cpu_shares", -1), "cpu_shares must not be negative"),
    (lambda r: setattr(r.spec.container, "image", ""), "image is required"),
])
def test_what_a_node_cannot_run_is_refused_by_name(change, why: str) -> None:
    req = convert.apply_request(Spec("w", "hello").with_revision())
    change(req)
    with pytest.raises(convert.SpecError, match=why):
        convert.spec_of_request(req)


def test_a_status_reads_back_as_container_info() -> None:
    st = A.WorkloadStatus(id="w", actual_state=A.ACTUAL_STATE_FAILED, message="exit code 3",
                          metadata={"state": "failed", "image": "hello", "exit_code": "3", "label.team": "a"})
    info = convert.info_of_status(st)
    assert (info.id, info.name, info.image, info.state, info.exit_code, info.reason) == \
        ("w", "w", "hello", "failed", 3, "exit code 3")
    assert info.labels == {"team": "a"}
    pending = convert.info_of_status(A.WorkloadStatus(id="p", actual_state=A.ACTUAL_STATE_PENDING))
    assert pending.state == "created" and pending.alive
    bare = convert.info_of_status(A.WorkloadStatus(id="q", actual_state=A.ACTUAL_STATE_STOPPED))
    assert bare.state == "stopped"
    cs = convert.control_status(st)
    assert (cs.workload_id, cs.state, cs.failure_reason) == ("w", "Failed", C.RUNTIME_ERROR)
    assert convert.actual_of_state("exited") == A.ACTUAL_STATE_STOPPED
    assert convert.actual_of_state("weird") == A.ACTUAL_STATE_UNKNOWN


def test_machine_figures() -> None:
    assert memory_utilization_of("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 250 kB\n") == 75.0
    assert memory_utilization_of("") == 0.0
    assert cpu_times_of("cpu  10 0 10 70 10 0 0 0 0 0\ncpu0 1 1 1 1\n") == (20, 100)
    readings = iter(["cpu 0 0 0 100 0 0 0 0", "cpu 50 0 0 150 0 0 0 0", "cpu 50 0 0 150 0 0 0 0"])
    now = [0.0]
    s = CpuSampler(read=lambda: next(readings), clock=lambda: now[0], min_gap=1.0)
    now[0] = 0.5
    assert s.utilization() == 0.0  # too soon: the last figure
    now[0] = 2.0
    assert s.utilization() == 50.0
