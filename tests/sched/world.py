"""A synchronous world for the planners: a state, a store of rows, simulated nodes, a clock.

It drives the pure planners the way the service does (plan against the
state, commit the rows, apply them, then act on nodes and plan what acting
showed) but with no event loop, threads or I/O, so hypothesis can run
thousands of steps and check what must always hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fornax_sched.sched import plans, reconcile
from fornax_sched.sched.backends import CLUSTER_LABEL, NodeRefused, NoSuchContainer, SimState, Spec
from fornax_sched.sched.model import NodeFacts
from fornax_sched.sched.plans import Plan, Stop
from fornax_sched.sched.state import State

CLUSTER = "c0ffee"


class World:
    def __init__(self, nodes: int = 3, cpus: float = 2.0) -> None:
        self.state = State()
        self.store: dict[tuple[str, str], Any] = {}  # the committed rows
        self.acknowledged: set[str] = set()  # names a command answered with
        self.now = 1000.0
        self.nodes: dict[str, SimState] = {}
        self.down: set[str] = set()
        self.foreign: set[tuple[str, str]] = set()  # (node, id) of containers started by hand
        for i in range(nodes):
            name = f"n{i + 1}"
            self.nodes[name] = SimState(name, cpus=cpus, mem=8 << 30)
            self.commit(self._node_plan(name))
            self.state.set_status(name, "online")

    def _node_plan(self, name: str) -> Plan:
        st = self.nodes[name]
        plan = Plan(self.now)
        plan.put("nodes", name, {"addr": f"sim!{name}", "kind": "sim", "cpus": st.cpus, "mem": st.mem,
                                 "labels": {"zone": "a"}, "cordoned": False, "images": list(st.images)})
        return plan

    # ------------------------------------------------------------ the service's path
    def commit(self, plan: Plan) -> None:
        for table, key, value in plan.rows():
            if value is None:
                self.store.pop((table, key), None)
            else:
                self.store[(table, key)] = value
        self.state.apply(plan.rows())
        for node, status in plan.statuses:
            self.state.set_status(node, status)
        for node, names in plan.foreign.items():
            self.state.observe_foreign(node, names)

    def decide(self, planner: Callable[[State], Plan]) -> Plan:
        with self.state.cluster.draft():
            plan = planner(self.state)
        self.commit(plan)
        return plan

    def act(self, plan: Plan) -> None:
        for s in plan.stops:
            self._stop(s)
        for name in plan.starts:
            self._start(name)

    def _start(self, name: str) -> None:
        p = self.state.cluster.placements.get(name)
        r = self.state.records.get(name)
        if p is None or r is None or p.node is None or r.want != "run":
            return
        node = p.node
        if node in self.down:
            obs = plans.plan_unreachable(self.state, name, node, "down", self.now)
        else:
            spec = Spec(name, p.request.image, p.request.args, p.request.cpus, p.request.mem,
                        labels=((CLUSTER_LABEL, CLUSTER),)).with_revision()
            try:
                cid = self.nodes[node].run(spec)
            except NodeRefused as e:
                obs = plans.plan_refused(self.state, name, node, str(e), self.now)
            else:
                obs = plans.plan_started(self.state, name, node, cid, self.now)
        self.commit(obs)
        self.act(obs)

    def _stop(self, s: Stop) -> None:
        err = ""
        st = self.nodes.get(s.node)
        if st is None or s.node in self.down:
            err = "down"
        elif s.cid:
            assert (s.node, s.cid) not in self.foreign, f"the scheduler touched a container it did not place: {s}"
            try:
                c = st._get(s.cid)
                if c.alive:
                    c.state, c.reason = "stopped", "stopped by request"
                if s.destroy:
                    del st.containers[s.cid]
                    st.specs.pop(s.cid, None)
            except NoSuchContainer:
                pass
        obs = plans.plan_stopped(self.state, s, err, self.now)
        self.commit(obs)
        self.act(obs)

    # ------------------------------------------------------------ what the service's loops do
    def reconcile(self, node: str) -> None:
        if node in self.down:
            return
        listing = [c for c in self.nodes[node].containers.values()]
        plan = reconcile.plan_node(self.state, node, listing, cluster=CLUSTER, now=self.now, listed_at=self.now,
                                   busy=frozenset(), acted={})
        self.commit(plan)
        self.act(plan)

    def reconcile_all(self) -> None:
        for node in self.nodes:
            self.reconcile(node)

    def pending(self) -> None:
        plan = self.decide(lambda st: plans.plan_pending(st, self.now, "spread", lambda: True))
        self.act(plan)

    def node_dies(self, node: str) -> None:
        self.down.add(node)
        plan = self.decide(lambda st: plans.plan_node_dead(st, node, "test", self.now, "spread"))
        self.act(plan)

    def node_returns(self, node: str) -> None:
        self.down.discard(node)
        self.commit(Plan(self.now, statuses=[(node, "online")]))

    # ------------------------------------------------------------ facts for the invariants
    def ours_alive(self) -> dict[str, list[str]]:
        """Name -> the nodes where one of ours runs under it."""
        out: dict[str, list[str]] = {}
        for node, st in self.nodes.items():
            for c in st.containers.values():
                if c.alive and c.labels.get(CLUSTER_LABEL) == CLUSTER:
                    out.setdefault(c.name, []).append(node)
        return out

    def foreign_alive(self) -> set[str]:
        return {(node, cid) for node, cid in self.foreign
                if cid in self.nodes[node].containers and self.nodes[node].containers[cid].alive}

    def hand_start(self, node: str, name: str) -> None:
        st = self.nodes[node]
        cid = st.run(Spec(name, "hello"))  # no cluster label: not ours
        self.foreign.add((node, cid))

    def facts(self, name: str) -> NodeFacts:
        return self.state.cluster.nodes[name].facts
