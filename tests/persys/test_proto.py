"""Our .proto files against the Persys contracts, field by field.

The facts below are transcribed from the reference tables
(shared/reference/persys-agent-contract.md and persys-control-contract.md),
one line per message as ``name=number type``, the tables' shorthands
("(strings)", "map") spelled out; the test compares them with the
descriptors protoc made of our files, never our files with themselves.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from fornax_sched.persys import protos
from tests.helpers import free_port, run

AGENT_MESSAGES = {
    "ApplyWorkloadRequest": "id=1 string; type=2 WorkloadType; revision_id=3 string; desired_state=4 DesiredState; "
                            "spec=5 WorkloadSpec",
    "ApplyWorkloadResponse": "applied=1 bool; skipped=2 bool; message=3 string; status=4 WorkloadStatus",
    "DeleteWorkloadRequest": "id=1 string",
    "DeleteWorkloadResponse": "success=1 bool; message=2 string",
    "GetWorkloadStatusRequest": "id=1 string",
    "GetWorkloadStatusResponse": "status=1 WorkloadStatus",
    "ListWorkloadsRequest": "type=1 WorkloadType",
    "ListWorkloadsResponse": "workloads=1 repeated WorkloadStatus",
    "HealthCheckRequest": "",
    "HealthCheckResponse": "healthy=1 bool; version=2 string; runtime_status=3 map<string,string>; "
                           "memory_utilization=4 double; cpu_utilization=5 double; disk_utilization=6 double",
    "ListActionsRequest": "workload_id=1 string; action_type=2 string; status=3 string; limit=4 int32; "
                          "newest_first=5 bool",
    "ListActionsResponse": "actions=1 repeated AgentAction",
    "AgentAction": "task_id=1 string; workload_id=2 string; action_type=3 string; status=4 string; error=5 string; "
                   "created_at=6 int64; started_at=7 int64; ended_at=8 int64",
    "WorkloadSpec": "container=1 ContainerSpec; compose=2 ComposeSpec; vm=3 VMSpec",
    "ContainerSpec": "image=1 string; command=2 repeated string; args=3 repeated string; env=4 map<string,string>; "
                     "volumes=5 repeated VolumeMount; ports=6 repeated PortMapping; resources=7 ResourceLimits; "
                     "restart_policy=8 RestartPolicy; labels=9 map<string,string>; "
                     "managed_volumes=10 repeated ManagedVolumeSpec",
    "ComposeSpec": "project_name=1 string; compose_yaml=2 string; env=3 map<string,string>",
    "VMSpec": "name=1 string; vcpus=2 int32; memory_mb=3 int64; disks=4 repeated DiskConfig; "
              "networks=5 repeated NetworkConfig; cloud_init=6 string; metadata=7 map<string,string>; "
              "cloud_init_config=8 CloudInitConfig; managed_volumes=9 repeated ManagedVolumeSpec",
    "CloudInitConfig": "user_data=1 string; meta_data=2 string; network_config=3 string; vendor_data=4 string",
    "ManagedVolumeSpec": "name=1 string; driver=2 string; size_gb=3 int64; access_mode=4 string; fs_type=5 string; "
                         "mount_path=6 string; read_only=7 bool; retain_policy=8 string",
    "VolumeMount": "host_path=1 string; container_path=2 string; read_only=3 bool",
    "PortMapping": "host_port=1 int32; container_port=2 int32; protocol=3 string",
    "ResourceLimits": "cpu_shares=1 int64; memory_bytes=2 int64; memory_swap_bytes=3 int64",
    "RestartPolicy": "policy=1 string; max_retry_count=2 int32",
    "DiskConfig": "path=1 string; device=2 string; format=3 string; size_gb=4 int64; type=5 string; boot=6 bool",
    "NetworkConfig": "network=1 string; mac_address=2 string; ip_address=3 string",
    "WorkloadStatus": "id=1 string; type=2 WorkloadType; revision_id=3 string; desired_state=4 DesiredState; "
                      "actual_state=5 ActualState; message=6 string; created_at=7 int64; updated_at=8 int64; "
                      "metadata=9 map<string,string>; usage=10 WorkloadUsageSnapshot",
    "WorkloadUsageSnapshot": "workload_id=1 string; type=2 WorkloadType; cpu_percent=3 double; memory_bytes=4 int64; "
                             "disk_read_bytes=5 int64; disk_write_bytes=6 int64; net_rx_bytes=7 int64; "
                             "net_tx_bytes=8 int64; collected_at=9 int64; source=10 string",
}
AGENT_ONEOFS = {"WorkloadSpec": {"spec": {"container", "compose", "vm"}}}
AGENT_ENUMS = {
    "WorkloadType": "WORKLOAD_TYPE_UNSPECIFIED=0 WORKLOAD_TYPE_CONTAINER=1 WORKLOAD_TYPE_COMPOSE=2 WORKLOAD_TYPE_VM=3 "
                    "WORKLOAD_TYPE_MICROVM=4",
    "DesiredState": "DESIRED_STATE_UNSPECIFIED=0 DESIRED_STATE_RUNNING=1 DESIRED_STATE_STOPPED=2",
    "ActualState": "ACTUAL_STATE_UNSPECIFIED=0 ACTUAL_STATE_PENDING=1 ACTUAL_STATE_RUNNING=2 ACTUAL_STATE_STOPPED=3 "
                   "ACTUAL_STATE_FAILED=4 ACTUAL_STATE_UNKNOWN=5",
}
AGENT_RPCS = {name: (f"{name}Request", f"{name}Response", "unary") for name in
              ("ApplyWorkload", "DeleteWorkload", "GetWorkloadStatus", "ListWorkloads", "HealthCheck", "ListActions")}

TS = "google.protobuf.Timestamp"
CONTROL_MESSAGES = {
    "RegisterNodeRequest": f"node_id=1 string; capabilities=2 NodeCapabilities; labels=3 map<string,string>; "
                           f"agent_version=4 string; grpc_endpoint=5 string; cluster_id=6 string; timestamp=7 {TS}",
    "NodeCapabilities": "cpu_total_millicores=1 int64; memory_total_mb=2 int64; storage_pools=3 repeated StoragePool; "
                        "supported_workload_types=4 repeated string; supported_storage_drivers=5 repeated string",
    "StoragePool": "name=1 string; type=2 string; total_gb=3 int64",
    "RegisterNodeResponse": f"accepted=1 bool; reason=2 string; heartbeat_interval_seconds=3 int32; "
                            f"lease_expires_at=4 {TS}",
    "HeartbeatRequest": f"node_id=1 string; usage=2 NodeUsage; workload_statuses=3 repeated WorkloadStatus; "
                        f"timestamp=4 {TS}; workload_usage=5 repeated WorkloadUsageSnapshot",
    "NodeUsage": "cpu_allocated_millicores=1 int64; cpu_used_millicores=2 int64; memory_allocated_mb=3 int64; "
                 "memory_used_mb=4 int64; disk_allocated_gb=5 int64; disk_used_gb=6 int64",
    "HeartbeatResponse": f"acknowledged=1 bool; drain_node=2 bool; lease_expires_at=3 {TS}",
    "ApplyWorkloadRequest": "workload_id=1 string; spec=2 WorkloadSpec; revision_id=10 string; desired_state=11 string",
    "ApplyWorkloadResponse": "success=1 bool; failure_reason=2 FailureReason; error_message=3 string",
    "DeleteWorkloadRequest": "workload_id=1 string",
    "DeleteWorkloadResponse": "success=1 bool; error_message=2 string",
    "WorkloadSpec": "type=1 string; resources=2 ResourceRequirements; container=10 ContainerSpec; "
                    "compose=11 ComposeSpec; vm=12 VMSpec; metadata=20 map<string,string>",
    "ResourceRequirements": "cpu_millicores=1 int64; memory_mb=2 int64; disk_gb=3 int64",
    "ContainerSpec": "image=1 string; command=2 repeated string; env=3 map<string,string>; "
                     "volumes=4 repeated VolumeMount; ports=5 repeated Port; restart_policy=6 string; "
                     "privileged=7 bool; managed_volumes=8 repeated ManagedVolumeSpec",
    "VolumeMount": "host_path=1 string; container_path=2 string; read_only=3 bool",
    "Port": "host_port=1 int32; container_port=2 int32; protocol=3 string",
    "ComposeSpec": "source_type=1 string; git_repo=2 string; git_ref=3 string; inline_yaml=4 string; "
                   "env=5 map<string,string>",
    "VMSpec": "vcpus=1 int32; memory_mb=2 int64; disks=3 repeated DiskConfig; networks=4 repeated NetworkConfig; "
              "cloud_init=5 CloudInitConfig; os_image=6 string; managed_volumes=7 repeated ManagedVolumeSpec",
    "DiskConfig": "pool_name=1 string; size_gb=2 int64; mount_point=3 string",
    "NetworkConfig": "bridge=1 string; dhcp=2 bool; static_ip=3 string",
    "CloudInitConfig": "user_data=1 string; meta_data=2 string; network_config=3 string; vendor_data=4 string",
    "ManagedVolumeSpec": "name=1 string; driver=2 string; size_gb=3 int64; access_mode=4 string; fs_type=5 string; "
                         "mount_path=6 string; read_only=7 bool; retain_policy=8 string",
    "WorkloadUsageSnapshot": f"workload_id=1 string; type=2 string; cpu_percent=3 double; memory_bytes=4 int64; "
                             f"disk_read_bytes=5 int64; disk_write_bytes=6 int64; net_rx_bytes=7 int64; "
                             f"net_tx_bytes=8 int64; collected_at=9 {TS}; source=10 string",
    "ReasonDetail": f"code=1 string; message=2 string; last_transition=3 {TS}; next_retry_at=4 {TS}; retryable=5 bool",
    "WorkloadStatus": f"workload_id=1 string; state=2 string; failure_reason=3 FailureReason; message=4 string; "
                      f"last_transition=5 {TS}; reason=6 ReasonDetail; usage=7 WorkloadUsageSnapshot",
    "RetryWorkloadRequest": "workload_id=1 string",
    "RetryWorkloadResponse": "accepted=1 bool",
    "ListNodesRequest": "status=1 string",
    "ListNodesResponse": "nodes=1 repeated NodeView",
    "GetNodeRequest": "node_id=1 string",
    "GetNodeResponse": "node=1 NodeView",
    "NodeView": f"node_id=1 string; status=2 string; status_reason=3 string; status_updated_by=4 string; "
                f"status_updated_at=5 {TS}; last_heartbeat=6 {TS}; grpc_endpoint=7 string; total_cpu_cores=8 double; "
                f"available_cpu_cores=9 double; total_memory_mb=10 int64; available_memory_mb=11 int64; "
                f"supported_workload_types=12 repeated string; labels=13 map<string,string>",
    "ListWorkloadsRequest": "node_id=1 string; status=2 string",
    "ListWorkloadsResponse": "workloads=1 repeated WorkloadView",
    "GetWorkloadRequest": "workload_id=1 string",
    "GetWorkloadResponse": "workload=1 WorkloadView",
    "WorkloadView": f"workload_id=1 string; type=2 string; desired_state=3 string; status=4 string; "
                    f"assigned_node_id=5 string; revision_id=6 string; retry_attempts=7 int32; "
                    f"retry_max_attempts=8 int32; retry_next_at=9 {TS}; failure_reason=10 string; "
                    f"last_updated=11 {TS}; reason=12 ReasonDetail; usage=13 WorkloadUsageSnapshot",
    "GetClusterSummaryRequest": "",
    "GetClusterSummaryResponse": f"total_nodes=1 int32; ready_nodes=2 int32; not_ready_nodes=3 int32; "
                                 f"total_workloads=4 int32; running_workloads=5 int32; pending_workloads=6 int32; "
                                 f"failed_workloads=7 int32; deleted_workloads=8 int32; generated_at=9 {TS}",
    "AutomationSuggestion": f"suggestion_id=1 string; policy_id=2 string; policy_name=3 string; "
                            f"target_workload=4 string; action_type=5 AutomationActionType; desired_state=6 string; "
                            f"desired_replicas=7 int32; replica_delta=8 int32; reason=9 string; suggested_at=10 {TS}",
    "SubmitAutomationSuggestionRequest": "suggestion=1 AutomationSuggestion",
    "SubmitAutomationSuggestionResponse": f"accepted=1 bool; decision=2 string; reason=3 string; "
                                          f"applied_action=4 string; decided_at=5 {TS}",
    "ControlMessage": "register=1 RegisterNodeRequest; heartbeat=2 HeartbeatRequest; apply=3 ApplyWorkloadRequest; "
                      "delete=4 DeleteWorkloadRequest",
}
CONTROL_ONEOFS = {"WorkloadSpec": {"workload": {"container", "compose", "vm"}},
                  "ControlMessage": {"message": {"register", "heartbeat", "apply", "delete"}}}
CONTROL_ENUMS = {
    "FailureReason": "FAILURE_REASON_UNSPECIFIED=0 IMAGE_PULL_FAILED=1 IMAGE_NOT_FOUND=2 INSUFFICIENT_RESOURCES=3 "
                     "INVALID_SPEC=4 RUNTIME_ERROR=5 NETWORK_ERROR=6 STORAGE_ERROR=7 VM_BOOT_FAILED=8",
    "AutomationActionType": "AUTOMATION_ACTION_TYPE_UNSPECIFIED=0 AUTOMATION_ACTION_SET_DESIRED_STATE=1 "
                            "AUTOMATION_ACTION_RETRY_WORKLOAD=2 AUTOMATION_ACTION_DELETE_WORKLOAD=3 "
                            "AUTOMATION_ACTION_SCALE_REPLICAS=4",
}
CONTROL_RPCS = {name: (f"{name}Request", f"{name}Response", "unary") for name in
                ("RegisterNode", "Heartbeat", "ApplyWorkload", "DeleteWorkload", "RetryWorkload",
                 "SubmitAutomationSuggestion", "ListNodes", "GetNode", "ListWorkloads", "GetWorkload",
                 "GetClusterSummary")}
CONTROL_RPCS["ControlStream"] = ("ControlMessage", "ControlMessage", "bidi")

SCALARS = {"string": FieldDescriptor.TYPE_STRING, "bool": FieldDescriptor.TYPE_BOOL,
           "int32": FieldDescriptor.TYPE_INT32, "int64": FieldDescriptor.TYPE_INT64,
           "double": FieldDescriptor.TYPE_DOUBLE}


def _parse(row: str) -> dict[str, tuple[int, str]]:
    out = {}
    for item in filter(None, (x.strip() for x in row.split(";"))):
        name_num, typ = item.split(" ", 1)
        name, num = name_num.split("=")
        out[name] = (int(num), typ)
    return out


def _type_of(f: FieldDescriptor, package: str) -> str:
    """The field's type in the tables' notation."""
    def one(t: FieldDescriptor) -> str:
        if t.type == FieldDescriptor.TYPE_MESSAGE:
            full = t.message_type.full_name
        elif t.type == FieldDescriptor.TYPE_ENUM:
            full = t.enum_type.full_name
        else:
            return next(k for k, v in SCALARS.items() if v == t.type)
        return full[len(package) + 1:] if full.startswith(package + ".") else full

    if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
        k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return f"map<{one(k)},{one(v)}>"
    repeated = f.is_repeated
    return ("repeated " if repeated else "") + one(f)


def _check(api: protos.Api, package: str, messages: dict[str, str], oneofs: dict, enums: dict[str, str],
           rpcs: dict, service: str) -> None:
    fd = api.file
    assert fd.package == package
    raw = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(raw)
    assert raw.syntax == "proto3"
    assert set(fd.message_types_by_name) == set(messages), "messages differ from the contract"
    for name, row in messages.items():
        md: Descriptor = fd.message_types_by_name[name]
        want = _parse(row)
        got = {f.name: (f.number, _type_of(f, package)) for f in md.fields}
        assert got == want, f"{package}.{name}"
        real_oneofs = {o.name: {f.name for f in o.fields} for o in md.oneofs
                       if not (len(o.fields) == 1 and o.fields[0].has_presence and o.name.startswith("_"))}
        assert real_oneofs == oneofs.get(name, {}), f"{package}.{name} oneofs"
    assert set(fd.enum_types_by_name) == set(enums)
    for name, row in enums.items():
        ed = fd.enum_types_by_name[name]
        want_values = {v.split("=")[0]: int(v.split("=")[1]) for v in row.split()}
        assert {v.name: v.number for v in ed.values} == want_values, f"{package}.{name}"
    assert list(fd.services_by_name) == [service]
    sd = fd.services_by_name[service]
    assert sd.full_name == f"{package}.{service}"
    got_rpcs = {}
    for m in sd.methods:
        kind = "bidi" if m.client_streaming and m.server_streaming else (
            "unary" if not (m.client_streaming or m.server_streaming) else "other")
        got_rpcs[m.name] = (m.input_type.full_name, m.output_type.full_name, kind)
    assert got_rpcs == {k: (f"{package}.{a}", f"{package}.{b}", kind) for k, (a, b, kind) in rpcs.items()}


def test_agent_descriptors_match_the_contract() -> None:
    api = protos.agent()
    assert api.file.name == "persys/agent/v1/agent.proto"
    _check(api, "persys.agent.v1", AGENT_MESSAGES, AGENT_ONEOFS, AGENT_ENUMS, AGENT_RPCS, "AgentService")


def test_control_descriptors_match_the_contract() -> None:
    api = protos.control()
    assert api.file.name == "persys/control/v1/control.proto"
    assert [d.name for d in api.file.dependencies] == ["google/protobuf/timestamp.proto"]
    _check(api, "persys.control.v1", CONTROL_MESSAGES, CONTROL_ONEOFS, CONTROL_ENUMS, CONTROL_RPCS, "AgentControl")


def test_wire_bytes_are_the_contracts_numbers() -> None:
    """Field numbers as they go on the wire: a hand-encoded message decodes to the contract's fields."""
    A = protos.agent()
    # field 3 (revision_id), wire type 2, "r1"; field 4 (desired_state), varint 2 (STOPPED)
    req = A.ApplyWorkloadRequest.FromString(bytes([0x1A, 2]) + b"r1" + bytes([0x20, 2]))
    assert req.revision_id == "r1" and req.desired_state == A.DESIRED_STATE_STOPPED
    C = protos.control()
    # control ApplyWorkloadRequest: revision_id is field 10 (tag 0x52), desired_state 11 (tag 0x5A)
    req2 = C.ApplyWorkloadRequest.FromString(bytes([0x52, 2]) + b"r2" + bytes([0x5A, 7]) + b"Stopped")
    assert (req2.revision_id, req2.desired_state) == ("r2", "Stopped")
    assert C.HeartbeatRequest().timestamp.__class__.__name__ == "Timestamp"


