"""The deciding core: examples, and a hypothesis state machine for its invariants."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fornax_sched.sched.core import Cluster
from fornax_sched.sched.lang import parse_place, parse_policy
from fornax_sched.sched.model import NodeFacts, Request

G = 1 << 30


def cluster(n: int = 3, policy: str = "spread", cpus: float = 4, mem: int = 4 * G) -> Cluster:
    c = Cluster(parse_policy(policy))
    for i in range(1, n + 1):
        c.add_node(NodeFacts(f"fornax-{i:02d}", cpus, mem, {"zone": "east" if i % 2 else "west"}))
    return c


def test_spread_and_pack() -> None:
    c = cluster()
    got = [c.place(f"s{i}", Request("hello")).node for i in range(6)]
    assert sorted(got) == ["fornax-01", "fornax-01", "fornax-02", "fornax-02", "fornax-03", "fornax-03"]
    p = cluster(policy="pack")
    assert {p.place(f"p{i}", Request("hello", cpus=1)).node for i in range(4)} == {"fornax-01"}
    assert p.place("p4", Request("hello", cpus=1)).node == "fornax-02"  # fornax-01 is full


def test_constraints_filter() -> None:
    c = cluster()
    assert c.place("a", parse_place(["web", "zone=west"])).node == "fornax-02"
    assert c.place("b", parse_place(["web", "node!=fornax-0[12]"])).node == "fornax-03"
    assert c.place("c", parse_place(["web", "anti-affinity=a"])).node != "fornax-02"
    d = c.place("d", parse_place(["web", "mem>=8G"]))
    assert d.node is None and "no node fits mem>=8G: 3 full" in d.reason
    assert c.placements["d"].node is None


def test_affinity_and_anti_affinity_rules() -> None:
    c = cluster(4, "pack\naffinity zone=west\nanti-affinity web-* spread")
    assert c.place("x", Request("hello")).node == "fornax-02"  # affinity first, then pack
    webs = [c.place(f"web-{i}", Request("web")).node for i in range(4)]
    assert webs[:2] == ["fornax-02", "fornax-04"]  # spread apart within zone=west
    assert sorted(webs[2:]) == ["fornax-02", "fornax-04"]  # affinity ranks before anti-affinity
    c.set_policy(parse_policy("anti-affinity web-* spread"))
    assert c.place("web-9", Request("web")).node in ("fornax-01", "fornax-03")  # the nodes with none


def test_dead_node_evacuate_and_pending() -> None:
    c = cluster(2, cpus=1)
    c.place("a", Request("hello", cpus=1))
    c.place("b", Request("hello", cpus=1))
    assert c.place("c", Request("hello", cpus=1)).node is None
    lost = c.node_lost("fornax-01")
    assert len(lost) == 1
    assert all(d.node is None for d in c.retry_pending())  # nowhere to go yet
    c.add_node(NodeFacts("fornax-03", 2, 4 * G))
    assert {d.node for d in c.retry_pending()} == {"fornax-03"}
    assert c.pending() == []
    moves = c.evacuate("fornax-03")
    assert all(d.node is None for d in moves)  # fornax-02 is full: nowhere to move
    assert {p.name for p in c.pending()} == {d.name for d in moves}


def test_rebalance_is_bounded_and_converges() -> None:
    c = cluster(1)
    for i in range(6):
        c.place(f"w{i}", Request("hello"))
    c.add_node(NodeFacts("fornax-02", 4, 4 * G))
    c.add_node(NodeFacts("fornax-03", 4, 4 * G))
    assert len(c.rebalance(2)) == 2
    c.rebalance(100)
    assert sorted(len(n.containers) for n in c.nodes.values()) == [2, 2, 2]
    assert c.rebalance(100) == []


class Machine(RuleBasedStateMachine):
    """Random clusters and operations; the invariants of the issue must always hold."""

    def __init__(self) -> None:
        super().__init__()
        self.c = Cluster()
        self.n = 0
        self.evacuated: set[str] = set()

    @rule(cpus=st.integers(1, 4), mem=st.integers(1, 4), zone=st.sampled_from(["east", "west"]))
    def join(self, cpus: int, mem: int, zone: str) -> None:
        self.n += 1
        self.c.add_node(NodeFacts(f"n{self.n}", cpus, mem * G, {"zone": zone}))
        before = {p.name for p in self.c.pending()}
        for d in self.c.retry_pending():
            assert d.node is None or d.name in before
        # a pending container that fits the new node is placed now
        for p in self.c.pending():
            n = self.c.nodes[f"n{self.n}"]
            assert not self.c.feasible(n, p.request), (p, n)

    @rule(cpus=st.sampled_from([0, 0.5, 1, 2]), mem=st.sampled_from([0, G // 2, G]),
          zone=st.sampled_from(["", "east"]), avoid=st.booleans())
    def place(self, cpus: float, mem: int, zone: str, avoid: bool) -> None:
        self.made = getattr(self, "made", 0) + 1
        name = f"c{self.made}"
        req = Request("img", cpus=cpus, mem=mem, labels=(("zone", zone),) if zone else (),
                      avoid=("c1*",) if avoid else ())
        d = self.c.place(name, req)
        assert (d.node is None) == (self.c.placements[name].node is None)

    @precondition(lambda self: self.c.nodes)
    @rule(data=st.data())
    def die(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.c.nodes)))
        self.c.node_lost(node)
        self.c.retry_pending()
        assert not self.c.nodes[node].containers

    @precondition(lambda self: self.c.nodes)
    @rule(data=st.data())
    def evacuate(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.c.nodes)))
        for d in self.c.evacuate(node):
            assert self.c.placements[d.name].node == d.node  # moved, or pending if nowhere to go
        assert not self.c.nodes[node].containers
        self.evacuated.add(node)

    @precondition(lambda self: self.c.placements)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        self.c.forget(data.draw(st.sampled_from(sorted(self.c.placements))))

    @rule(moves=st.integers(0, 5))
    def rebalance(self, moves: int) -> None:
        assert len(self.c.rebalance(moves)) <= moves

    @invariant()
    def capacity_never_exceeded(self) -> None:
        for n in self.c.nodes.values():
            cpus = sum(self.c.placements[p].request.cpus for p in n.containers)
            mem = sum(self.c.placements[p].request.mem for p in n.containers)
            assert cpus <= n.facts.cpus + 1e-9 and mem <= n.facts.mem
            assert abs(cpus - n.used_cpus) < 1e-6 and mem == n.used_mem

    @invariant()
    def each_container_in_one_place(self) -> None:
        seen: dict[str, str] = {}
        for n in self.c.nodes.values():
            for p in n.containers:
                assert p not in seen, f"{p} on {seen[p]} and {n.name}"
                seen[p] = n.name
        for p in self.c.placements.values():
            assert p.node == seen.get(p.name)

    @invariant()
    def nothing_on_unusable_nodes_gets_new_work(self) -> None:
        for name in self.evacuated:
            n = self.c.nodes[name]
            assert n.cordoned and not n.containers

    @invariant()
    def index_matches_nodes(self) -> None:
        indexed = [name for counts in self.c._index.values() for b in counts.values() for name in b]
        assert sorted(indexed) == sorted(self.c.nodes)
        for klass, counts in self.c._index.items():
            for count, bucket in counts.items():
                for name in bucket:
                    assert len(self.c.nodes[name].containers) == count and self.c.nodes[name].klass == klass


Machine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestCoreStateMachine = Machine.TestCase
