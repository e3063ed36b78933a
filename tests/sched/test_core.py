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
    assert d.node is None and "no node fits mem>=8G: 3 too small (it asks for more than any node offers" in d.reason
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


def plain_why_not(c: Cluster, req: Request, skip: frozenset[str] = frozenset()) -> str:
    need = req.constraints()
    cpus, mem = max(n.facts.cpus for n in c.nodes.values()), max(n.facts.mem for n in c.nodes.values())
    if req.cpus > cpus + 1e-9 or req.mem > mem:  # too big for any node, down, cordoned or not
        return (f"no node fits{' ' + need if need else ''}: {len(c.nodes)} too small "
                "(it asks for more than any node offers)")
    counts = {"down": 0, "cordoned": 0, "filtered": 0, "full": 0, "avoid": 0, "excluded": 0}
    for n in c.nodes.values():
        why = ("excluded" if n.name in skip else "down" if n.status != "online" else "cordoned" if n.cordoned else
               "filtered" if not req.allows(n.facts) else "full" if not n.room_for(req) else "avoid")
        counts[why] += 1
    parts = [f"{v} {k}" for k, v in counts.items() if v]
    return f"no node fits{' ' + need if need else ''}: " + ", ".join(parts)


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
    def node_counts_match_nodes(self) -> None:
        """What /metrics shows of nodes by kind and status is kept as they change: it matches a count."""
        want: dict[tuple[str, str], int] = {}
        for n in self.c.nodes.values():
            want[(n.facts.kind, n.status)] = want.get((n.facts.kind, n.status), 0) + 1
        assert self.c.counts == want

    @invariant()
    def index_matches_nodes(self) -> None:
        c = self.c
        for key, ix in [(None, c._index), *c._labelled.items()]:
            want = sorted(n for n, st_ in c.nodes.items() if key is None or st_.facts.labels.get(key[0]) == key[1])
            indexed = list(ix.names())
            assert sorted(indexed) == want and ix.size == len(want), key
            for klass, counts in ix.buckets.items():
                for count, bucket in counts.items():
                    room = ix.room[(klass, count)]
                    for name in bucket:
                        n = c.nodes[name]
                        assert len(n.containers) == count and n.klass == klass
                        # the bound never hides room a node has
                        assert room[0] + 1e-9 >= n.facts.cpus - n.used_cpus and room[1] >= n.facts.mem - n.used_mem
            assert ix.down == sum(1 for n in want if c.nodes[n].status != "online")
            assert ix.cordoned == sum(1 for n in want if c.nodes[n].status == "online" and c.nodes[n].cordoned)

    @rule(cpus=st.sampled_from([0, 0.5, 1, 2, 8]), zone=st.sampled_from(["", "east", "north"]),
          skip=st.sets(st.sampled_from(["n1", "n2", "n3", "n9"]), max_size=2))
    def decisions_are_the_best_there_is(self, cpus: float, zone: str, skip: set[str]) -> None:
        c = self.c
        req = Request("img", cpus=cpus, labels=(("zone", zone),) if zone else ())
        d = c.decide_builtin("probe", req, exclude=skip)
        feasible = [n for n in c.nodes.values() if c.feasible(n, req) and n.name not in skip]
        if d.node is None:
            assert not feasible, (d.reason, [n.name for n in feasible])
            assert d.reason.startswith("no node fits") or d.reason == "no nodes"
            counted = sum(int(w.split()[0]) for w in d.reason.split(": ", 1)[1].split(", ")) if c.nodes else 0
            assert counted == len(c.nodes), d.reason
            if c.nodes:  # counted as the plain way does: each node under its first reason
                want = plain_why_not(c, req, frozenset(skip))
                assert d.reason == want, (d.reason, want)
        else:  # the best, and of equals the first by name
            pack = c.policy.base == "pack"
            key = {n.name: (n.klass, -len(n.containers) if pack else len(n.containers), n.name) for n in feasible}
            assert d.node in key and key[d.node] == min(key.values()), (d, key)

    @rule(data=st.data())
    def a_draft_changes_nothing(self, data: st.DataObject) -> None:
        c = self.c

        def snapshot() -> object:
            return ({n: (st_.status, st_.cordoned, sorted(st_.containers), round(st_.used_cpus, 6), st_.used_mem)
                     for n, st_ in c.nodes.items()},
                    {n: (p.node, p.reason, p.request) for n, p in c.placements.items()}, c._index.down,
                    c._index.cordoned)

        before = snapshot()
        with c.draft():
            for i in range(data.draw(st.integers(0, 6))):
                what = data.draw(st.sampled_from(["place", "forget", "cordon", "lost", "evacuate", "rebalance"]))
                if what == "place":
                    c.place(f"draft-{i}", Request("img", cpus=data.draw(st.sampled_from([0, 0.5, 1]))))
                elif what == "forget" and c.placements:
                    c.forget(data.draw(st.sampled_from(sorted(c.placements))))
                elif what in ("cordon", "lost", "evacuate") and c.nodes:
                    node = data.draw(st.sampled_from(sorted(c.nodes)))
                    if what == "cordon":
                        c.cordon(node)
                    elif what == "lost":
                        c.node_lost(node)
                    else:
                        c.evacuate(node)
                elif what == "rebalance":
                    c.rebalance(3)
        assert snapshot() == before
        self.index_matches_nodes()

Machine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestCoreStateMachine = Machine.TestCase
