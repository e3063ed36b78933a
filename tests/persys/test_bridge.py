"""The scheduler's side of the Persys bridge, end to end: a real `fornax-sched serve` over two Fornax
nodes (9P) and two fornax-nodes reached only over gRPC (one through --agent, one registered through
the scheduler's AgentControl): the seed acceptance with the killed node once an agent and once a
Fornax node, migrate across kinds, cordon telling an agent to drain, AgentControl's client half and
its registration rules, and a lease that runs out."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from ..node.cluster import ctl as node_ctl
from ..node.cluster import eventually, read
from ..sched.harness import ctl, placement, running_on
from .agentproc import agent_node, agent_stub, container_req, state_name, status
from .mixed import C, Mixed, all_online, control_stub, mixed_cluster

pytestmark = pytest.mark.slow


async def running_at(m: Mixed, name: str, node: str) -> bool:
    """Whether ``node`` itself (over its own protocol) says it runs ``name``."""
    if node in m.endpoints:
        async with agent_stub(m.endpoints[node]) as stub:
            try:
                return state_name(await status(stub, name)) == "RUNNING"
            except grpc.aio.AioRpcError:
                return False
    return name in await running_on(m.node(node))


async def place_on(m: Mixed, node: str, words: str = "hello") -> str:
    """A place that lands on ``node`` with no constraint to keep it there (the others cordoned meanwhile)."""
    others = [n for n in ("agent-01", "agent-02", "fornax-01", "fornax-02", *m.extra) if n != node]
    for n in others:
        await ctl(m.sched.addr, f"cordon {n}")
    reply = await ctl(m.sched.addr, f"place {words}")
    for n in others:
        await ctl(m.sched.addr, f"uncordon {n}")
    assert f"node={node} status=running" in reply, reply
    return reply.split()[0]


async def moved_off(m: Mixed, name: str, old: str, timeout: float = 15) -> str:
    async def check() -> str | None:
        p = await placement(m.sched.addr, name)
        return p["node"] if p["node"] not in (old, "-") and p["status"] == "running" else None

    node = await eventually(check, timeout)
    await eventually(lambda: running_at(m, name, node), 10)
    return node


def test_mixed_cluster_an_agent_killed_evacuate_migrate_and_cordon(tmp_path: Path) -> None:
    with mixed_cluster(tmp_path) as m:
        async def go() -> None:
            kinds = await all_online(m)
            assert kinds == {"agent-01": "persys", "agent-02": "persys", "fornax-01": "fornax", "fornax-02": "fornax"}
            assert (await read(m.sched.addr, "cluster/nodes/agent-01/addr")).startswith(
                f"persys!{m.endpoints['agent-01']}!name=agent-01")
            assert await place_on(m, "agent-01") == "hello-1"
            assert await running_at(m, "hello-1", "agent-01")  # a real container of that node, under the name

            m.node("agent-01").kill9()
            there = await moved_off(m, "hello-1", "agent-01")
            log = await read(m.sched.addr, "cluster/scheduler/log")
            assert "node agent-01 dead" in log and f"re-place hello-1: -> {there}" in log

            await ctl(m.sched.addr, f"evacuate {there}")
            await moved_off(m, "hello-1", there)

            # migrate from a Fornax node to an agent and back
            await place_on(m, "fornax-01", "hello name=mig")
            reply = await ctl(m.sched.addr, "migrate mig fornax-01 agent-02")
            assert (await placement(m.sched.addr, "mig"))["node"] == "agent-02", reply
            await eventually(lambda: running_at(m, "mig", "agent-02"), 20)
            assert "mig" not in await running_on(m.node("fornax-01"))
            await ctl(m.sched.addr, "migrate mig agent-02 fornax-02")
            await eventually(lambda: running_at(m, "mig", "fornax-02"), 20)

            async def gone_from_agent() -> bool:
                async with agent_stub(m.endpoints["agent-02"]) as stub:
                    try:
                        await status(stub, "mig")
                    except grpc.aio.AioRpcError as e:
                        return "not found" in (e.details() or "")
                return False

            await eventually(gone_from_agent, 10)

            # a cordoned agent is told to drain in its next heartbeat: it then refuses applies
            await ctl(m.sched.addr, "cordon agent-02")

            async def draining() -> bool:
                async with agent_stub(m.endpoints["agent-02"]) as stub:
                    r = await stub.ApplyWorkload(container_req("probe"), timeout=5)
                    return not r.applied and "draining" in r.message

            await eventually(draining, 10)
            assert "cordoned" in await read(m.sched.addr, "cluster/nodes/agent-02/status")

        asyncio.run(asyncio.wait_for(go(), 120))


def test_mixed_cluster_a_fornax_node_killed_and_agentcontrol_clients(tmp_path: Path) -> None:
    with mixed_cluster(tmp_path) as m:
        async def go() -> None:
            await all_online(m)
            await place_on(m, "fornax-01", "hello name=f1")
            m.node("fornax-01").kill9()
            await moved_off(m, "f1", "fornax-01")

            async with grpc.aio.insecure_channel(m.control) as ch:
                stub = control_stub(ch)
                spec = C.WorkloadSpec(type="container", resources=C.ResourceRequirements(cpu_millicores=100,
                                                                                         memory_mb=64),
                                      container=C.ContainerSpec(image="hello", env={"MODE": "a b", "GREETING": "hi"}))
                r = await stub.ApplyWorkload(C.ApplyWorkloadRequest(workload_id="web-a", spec=spec,
                                                                    desired_state="Running"), timeout=20)
                assert r.success, r.error_message
                w = (await stub.GetWorkload(C.GetWorkloadRequest(workload_id="web-a"), timeout=5)).workload
                assert w.status == "Running" and w.desired_state == "Running" and w.assigned_node_id and w.revision_id
                assert await running_at(m, "web-a", w.assigned_node_id)
                log = await read(m.sched.addr, "cluster/scheduler/log")
                assert "place web-a (place hello cpu>=0.1 mem>=64M name=web-a env:GREETING=hi 'env:MODE=a b')" \
                    in log  # a ctl command's line
                text = await read(m.sched.addr, "cluster/scheduler/placements/web-a")
                assert "\nenv.GREETING=hi\nenv.MODE=a b\n" in text, text
                fornax = C.WorkloadSpec(container=C.ContainerSpec(image="hello", env={"FORNAX_NODE": "x"}))
                bad_env = await stub.ApplyWorkload(C.ApplyWorkloadRequest(workload_id="web-e", spec=fornax), timeout=20)
                assert not bad_env.success and "FORNAX_ variables are set by the node" in bad_env.error_message

                bad = await stub.ApplyWorkload(C.ApplyWorkloadRequest(
                    workload_id="web-b", spec=C.WorkloadSpec(container=C.ContainerSpec(image="nope"))), timeout=20)
                assert not bad.success and bad.failure_reason == C.INVALID_SPEC and "nope" in bad.error_message
                vm = await stub.ApplyWorkload(C.ApplyWorkloadRequest(
                    workload_id="vm-1", spec=C.WorkloadSpec(type="vm", vm=C.VMSpec(vcpus=1))), timeout=5)
                assert not vm.success and vm.failure_reason == C.INVALID_SPEC and "vm" in vm.error_message

                stopped = await stub.ApplyWorkload(C.ApplyWorkloadRequest(workload_id="web-a", spec=spec,
                                                                          desired_state="Stopped"), timeout=20)
                assert stopped.success
                assert (await placement(m.sched.addr, "web-a"))["status"] == "stopped"
                assert (await stub.RetryWorkload(C.RetryWorkloadRequest(workload_id="web-a"), timeout=20)).accepted
                assert not (await stub.RetryWorkload(C.RetryWorkloadRequest(workload_id="nobody"), timeout=5)).accepted

                scale = await stub.SubmitAutomationSuggestion(C.SubmitAutomationSuggestionRequest(
                    suggestion=C.AutomationSuggestion(target_workload="web-a", desired_replicas=3,
                                                      action_type=C.AUTOMATION_ACTION_SCALE_REPLICAS)), timeout=20)
                assert scale.accepted and scale.applied_action == "scale web-a 3", scale.reason

                async def views() -> Any:
                    nodes = (await stub.ListNodes(C.ListNodesRequest(), timeout=5)).nodes
                    by = {n.node_id: n for n in nodes}
                    return by if by.get("fornax-01") and by["fornax-01"].status == "NotReady" else None

                by = await eventually(views, 10)
                assert set(by) == {"agent-01", "agent-02", "fornax-01", "fornax-02"}
                assert by["agent-02"].status == "Ready" and by["agent-02"].grpc_endpoint == m.endpoints["agent-02"]
                assert by["agent-02"].last_heartbeat.seconds > 0 and by["agent-02"].total_cpu_cores > 0
                summary = await stub.GetClusterSummary(C.GetClusterSummaryRequest(), timeout=5)
                assert summary.total_nodes == 4 and summary.ready_nodes == 3 and summary.total_workloads >= 4

                gone = await stub.DeleteWorkload(C.DeleteWorkloadRequest(workload_id="f1"), timeout=20)
                assert gone.success
                assert not (await stub.DeleteWorkload(C.DeleteWorkloadRequest(workload_id="f1"), timeout=5)).success

                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.RegisterNode(C.RegisterNodeRequest(node_id="agent-09", grpc_endpoint=""), timeout=5)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grpc_endpoint" in str(e.value.details())
                far = await stub.RegisterNode(C.RegisterNodeRequest(node_id="agent-09", grpc_endpoint="10.9.9.9:50051"),
                                              timeout=5)
                assert not far.accepted and "loopback" in far.reason  # plain gRPC off loopback: not without mTLS
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Heartbeat(C.HeartbeatRequest(node_id="agent-09"), timeout=5)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND

        asyncio.run(asyncio.wait_for(go(), 120))


def test_a_lease_that_runs_out_makes_the_node_dead_until_it_heartbeats(tmp_path: Path) -> None:
    """An agent whose AgentService still answers, but that stops heartbeating: dead when its lease (3 s)
    runs out, its container placed again; alive once it heartbeats again."""
    with mixed_cluster(tmp_path) as m:
        node, endpoint = agent_node(tmp_path, "agent-03")
        try:
            async def go() -> None:
                await all_online(m)
                async with grpc.aio.insecure_channel(m.control) as ch:
                    stub = control_stub(ch)
                    reg = await stub.RegisterNode(C.RegisterNodeRequest(
                        node_id="agent-03", grpc_endpoint=endpoint,
                        capabilities=C.NodeCapabilities(cpu_total_millicores=2000, memory_total_mb=2048)), timeout=5)
                    assert reg.accepted and reg.heartbeat_interval_seconds == 1
                    assert reg.lease_expires_at.seconds > 0

                    async def online() -> bool:
                        await stub.Heartbeat(C.HeartbeatRequest(node_id="agent-03"), timeout=5)
                        return (await read(m.sched.addr, "cluster/nodes/agent-03/status")).strip() == "online"

                    await eventually(online, 15, 0.5)
                    m.extra.append("agent-03")
                    await place_on(m, "agent-03", "hello name=l1")
                    await moved_off(m, "l1", "agent-03", timeout=10)  # no more heartbeats: the lease runs out
                    log = await read(m.sched.addr, "cluster/scheduler/log")
                    assert "node agent-03 dead" in log and "lease expired" in log
                    await eventually(online, 10, 0.5)
                    # Silent again, dead again, and forgotten: its lease goes with it, so its next heartbeat
                    # is NOT_FOUND (an agent registers again then), and a registration brings it back.

                    async def dead() -> bool:
                        return (await read(m.sched.addr, "cluster/nodes/agent-03/status")).strip() == "dead"

                    await eventually(dead, 10, 0.5)
                    assert await ctl(m.sched.addr, "forget agent-03") == "agent-03 forgotten\n"
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.Heartbeat(C.HeartbeatRequest(node_id="agent-03"), timeout=5)
                    assert e.value.code() == grpc.StatusCode.NOT_FOUND
                    reg = await stub.RegisterNode(C.RegisterNodeRequest(
                        node_id="agent-03", grpc_endpoint=endpoint,
                        capabilities=C.NodeCapabilities(cpu_total_millicores=2000, memory_total_mb=2048)), timeout=5)
                    assert reg.accepted
                    await eventually(online, 15, 0.5)

            asyncio.run(asyncio.wait_for(go(), 90))
        finally:
            node.stop()


def test_agent_options_are_checked(tmp_path: Path) -> None:
    import subprocess
    import sys

    for args, words in ((["--agent", "nohost"], "--agent nohost: bad address"),
                        (["--agent", "127.0.0.1:1,cpus=x"], "'cpus=x'"),
                        (["--control", "10.1.2.3:8085"], "plain gRPC is allowed on a loopback address only"),
                        (["--agent", "10.1.2.3:50051"], "--agent 10.1.2.3:50051: plain gRPC"),
                        (["--tls-ca", "/nonexistent"], "go together")):
        out = subprocess.run([sys.executable, "-m", "fornax_sched", "serve", "--state", str(tmp_path), *args],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and words in out.stdout, (args, out.stdout, out.stderr)
        assert len(out.stdout.strip().splitlines()) == 1


def test_the_four_kinds_of_drift_on_both_kinds_of_node(tmp_path: Path) -> None:
    """Made behind the scheduler's back, each seen in /cluster/scheduler/drift and remedied (an orphan
    left alone): on agent-01 a workload applied by hand (orphan), one re-applied with another revision,
    one whose container is destroyed (missing), one stopped (state); on fornax-01 a container run by hand,
    one destroyed, one stopped.  (The agents' own reconcile every 3 s, so that the scheduler sees the
    destroyed container missing before the agent runs it again.)"""
    with mixed_cluster(tmp_path, agent_extra=["--persys-reconcile", "3"]) as m:
        async def go() -> None:
            await all_online(m)
            a1, f1 = m.node("agent-01"), m.node("fornax-01")
            for name in ("rev", "gone", "halt"):
                await place_on(m, "agent-01", f"hello name={name}")
            for name in ("fgone", "fhalt"):
                await place_on(m, "fornax-01", f"hello name={name}")
            async with agent_stub(m.endpoints["agent-01"]) as stub:
                assert (await stub.ApplyWorkload(container_req("stray"), timeout=5)).applied
                assert (await stub.ApplyWorkload(container_req("rev", revision="by-hand"), timeout=5)).applied
                ids = {n: (await status(stub, n)).metadata["container_id"] for n in ("gone", "halt")}
            await node_ctl(a1.addr, "cluster/ctl", f"destroy {ids['gone']}")
            await node_ctl(a1.addr, "cluster/ctl", f"stop {ids['halt']}")
            fids = await running_on(f1)
            await node_ctl(f1.addr, "cluster/ctl", f"destroy {fids['fgone']}")
            await node_ctl(f1.addr, "cluster/ctl", f"stop {fids['fhalt']}")
            await node_ctl(f1.addr, "cluster/ctl", "run hello name=fstray")

            want = {("orphan_on_agent", "agent-01", "stray"), ("revision_mismatch", "agent-01", "rev"),
                    ("missing_on_agent", "agent-01", "gone"), ("state_mismatch", "agent-01", "halt"),
                    ("orphan_on_agent", "fornax-01", "fstray"), ("missing_on_agent", "fornax-01", "fgone"),
                    ("state_mismatch", "fornax-01", "fhalt")}

            async def drift_now() -> set[tuple[str, ...]]:
                text = await read(m.sched.addr, "cluster/scheduler/drift")
                return {tuple(line.split()[:3]) for line in text.splitlines()[1:]}

            gone = ("missing_on_agent", "agent-01", "gone")

            async def seen() -> bool:
                got = await drift_now()
                if not want - {gone} <= got:
                    raise AssertionError(f"not yet in drift: {sorted(want - {gone} - got)}")
                return True

            await eventually(seen, 20, 0.2)
            # A destroyed container is missing only until the agent's next reconcile runs it again, which
            # may come at once after the destroy (its timer runs apart): destroyed again until seen missing.
            for _ in range(5):
                deadline = asyncio.get_running_loop().time() + 4
                while gone not in await drift_now() and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.1)
                if gone in await drift_now():
                    break
                async with agent_stub(m.endpoints["agent-01"]) as stub:
                    cid = (await status(stub, "gone")).metadata.get("container_id")
                if cid:
                    await node_ctl(a1.addr, "cluster/ctl", f"destroy {cid}")
            assert gone in await drift_now(), "the destroyed container was never seen missing"
            for name, node in (("rev", "agent-01"), ("gone", "agent-01"), ("halt", "agent-01"),
                               ("fgone", "fornax-01"), ("fhalt", "fornax-01")):
                await eventually(lambda name=name, node=node: running_at(m, name, node), 20)  # remedied
            async with agent_stub(m.endpoints["agent-01"]) as stub:
                st = await status(stub, "rev")
                assert st.revision_id != "by-hand"  # re-applied with the placement's revision
                assert state_name(await status(stub, "stray")) == "RUNNING"  # an orphan is left alone
            assert "fstray" in await running_on(f1)

            async def resolved() -> bool:
                text = await read(m.sched.addr, "cluster/scheduler/drift")
                open_ = {tuple(line.split()[:3]) for line in text.splitlines()[1:] if "resolved=" not in line}
                return open_ == {("orphan_on_agent", "agent-01", "stray"), ("orphan_on_agent", "fornax-01", "fstray")}

            await eventually(resolved, 20, 0.2)
            log = await read(m.sched.addr, "cluster/scheduler/log")
            assert "drift revision_mismatch on agent-01: rev" in log and "drift orphan_on_agent on fornax-01" in log

        asyncio.run(asyncio.wait_for(go(), 120))


def test_mtls_between_the_scheduler_and_its_agents_and_a_client_with_no_certificate_refused(
        tmp_path: Path) -> None:
    from fornax_sched.persys import tls

    from .certs import CA

    ca = CA(tmp_path / "ca")
    sched_pair, node_pair, client_pair = ca.issue("scheduler"), ca.issue("agent"), ca.issue("client")

    def opts(pair: Any) -> list[str]:
        return ["--tls-ca", str(ca.path), "--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]

    with mixed_cluster(tmp_path, extra=opts(sched_pair), agent_extra=opts(node_pair)) as m:
        async def go() -> None:
            await all_online(m)  # agent-01 dialled over mTLS, agent-02 registered over mTLS
            await place_on(m, "agent-02", "hello name=t1")
            files = tls.load(ca.path, client_pair.cert, client_pair.key)
            assert files is not None
            async with grpc.aio.secure_channel(m.control, tls.channel_credentials(files)) as ch:
                r = await control_stub(ch).GetWorkload(C.GetWorkloadRequest(workload_id="t1"), timeout=5)
                assert r.workload.assigned_node_id == "agent-02" and r.workload.status == "Running"
            no_cert = grpc.ssl_channel_credentials(root_certificates=ca.path.read_bytes())
            for creds in (no_cert, None):
                ch = grpc.aio.secure_channel(m.control, creds) if creds else grpc.aio.insecure_channel(m.control)
                async with ch:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await control_stub(ch).ListNodes(C.ListNodesRequest(), timeout=3)
                    assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        asyncio.run(asyncio.wait_for(go(), 90))
