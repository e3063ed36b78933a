"""The hooks the metrics plug into, each on its own: a 9P error counted by the sans-IO session, a
ctl refusal counted by verb and result in a real scheduler, a gRPC code counted on both ends of a
real call, and the counts the state keeps as it changes (drafts undone included)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from fornax_sched.fs import codec as M
from fornax_sched.fs.session import Config
from fornax_sched.persys import protos
from fornax_sched.sched.backends import CLUSTER as SIMULATED
from fornax_sched.sched.control import ControlServer, ControlService
from fornax_sched.sched.metrics import SchedMetrics
from fornax_sched.sched.plans import CommandError
from fornax_sched.sched.service import Scheduler
from fornax_sched.sched.store import open_store

from ..fs.test_session import Peer, drive, tree
from ..helpers import free_port, run


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of an exposition (labels in any order), None if absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        got = dict(kv.split("=", 1) for kv in head[len(name) + 1:-1].split(",")) if "{" in head else {}
        if {k: v.strip('"') for k, v in got.items()} == labels:
            return float(value)
    return None


def test_the_session_tells_each_request_its_operation_and_result() -> None:
    seen: list[tuple[str, str, float]] = []
    ticks = iter(range(0, 1000, 2))  # each request takes "2 seconds" of this clock
    p = Peer(Config(lambda ctx, aname: tree(), observe=lambda op, res, s: seen.append((op, res, s)),
                    clock=lambda: float(next(ticks))))
    p.handshake()
    assert isinstance(p.rpc(M.Twalk(1, 0, 5, ("no-such-file",))), M.Rerror)
    p.open(2, "wait")
    p.send(M.Tread(10, 2, 0, 100))  # waits: told when it ends
    assert [(op, res) for op, res, _ in seen] == [("version", "ok"), ("attach", "ok"), ("walk", "error"),
                                                  ("walk", "ok"), ("open", "ok")]
    p.finish(1)
    assert seen[-1][:2] == ("read", "ok") and seen[-1][2] > 0
    p.open(3, "wait")
    p.send(M.Tread(11, 3, 0, 100))
    p.rpc(M.Tflush(12, 11))
    assert seen[-1][:2] == ("read", "flushed")
    for work in p.work.values():  # (the flushed read's coroutine, run out: its reply is not wanted)
        drive(work)
    assert seen[-1][:2] == ("read", "flushed")  # (and not told again)
    assert all(s == 2.0 for op, _, s in seen if op != "read")


def test_a_hook_that_fails_never_fails_the_request() -> None:
    def broken(op: str, result: str, seconds: float) -> None:
        raise RuntimeError("metrics bug")

    p = Peer(Config(lambda ctx, aname: tree(), observe=broken))
    p.handshake()
    p.open(1, "now")
    reply = p.rpc(M.Tread(2, 1, 0, 100))
    assert isinstance(reply, M.Rread) and reply.data == b"now\n"


def test_ctl_commands_are_counted_by_verb_and_result(tmp_path: Path) -> None:
    async def main() -> str:
        SIMULATED.add("hook-a")
        store = await open_store(str(tmp_path / "sched.db"))
        sched = Scheduler(store, seeds=["sim!hook-a"], interval=0.2)
        metrics = SchedMetrics()
        metrics.watch(sched)
        await sched.start()
        try:
            for _ in range(100):
                if sched.state.cluster.counts.get(("sim", "online")):
                    break
                await asyncio.sleep(0.05)
            await sched.command("place hello name=web replicas=2")
            for bad in ("cordon no-such-node", "cordon no-such-node", "bogus words", "place"):
                with pytest.raises(CommandError):
                    await sched.command(bad)
            return (await metrics.render()).decode()
        finally:
            await sched.close()
            await store.close()

    text = run(main())
    assert sample(text, "fornax_sched_ctl_commands_total", verb="place", result="ok") == 1
    assert sample(text, "fornax_sched_ctl_commands_total", verb="cordon", result="refused") == 2
    assert sample(text, "fornax_sched_ctl_commands_total", verb="invalid", result="refused") == 1
    assert sample(text, "fornax_sched_ctl_commands_total", verb="place", result="refused") == 1
    assert sample(text, "fornax_sched_ctl_command_duration_seconds_count", verb="cordon") == 2
    assert (sample(text, "fornax_sched_decision_duration_seconds_count", kind="rules") or 0) >= 2
    assert (sample(text, "fornax_sched_store_commits_total", store="sqlite", result="ok") or 0) >= 1
    assert (sample(text, "fornax_sched_node_polls_total", result="ok") or 0) >= 1
    assert sample(text, "fornax_sched_placements", status="running") == 2
    assert sample(text, "fornax_sched_nodes", kind="sim", status="online") == 1
    assert "bogus" not in text and "no-such-node" not in text  # nothing a user typed becomes a label


def test_grpc_calls_are_counted_by_method_and_code_on_both_ends(tmp_path: Path) -> None:
    async def main() -> str:
        store = await open_store(str(tmp_path / "sched.db"))
        sched = Scheduler(store, interval=0.2)
        metrics = SchedMetrics()
        metrics.watch(sched)
        await sched.start()
        server = ControlServer(ControlService(sched), f"127.0.0.1:{free_port()}", observe=metrics.grpc_in)
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        try:
            stub = protos.Stub(channel, protos.control().service("AgentControl"), metrics.grpc_out)
            C = protos.control()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.RegisterNode(C.RegisterNodeRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await stub.ListNodes(C.ListNodesRequest(), timeout=10)
            return (await metrics.render()).decode()
        finally:
            await channel.close()
            await server.stop()
            await sched.close()
            await store.close()

    text = run(main())
    svc = "persys.control.v1.AgentControl"
    for side in ("server", "client"):
        name = f"fornax_sched_grpc_{side}_handled_total"
        assert sample(text, name, grpc_service=svc, grpc_method="RegisterNode", grpc_code="INVALID_ARGUMENT") == 1
        assert sample(text, name, grpc_service=svc, grpc_method="ListNodes", grpc_code="OK") == 1
        assert sample(text, f"fornax_sched_grpc_{side}_handling_seconds_count", grpc_service=svc,
                      grpc_method="ListNodes") == 1


def test_the_counts_the_state_keeps_match_a_count_of_the_records_through_drafts() -> None:
    from fornax_sched.sched.model import NodeFacts, Request
    from fornax_sched.sched.state import State, request_to_json

    st = State()
    r = request_to_json(Request(image="hello"))

    def row(status: str, node: str | None = None) -> dict[str, object]:
        return {"request": r, "node": node, "reason": "", "group": "g", "status": status}

    def check() -> None:
        assert st.statuses == dict(Counter(x.status for x in st.records.values()))
        assert st.cluster.counts == dict(Counter((n.facts.kind, n.status) for n in st.cluster.nodes.values()))

    st.apply([("nodes", "n1", {"addr": "a", "cpus": 4, "mem": 1 << 30, "kind": "sim"})])
    st.cluster.set_status("n1", "online")
    st.apply([("placements", f"p{i}", row("running", "n1")) for i in range(5)])
    check()
    with st.draft():
        st.apply([("placements", "p0", row("stopped", "n1")), ("placements", "p9", row("pending")),
                  ("placements", "p1", None)])
        st.cluster.set_status("n1", "suspect")
        st.cluster.add_node(NodeFacts("n2", 2, 1 << 30, {}, "fornax"), "online")
        check()
    check()
    assert st.statuses == {"running": 5} and st.cluster.counts == {("sim", "online"): 1}
    st.apply([("placements", "p0", None), ("placements", "p1", row("failed", "n1"))])
    st.apply([("nodes", "n1", None)])
    check()
    assert st.statuses == {"running": 3, "failed": 1} and st.cluster.counts == {}


def test_a_failing_lua_policy_tells_its_fallback_and_its_decisions_are_timed_by_kind() -> None:
    from fornax_sched.policy import LuaProgram, Platform

    from ..policy.conftest import PLAIN, decide_body, small_cluster

    cluster = small_cluster()
    kinds: list[str] = []
    cluster.observe_decisions(lambda kind, s: kinds.append(kind), lambda: 0.0)
    reasons: list[str] = []
    with Platform() as platform, LuaProgram(decide_body("error('x')"), platform=platform) as p:
        p.start()
        p.on_fallback = reasons.append
        cluster.set_program(p)
        cluster.policy_kind = "lua"
        d = cluster.decide("a", PLAIN)
        assert d.reason.startswith("platform: ")  # the platform policy decided in its place
        cluster.set_program(None)
        cluster.decide("b", PLAIN)
    assert reasons == ["error"] and kinds == ["lua", "rules"]
    m = SchedMetrics()
    m.fallback("error")
    assert sample(run(m.render()).decode(), "fornax_sched_policy_fallbacks_total", reason="error") == 1


def test_the_served_exposition_is_made_a_family_at_a_time_letting_the_loop_go_between() -> None:
    """What GET /metrics serves is the same text as prometheus-client's whole exposition, but the loop runs other
    work between metric families (a 9P read waits for one slice of a scrape, not all of it)."""
    import re

    m = SchedMetrics()
    for i in range(50):
        m.ninep("read", "ok", 0.001 * i)
        m.ctl("place", "ok", 0.002 * i)

    async def main() -> tuple[bytes, int]:
        turns = 0

        async def other() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(other())
        await asyncio.sleep(0)
        served = await m.render(slice_s=0.0)
        t.cancel()
        return served, turns

    served, turns = run(main())
    changing = re.compile(rb"^(process_|python_gc|fornax_sched_metrics_render|fornax_sched_gc_pause).*\n?", re.M)
    assert changing.sub(b"", served) == changing.sub(b"", generate_latest(m.registry))  # all at once
    families = served.count(b"# TYPE ")
    assert families > 10 and turns >= families - 1, (families, turns)