def test_pool_names_carry_the_package_path_beside_an_etcd_like_bare_name() -> None:
    """A bare ``agent.proto`` registered by someone else in the default pool does not clash with ours."""
    code = (
        "from google.protobuf import descriptor_pb2, descriptor_pool\n"
        "f = descriptor_pb2.FileDescriptorProto(name='agent.proto', package='etcdserverpb', syntax='proto3')\n"
        "f.message_type.add(name='ApplyWorkloadRequest')\n"
        "descriptor_pool.Default().Add(f)\n"
        "from fornax_sched.persys import protos\n"
        "print(protos.agent().ApplyWorkloadRequest(id='x').id, protos.control().file.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["x", "persys/control/v1/control.proto"]


def test_a_service_served_and_called_through_the_helpers() -> None:
    """handler() and Stub() over a real grpc.aio server on loopback; a method left out answers UNIMPLEMENTED."""
    A = protos.agent()

    class Impl:
        async def HealthCheck(self, request, context):  # noqa: N802 - the RPC's name
            return A.HealthCheckResponse(healthy=True, version="t", runtime_status={"container": "healthy"})

    async def go() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((protos.handler(A.service("AgentService"), Impl()),))
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = protos.Stub(ch, A.service("AgentService"))
                r = await stub.HealthCheck(A.HealthCheckRequest(), timeout=5)
                assert r.healthy and r.runtime_status["container"] == "healthy"
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.ListActions(A.ListActionsRequest(), timeout=5)
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(0)

    run(go(), timeout=30)
