"""fornax-node as a Persys agent: the contract's behaviour list, through a real grpc client.

One real node process per module (``--persys`` on loopback); each test uses
workload ids of its own.  What the agent says is checked against what the
node's own 9P tree shows: the same containers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.helpers import eventually, run
from tests.node.cluster import NodeProc, ctl, read
from tests.node.cluster import status as kv

from .agentproc import A, agent_node, agent_stub, container_req, state_name, status


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProc, str]]:
    n, addr = agent_node(tmp_path_factory.mktemp("agent"))
    yield n, addr
    assert n.stop() == 0


async def _until(stub, wid: str, state: str, timeout: float = 10.0):
    async def check():
        st = await status(stub, wid)
        return st if state_name(st) == state else None
    return await eventually(check, timeout=timeout, interval=0.02)


async def _node_status(node: NodeProc, cid: str) -> dict[str, str]:
    return kv(await read(node.addr, f"cluster/containers/{cid}/status"))


def test_apply_is_queued_then_runs_and_the_same_revision_is_skipped(node: tuple[NodeProc, str]) -> None:
    n, addr = node

    async def go() -> None:
        async with agent_stub(addr) as stub:
            r = await stub.ApplyWorkload(container_req("web-1", "r1", env={"GREETING": "hi"},
                                                       labels={"team": "a"}), timeout=5)
            assert r.applied and not r.skipped and r.message == "task pending execution"
            assert state_name(r.status) == "PENDING"
            assert re.fullmatch(r"apply-web-1-\d{19}", r.status.metadata["task_id"]), r.status.metadata
            assert r.status.metadata["task_status"] == "pending"
            st = await _until(stub, "web-1", "RUNNING")
            assert (st.revision_id, st.desired_state, st.type) == ("r1", A.DESIRED_STATE_RUNNING,
                                                                   A.WORKLOAD_TYPE_CONTAINER)
            assert st.created_at > 1.7e9 and st.updated_at >= st.created_at
            cid = st.metadata["container_id"]
            # The same container in the node's own tree, named and labelled after the workload.
            seen = await _node_status(n, cid)
            assert seen["name"] == "web-1" and seen["state"] == "running"
            assert seen["label.persys.agent/workload"] == "web-1" and seen["label.persys.agent/revision"] == "r1"
            assert seen["label.team"] == "a" and seen["env"] == "GREETING"
            assert st.usage.workload_id == "web-1" and st.usage.memory_bytes >= 0 and st.usage.source

            again = await stub.ApplyWorkload(container_req("web-1", "r1", env={"GREETING": "hi"},
                                                           labels={"team": "a"}), timeout=5)
            assert again.applied and again.skipped and state_name(again.status) == "RUNNING"
            assert (await status(stub, "web-1")).metadata["container_id"] == cid

            listed = await stub.ListWorkloads(A.ListWorkloadsRequest(type=A.WORKLOAD_TYPE_CONTAINER), timeout=5)
            assert "web-1" in [w.id for w in listed.workloads]
            everything = await stub.ListWorkloads(A.ListWorkloadsRequest(), timeout=5)
            assert "web-1" in [w.id for w in everything.workloads]
            for t in (A.WORKLOAD_TYPE_COMPOSE, A.WORKLOAD_TYPE_VM):
                assert not (await stub.ListWorkloads(A.ListWorkloadsRequest(type=t), timeout=5)).workloads

    run(go(), timeout=60)


def test_desired_state_alone_starts_and_stops_a_new_revision_recreates(node: tuple[NodeProc, str]) -> None:
    n, addr = node

    async def go() -> None:
        async with agent_stub(addr) as stub:
            await stub.ApplyWorkload(container_req("svc", "r1"), timeout=5)
            cid1 = (await _until(stub, "svc", "RUNNING")).metadata["container_id"]
            # Same revision, desired stopped: the same container is stopped, not replaced.
            r = await stub.ApplyWorkload(container_req("svc", "r1", running=False), timeout=5)
            assert r.applied and not r.skipped
            st = await _until(stub, "svc", "STOPPED")
            assert st.metadata["container_id"] == cid1 and st.message == "stopped by request"
            assert (await _node_status(n, cid1))["state"] == "stopped"
            skipped = await stub.ApplyWorkload(container_req("svc", "r1", running=False), timeout=5)
            assert skipped.skipped
            # Desired running again: started (a new process of the same spec).
            await stub.ApplyWorkload(container_req("svc", "r1"), timeout=5)
            cid2 = (await _until(stub, "svc", "RUNNING")).metadata["container_id"]
            assert cid2 != cid1
            # A new revision: the old container is destroyed and a new one runs, with the new args.
            await stub.ApplyWorkload(container_req("svc", "r2", args=("two",)), timeout=5)

            async def recreated():
                st = await status(stub, "svc")
                return st if state_name(st) == "RUNNING" and st.revision_id == "r2" else None
            st = await eventually(recreated, timeout=10, interval=0.02)
            cid3 = st.metadata["container_id"]
            assert cid3 not in (cid1, cid2)
            listing = await read(n.addr, "cluster/self/containers")
            assert f"id {cid2}\n" not in listing and f"id {cid3}\n" in listing
            assert (await _node_status(n, cid3))["label.persys.agent/revision"] == "r2"
            log = await eventually(lambda: read(n.addr, f"cluster/containers/{cid3}/log"), timeout=5)
            assert "args: two" in log

    run(go(), timeout=60)


def test_delete_is_queued_then_the_workload_is_not_found(node: tuple[NodeProc, str]) -> None:
    n, addr = node

    async def go() -> None:
        async with agent_stub(addr) as stub:
            await stub.ApplyWorkload(container_req("gone", "r1"), timeout=5)
            cid = (await _until(stub, "gone", "RUNNING")).metadata["container_id"]
            d = await stub.DeleteWorkload(A.DeleteWorkloadRequest(id="gone"), timeout=5)
            assert d.success and d.message == "task pending execution"

            async def not_found():
                try:
                    await status(stub, "gone")
                except grpc.aio.AioRpcError as e:
                    return e
                return None
            e = await eventually(not_found, timeout=10, interval=0.02)
            assert e.code() == grpc.StatusCode.UNKNOWN and "not found" in e.details()
            assert f"id {cid}\n" not in await read(n.addr, "cluster/self/containers")
            again = await stub.DeleteWorkload(A.DeleteWorkloadRequest(id="gone"), timeout=5)
            assert again.success and "not found" in again.message
            acts = (await stub.ListActions(A.ListActionsRequest(workload_id="gone"), timeout=5)).actions
            assert [(a.action_type, a.status) for a in acts] == [("apply_workload", "completed"),
                                                                 ("delete_workload", "completed")]
            assert all(a.created_at <= a.started_at <= a.ended_at for a in acts) and acts[0].created_at > 1.7e9
            assert acts[1].task_id.startswith("delete-gone-")

    run(go(), timeout=60)


def test_unknown_workload_is_an_rpc_error_saying_not_found(node: tuple[NodeProc, str]) -> None:
    async def go() -> None:
        async with agent_stub(node[1]) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await status(stub, "never-was")
            assert e.value.code() == grpc.StatusCode.UNKNOWN and "not found" in e.value.details()

    run(go(), timeout=30)


def test_specs_it_cannot_run_are_refused_in_the_reply(node: tuple[NodeProc, str]) -> None:
    async def go() -> None:
        async with agent_stub(node[1]) as stub:
            compose = A.ApplyWorkloadRequest(id="c1", type=A.WORKLOAD_TYPE_COMPOSE, revision_id="r",
                                             spec=A.WorkloadSpec(compose=A.ComposeSpec(project_name="p")))
            vm = A.ApplyWorkloadRequest(id="v1", type=A.WORKLOAD_TYPE_VM, revision_id="r",
                                        spec=A.WorkloadSpec(vm=A.VMSpec(name="v", vcpus=1)))
            cases = [
                (compose, "compose workloads are not supported"),
                (vm, "vm workloads are not supported"),
                (container_req("x1", image="nosuch"), "unknown image 'nosuch'"),
                (container_req("x2", command=["/bin/true"]), "command is not supported"),
                (container_req("x3", ports=[A.PortMapping(host_port=80, container_port=80)]), "ports"),
                (container_req("", "r"), "workload id is required"),
                (container_req("bad id"), "bad workload id"),
                (container_req("x4", env={"FORNAX_NODE": "x"}), "FORNAX_ variables"),
                (container_req("x5", resources=A.ResourceLimits(memory_bytes=1000)), "below 1M"),
                (container_req("x6", restart_policy=A.RestartPolicy(policy="sometimes")), "unknown restart policy"),
                (container_req("x7", labels={"persys.agent/revision": "x"}), "the agent's own"),
            ]
            for req, why in cases:
                r = await stub.ApplyWorkload(req, timeout=5)
                assert not r.applied and why in r.message, (req.id, r.message)
                assert "\n" not in r.message
            ids = [w.id for w in (await stub.ListWorkloads(A.ListWorkloadsRequest(), timeout=5)).workloads]
            assert not {"c1", "v1", "x1", "x2", "x3", "x4", "x5", "x6", "x7"} & set(ids)

    run(go(), timeout=30)


def test_resources_map_onto_the_nodes_limits(node: tuple[NodeProc, str]) -> None:
    n, addr = node

    async def go() -> None:
        async with agent_stub(addr) as stub:
            req = container_req("lim", resources=A.ResourceLimits(cpu_shares=512, memory_bytes=64 << 20))
            await stub.ApplyWorkload(req, timeout=5)
            cid = (await _until(stub, "lim", "RUNNING")).metadata["container_id"]
            seen = await _node_status(n, cid)
            assert (seen["cpus"], seen["mem"]) == ("0.5", "64M")

    run(go(), timeout=30)


def test_health_reports_runtimes_and_real_utilization(node: tuple[NodeProc, str]) -> None:
    async def go() -> None:
        async with agent_stub(node[1]) as stub:
            h = await stub.HealthCheck(A.HealthCheckRequest(), timeout=5)
            assert h.healthy and h.version.startswith("fornax-node ")
            assert h.runtime_status["container"] == "healthy"
            assert h.runtime_status["compose"].startswith("unhealthy: ")
            assert h.runtime_status["vm"].startswith("unhealthy: ")
            assert set(h.runtime_status) == {"container", "compose", "vm"}
            for v in (h.memory_utilization, h.cpu_utilization, h.disk_utilization):
                assert 0.0 <= v <= 100.0
            assert h.memory_utilization > 0 and h.disk_utilization > 0  # a real machine uses some of both

    run(go(), timeout=30)


def test_list_actions_filters_orders_and_limits(node: tuple[NodeProc, str]) -> None:
    async def go() -> None:
        async with agent_stub(node[1]) as stub:
            for rev in ("a", "b", "c"):
                await stub.ApplyWorkload(container_req("hist", rev), timeout=5)

            async def done():
                acts = (await stub.ListActions(A.ListActionsRequest(workload_id="hist"), timeout=5)).actions
                return acts if len(acts) == 3 and all(a.status == "completed" for a in acts) else None
            acts = await eventually(done, timeout=15, interval=0.05)
            assert [a.action_type for a in acts] == ["apply_workload"] * 3
            ids = [a.task_id for a in acts]
            newest = await stub.ListActions(A.ListActionsRequest(workload_id="hist", newest_first=True, limit=2),
                                            timeout=5)
            assert [a.task_id for a in newest.actions] == ids[::-1][:2]
            assert (await status(stub, "hist")).revision_id == "c"
            only = await stub.ListActions(A.ListActionsRequest(workload_id="hist", action_type="delete_workload"),
                                          timeout=5)
            assert not only.actions
            failed = await stub.ListActions(A.ListActionsRequest(status="failed", workload_id="hist"), timeout=5)
            assert not failed.actions
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ListActions(A.ListActionsRequest(action_type="launch"), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "action_type" in e.value.details()

    run(go(), timeout=60)


def test_a_failed_container_is_failed_and_restarted_by_its_policy(node: tuple[NodeProc, str]) -> None:
    async def go() -> None:
        async with agent_stub(node[1]) as stub:
            # web's http.server exits 1 on a port that is not a number.
            req = container_req("crash", image="web", args=("notaport",),
                                restart_policy=A.RestartPolicy(policy="on-failure", max_retry_count=2))
            await stub.ApplyWorkload(req, timeout=5)

            async def reconciled_twice():
                acts = (await stub.ListActions(A.ListActionsRequest(workload_id="crash", action_type="reconcile"),
                                               timeout=5)).actions
                return acts if len(acts) == 2 and acts[-1].status != "pending" and acts[-1].status != "running" \
                    else None
            await eventually(reconciled_twice, timeout=15, interval=0.05)
            st = await _until(stub, "crash", "FAILED")
            assert "exit code" in st.message and st.metadata["state"] == "failed"
            r = await stub.ApplyWorkload(req, timeout=5)  # failed: a full re-apply, not a skip
            assert r.applied and not r.skipped

    run(go(), timeout=60)


def test_restart_adopts_workloads_and_reconcile_recreates_a_missing_container(tmp_path: Path) -> None:
    n, addr = agent_node(tmp_path, "agent-r")
    try:
        async def go() -> None:
            async with agent_stub(addr) as stub:
                await stub.ApplyWorkload(container_req("keep", "r1"), timeout=5)
                cid = (await _until(stub, "keep", "RUNNING")).metadata["container_id"]
            n.kill9()
            n.start()
            async with agent_stub(addr) as stub:
                st = await _until(stub, "keep", "RUNNING")
                assert st.metadata["container_id"] == cid and st.revision_id == "r1"
                # Destroyed behind the agent's back, through the node's own ctl: reconcile runs it again.
                await ctl(n.addr, "cluster/ctl", f"destroy {cid}")

                async def again():
                    st = await status(stub, "keep")
                    return st if state_name(st) == "RUNNING" and st.metadata["container_id"] != cid else None
                await eventually(again, timeout=10, interval=0.05)
                acts = (await stub.ListActions(A.ListActionsRequest(workload_id="keep"), timeout=5)).actions
                assert [a.action_type for a in acts] == ["reconcile"] and acts[0].status == "completed"

        run(go(), timeout=60)
    finally:
        assert n.stop() == 0
