"""The scheduler's Persys backend against a scripted AgentService (a real grpc.aio server on loopback):
retries of transient failures with the same id and revision, refusals not retried, timeouts with the
agent's actions in the text, the missing-on-agent grace window, and how soon a ready workload is seen."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from fornax_sched.persys import protos
from fornax_sched.sched.backends import NodeRefused, NodeUnreachable, Spec
from fornax_sched.sched.backends.persys import Options, PersysAgent

from ..helpers import eventually, free_port, run

A = protos.agent()


@dataclass
class Scripted:
    """An AgentService whose answers the test sets: ``fail`` codes first, then ``reply``."""

    fail: list[grpc.StatusCode] = field(default_factory=list)
    reply: Any = None
    state: int = A.ACTUAL_STATE_RUNNING
    pending_looks: int = 0  # status looks answered PENDING before ``state``
    missing: bool = False
    applies: list[Any] = field(default_factory=list)
    looks: list[float] = field(default_factory=list)
    server: grpc.aio.Server | None = None
    addr: str = ""

    async def start(self) -> Scripted:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((protos.handler(A.service("AgentService"), self),))
        self.addr = f"127.0.0.1:{free_port()}"
        self.server.add_insecure_port(self.addr)
        await self.server.start()
        return self

    async def ApplyWorkload(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.applies.append(request)
        if self.fail:
            await context.abort(self.fail.pop(0), "scripted failure")
        return self.reply or A.ApplyWorkloadResponse(applied=True, message="task pending execution")

    async def GetWorkloadStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.looks.append(time.monotonic())
        if not self.applies:
            await context.abort(grpc.StatusCode.UNKNOWN, f"workload {request.id} not found")
        last = self.applies[-1]
        st = A.WorkloadStatus(id=request.id, revision_id=last.revision_id, actual_state=self.state,
                              message="scripted")
        if self.pending_looks > 0:
            self.pending_looks -= 1
            st.actual_state = A.ACTUAL_STATE_PENDING
        if self.missing:
            st.actual_state = A.ACTUAL_STATE_UNKNOWN
            st.metadata["state"] = "missing"
        return A.GetWorkloadStatusResponse(status=st)

    async def ListWorkloads(self, request: Any, context: Any) -> Any:  # noqa: N802
        st = (await self.GetWorkloadStatus(A.GetWorkloadStatusRequest(id="w-1"), context)).status
        return A.ListWorkloadsResponse(workloads=[st])

    async def ListActions(self, request: Any, context: Any) -> Any:  # noqa: N802
        return A.ListActionsResponse(actions=[A.AgentAction(action_type="apply_workload", status="failed",
                                                            error="image pull went wrong")])


def backend(s: Scripted, **kw: Any) -> PersysAgent:
    opts = Options(**{"rpc_timeout": 1.0, "apply_timeout": 2.0, "poll": 0.2, "backoff": 0.01, **kw})
    return PersysAgent(f"persys!{s.addr}!name=a1", options=opts)


SPEC = Spec("w-1", "hello").with_revision()


def test_transient_failures_are_retried_with_the_same_id_and_revision() -> None:
    async def go() -> None:
        s = await Scripted(fail=[grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]).start()
        b = backend(s)
        try:
            assert await b.run(SPEC) == "w-1"
            assert [(r.id, r.revision_id) for r in s.applies] == [("w-1", SPEC.revision)] * 3
            s.applies.clear()
            s.fail = [grpc.StatusCode.UNAVAILABLE] * 10  # more than the attempts: the node is unreachable
            with pytest.raises(NodeUnreachable, match="agent a1 at .*UNAVAILABLE"):
                await b.run(SPEC)
            assert len(s.applies) == 4
        finally:
            await b.close()
            await s.server.stop(0)  # type: ignore[union-attr]

    run(go(), 30)


def test_a_refusal_is_not_retried_and_a_failure_tells_the_agents_actions() -> None:
    async def go() -> None:
        s = await Scripted(reply=A.ApplyWorkloadResponse(applied=False, message="workload w-1: unknown image")).start()
        b = backend(s)
        try:
            with pytest.raises(NodeRefused, match="unknown image"):
                await b.run(SPEC)
            assert len(s.applies) == 1
            s.reply, s.state = None, A.ACTUAL_STATE_FAILED
            with pytest.raises(NodeRefused, match="failed: scripted.*image pull went wrong"):
                await b.run(SPEC)
            s.state, s.pending_looks = A.ACTUAL_STATE_RUNNING, 10_000  # never converges
            t = time.monotonic()
            with pytest.raises(NodeRefused, match=r"not running after 2s \(last ACTUAL_STATE_PENDING\).*image pull"):
                await b.run(SPEC)
            assert time.monotonic() - t < 4
        finally:
            await b.close()
            await s.server.stop(0)  # type: ignore[union-attr]

    run(go(), 30)


def test_a_start_refused_while_the_agent_drains_is_tried_again_not_failed() -> None:
    """An agent learns from its next heartbeat that it is no longer cordoned: a start refused with
    "node is draining" meanwhile is NodeUnreachable (the placement stays starting, the next look
    tries again), not a refusal of the spec (which would leave it failed)."""
    async def go() -> None:
        s = await Scripted(reply=A.ApplyWorkloadResponse(applied=False, message="node is draining")).start()
        b = backend(s)
        try:
            with pytest.raises(NodeUnreachable, match="node is draining"):
                await b.run(SPEC)
            assert len(s.applies) == 1
            s.reply = None  # the heartbeat came
            assert await b.run(SPEC) == "w-1"
        finally:
            await b.close()
            await s.server.stop(0)  # type: ignore[union-attr]

    run(go(), 30)


def test_a_ready_workload_is_seen_at_once_and_a_slow_one_polled_less_often() -> None:
    async def go() -> None:
        s = await Scripted().start()
        b = backend(s, poll=0.3)
        try:
            t = time.monotonic()
            await b.run(SPEC)
            assert time.monotonic() - t < 0.1 and len(s.looks) == 1
            s.looks.clear()
            s.pending_looks = 12
            await b.run(SPEC)
            gaps = [b2 - a for a, b2 in zip(s.looks, s.looks[1:], strict=False)]
            assert len(s.looks) == 13 and max(gaps) < 0.45 and gaps[-1] > 0.2 > gaps[0]  # backs off to the interval
        finally:
            await b.close()
            await s.server.stop(0)  # type: ignore[union-attr]

    run(go(), 30)


def test_missing_on_the_agent_is_left_to_its_reconcile_for_the_grace_window() -> None:
    async def go() -> None:
        s = await Scripted().start()
        b = backend(s, grace=0.5)
        try:
            await b.run(SPEC)
            s.missing = True
            first = await b.list()
            assert [(c.name, c.state) for c in first] == [("w-1", "created")] and "reconcile" in first[0].reason

            async def gone() -> bool:  # past the window: gone, for the scheduler to place again
                return await b.list() == []

            await eventually(gone, 3, 0.05)
        finally:
            await b.close()
            await s.server.stop(0)  # type: ignore[union-attr]

    run(go(), 30)

