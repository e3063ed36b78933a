"""rebalance under a Lua policy: moves toward what the policy's own decisions prefer, and settles."""

from __future__ import annotations

from fornax_sched.sched.core import Cluster
from fornax_sched.sched.model import NodeFacts, Request

from .conftest import G, Make

SSD_FIRST = """
function decide(ctx)
  local node = pick(ctx, function(n) return n.labels.disk == "ssd" end)
  if node == nil then node = pick(ctx) end
  if node == nil then return nil, why_not(ctx) end
  return node.name, "ssd first"
end
"""


def test_containers_move_to_what_the_policy_prefers_then_stay(make: Make, cluster: Cluster) -> None:
    cluster.set_program(make(SSD_FIRST))
    moves = cluster.rebalance(10)
    assert sorted(moves) == [("web-1", "node-1", "node-3"), ("web-2", "node-2", "node-3")]
    assert list(cluster.nodes["node-3"].containers) == ["web-1", "web-2"]
    assert cluster.placements["web-1"].reason == "rebalance from node-1"
    assert cluster.rebalance(10) == []


def test_the_platform_policy_evens_out_without_going_back_and_forth(make: Make) -> None:
    c = Cluster()
    for name in ("n-1", "n-2"):
        c.add_node(NodeFacts(name, 8, 16 * G))
    for i in range(4):
        c.add(f"x{i}", Request("x", cpus=1, mem=G))
        c.assign(f"x{i}", "n-1")
    c.set_program(make(None))
    assert len(c.rebalance(10)) == 2
    assert [len(c.nodes[n].containers) for n in ("n-1", "n-2")] == [2, 2]
    assert c.rebalance(10) == []
    # the moves are bounded, and so is what is examined for them
    assert c.rebalance(0) == []


def test_nothing_moves_off_a_cordoned_node_or_to_one(make: Make, cluster: Cluster) -> None:
    cluster.cordon("node-3")
    cluster.set_program(make(SSD_FIRST))
    assert cluster.rebalance(10) == []
