"""A fornax-node registering with a real AgentControl server: capabilities, heartbeats, NOT_FOUND, drain, backoff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fornax_sched.persys import protos
from fornax_sched.persys.register import Registrar, backoff
from tests.helpers import eventually, free_port, run

from .agentproc import A, agent_node, agent_stub, container_req, status
from .control_server import ControlServer

C = protos.control()


def test_registers_heartbeats_and_registers_again_when_forgotten(tmp_path: Path) -> None:
    port = free_port()

    async def go() -> None:
        server = await ControlServer(port).start()
        n, addr = agent_node(tmp_path, "agent-reg", ["--persys-scheduler", f"127.0.0.1:{port}", "--cpus", "2",
                                                     "--mem", "512M", "--labels", "zone=a"])
        try:
            reg = await eventually(lambda: _first(server.registrations), timeout=10)
            assert reg.node_id == "agent-reg" and reg.grpc_endpoint == addr
            assert reg.capabilities.cpu_total_millicores == 2000 and reg.capabilities.memory_total_mb == 512
            assert list(reg.capabilities.supported_workload_types) == ["container"]
            assert dict(reg.labels) == {"zone": "a"} and reg.agent_version.startswith("fornax-node ")
            assert reg.timestamp.seconds > 1.7e9
            async with agent_stub(addr) as stub:
                await stub.ApplyWorkload(container_req("hb-1", resources=A.ResourceLimits(memory_bytes=64 << 20)),
                                         timeout=5)

                async def reported():
                    for hb in reversed(server.heartbeats):
                        st = {s.workload_id: s for s in hb.workload_statuses}
                        if "hb-1" in st and st["hb-1"].state == "Running":
                            return hb
                    return None
                hb = await eventually(reported, timeout=10)
                assert hb.node_id == "agent-reg" and hb.usage.memory_allocated_mb == 64
                assert 0 <= hb.usage.memory_used_mb <= 512 and hb.usage.disk_used_gb >= 0
                assert "hb-1" in [u.workload_id for u in hb.workload_usage]
                assert [u.type for u in hb.workload_usage if u.workload_id == "hb-1"] == ["container"]

            # The scheduler restarts knowing nothing: a heartbeat gets NOT_FOUND (or UNAVAILABLE in the
            # gap, then a backoff) and the node registers again.
            await server.stop()
            server = await ControlServer(port).start()
            again = await eventually(lambda: _first(server.registrations), timeout=15)
            assert again.node_id == "agent-reg"
            await eventually(lambda: _first(server.heartbeats), timeout=10)
        finally:
            await server.stop()
            assert n.stop() == 0

    run(go(), timeout=90)


def test_drain_refuses_applies_but_answers_the_rest(tmp_path: Path) -> None:
    port = free_port()

    async def go() -> None:
        server = await ControlServer(port).start()
        n, addr = agent_node(tmp_path, "agent-drain", ["--persys-scheduler", f"127.0.0.1:{port}"])
        try:
            async with agent_stub(addr) as stub:
                await stub.ApplyWorkload(container_req("d-1"), timeout=5)
                await eventually(lambda: _first(server.heartbeats), timeout=10)
                server.drain = True

                tries: list[str] = []

                async def refused():  # (a probe may still be taken before the next heartbeat says drain)
                    tries.append(f"probe-{len(tries)}")
                    r = await stub.ApplyWorkload(container_req(tries[-1]), timeout=5)
                    return r if not r.applied else None
                r = await eventually(refused, timeout=10)
                assert r.message == "node is draining"
                assert (await status(stub, "d-1")).id == "d-1"
                ids = [w.id for w in (await stub.ListWorkloads(A.ListWorkloadsRequest(), timeout=5)).workloads]
                assert "d-1" in ids and tries[-1] not in ids
                assert (await stub.DeleteWorkload(A.DeleteWorkloadRequest(id="d-1"), timeout=5)).success
                server.drain = False

                async def taken():
                    r = await stub.ApplyWorkload(container_req("d-3"), timeout=5)
                    return r.applied
                await eventually(taken, timeout=10)
        finally:
            await server.stop()
            assert n.stop() == 0

    run(go(), timeout=60)


def test_backoff_is_exponential_jittered_and_capped() -> None:
    assert [backoff(n, lambda: 1.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert [backoff(n, lambda: 0.0) for n in range(7)] == [0.5, 1, 2, 4, 8, 15, 15]
    assert backoff(10_000, lambda: 1.0) == 30


def test_a_scheduler_away_is_retried_with_growing_waits(tmp_path: Path) -> None:
    """The real client against a loopback port nobody serves: UNAVAILABLE, and the waits double up to the cap."""
    waits: list[float] = []

    class Enough(BaseException):  # (not an Exception: the loop goes on through those)
        pass

    async def sleep(s: float) -> None:
        waits.append(s)
        if len(waits) == 8:
            raise Enough

    facts = SimpleNamespace(name="n1", labels={}, cpus=1, mem=1 << 30)
    r = Registrar(None, facts, f"127.0.0.1:{free_port()}", "127.0.0.1:50051",  # type: ignore[arg-type]
                  state=str(tmp_path), rand=lambda: 1.0, sleep=sleep, timeout=2.0)

    async def go() -> None:
        await r.start()
        assert r._task is not None
        with pytest.raises(Enough):
            await r._task
        await r.stop()

    run(go(), timeout=60)
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30] and not r.registered


@pytest.mark.parametrize("args, why", [
    (["--persys-scheduler", "127.0.0.1:1"], "--persys-scheduler needs --persys"),
    (["--persys", "0.0.0.0:0", "--persys-scheduler", "127.0.0.1:1", "--insecure"], "give --persys-advertise"),
    (["--persys", "nonsense"], "--persys: bad address 'nonsense'"),
])
def test_bad_persys_options_are_refused_at_start(tmp_path: Path, args: list[str], why: str) -> None:
    out = subprocess.run([sys.executable, "-m", "fornax_sched.node.cli", "serve", "--name", "x", "--images",
                          str(tmp_path), "--state", str(tmp_path / "s"), "--listen", f"tcp!127.0.0.1!{free_port()}",
                          *args], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and why in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


async def _first(items: list) -> object:
    return items[-1] if items else None
