"""The example policies in examples/policies load through the policy file's checks and do what they say."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from fornax_sched.policy import load_policy
from fornax_sched.sched.core import Cluster
from fornax_sched.sched.model import NodeFacts, Policy, Request

from .conftest import ROOT_DIR, small_cluster

G = 1 << 30
EXAMPLES = ROOT_DIR / "examples" / "policies"


@contextmanager
def active(name: str, cluster: Cluster) -> Iterator[Cluster]:
    """The example, loaded as the service loads a policy file, deciding for cluster."""
    loaded = load_policy((EXAMPLES / name).read_text(), cluster)
    assert loaded.program is not None
    cluster.set_policy(Policy())
    cluster.set_program(loaded.program)
    try:
        yield cluster
    finally:
        loaded.program.close()


def test_zone_spread() -> None:
    with active("zone-spread.lua", small_cluster()) as c:
        for i in range(3, 9):
            d = c.place(f"web-{i}", Request("web", cpus=0.5, mem=G))
            assert d.reason.startswith("policy: ") and "(zone " in d.reason
        c.place("db-1", Request("db", mem=G))
        assert c.program is not None and not c.program.last_failure  # type: ignore[attr-defined]
    webs = [p.node for p in c.placements.values() if p.request.image == "web"]
    zones = Counter(c.nodes[n].facts.labels["zone"] for n in webs if n)
    assert zones == {"east": 4, "west": 4}
    assert Counter(webs) == {"node-1": 2, "node-2": 2, "node-3": 2, "node-4": 2}


def test_best_fit() -> None:
    c = Cluster()
    c.add_node(NodeFacts("n1", 4, 8 * G))
    c.add_node(NodeFacts("n2", 4, 4 * G))
    c.add_node(NodeFacts("n3", 8, 16 * G, {"role": "reserved"}))
    with active("best-fit.lua", c):
        assert c.place("a", Request("x", mem=3 * G)).node == "n2"  # 1G left there
        assert c.place("b", Request("x", mem=3 * G)).node == "n1"  # n2 is full now
        assert c.place("c", Request("x", mem=4 * G)).node == "n1"
        assert c.place("d", Request("x", mem=4 * G)).reason.startswith("policy: the policy's filter refused")
        assert c.place("e", Request("x", mem=4 * G, labels=(("role", "reserved"),))).node == "n3"


def test_web_first_yaml() -> None:
    text = (EXAMPLES / "web-first.yaml").read_text()
    c = small_cluster()
    c.add_node(NodeFacts("node-5", 4, 32 * G, {"zone": "west", "disk": "ssd"}))
    with active("web-first.yaml", c):
        assert c.place("db-1", Request("db", mem=G)).node == "node-5"  # ssd, most memory free
        assert c.place("db-2", Request("db", mem=40 * G)).reason == \
            "policy: rule databases-on-ssd: no node it allows has room"
        assert c.place("web-3", Request("web", mem=G)).node == "node-3"  # east first, then least loaded
        assert c.place("frontend-1", Request("static", name="frontend-1")).node == "node-1"
        assert c.place("batch-1", Request("job", name="batch-1", mem=G)).node == "node-1"  # the busiest
        assert c.place("huge", Request("job", mem=65 * G)).reason == \
            "policy: rule no-huge-requests: more than 64G is never placed"
        assert c.place("other", Request("job")).reason.startswith("policy: node-4 (0 containers, fewest)")
    assert "scheduler:" in text


def test_the_manual_pages_examples_load() -> None:
    """Every Lua and YAML block in policy(5) that is a whole policy passes the policy file's checks."""
    import re

    page = (ROOT_DIR / "docs" / "policy.5.md").read_text()
    blocks = re.findall(r"```(lua|yaml)\n(.*?)```", page, re.S)
    assert len(blocks) >= 4
    for _, text in blocks:
        loaded = load_policy(text, small_cluster())
        assert loaded.program is not None
        loaded.program.close()
