"""The Lua API as policy(5) documents it: the context, the helpers, the shapes of a decision."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fornax_sched.policy import LuaProgram
from fornax_sched.sched.core import Cluster
from fornax_sched.sched.model import NodeFacts, Request

from .conftest import PLAIN, Make, small_cluster

G, M = 1 << 30, 1 << 20


def answer(make: Make, cluster: Cluster, lua: str, req: Request = PLAIN, exclude: frozenset[str] = frozenset()) -> str:
    """What a policy decides for one request: the node, or the reason it gave for none."""
    p = make(lua)
    d = p.decide(cluster, "c", req, exclude)
    assert not p.last_failure, p.last_failure
    return d.node or d.reason


# ---------------------------------------------------------------- shapes of a decision


def test_what_decide_may_return(make: Make, cluster: Cluster) -> None:
    def dec(body: str) -> str:
        return answer(make, cluster, f"function decide(ctx) {body} end")

    assert dec("return 'node-2'") == "node-2"
    assert dec("return ctx.node['node-4']") == "node-4"  # a node, for its name
    assert dec("return {'node-9', 'node-4', 'node-1'}") == "node-4"  # the first that exists and fits
    assert dec("return {ctx.node['node-2'], 'node-1'}") == "node-2"
    assert dec("return nil, 'waiting for a gpu'") == "policy: waiting for a gpu"
    assert dec("return {unschedulable = 'not today'}") == "policy: not today"
    assert dec("return {}") == "policy: ranked no nodes"
    assert dec("return nil") == "node-3"  # no opinion, and no filter or score: the platform's order
    p = make("function decide(ctx) return 'node-2', 'least busy zone' end")
    assert p.decide(cluster, "c", PLAIN, frozenset()).reason == "policy: node-2 (least busy zone)"


def test_bad_answers_fall_back(make: Make, cluster: Cluster) -> None:
    cases = {
        "return 42": "bad: decide returned a number",
        "return 'node-9'": "bad: the policy chose node-9, which does not exist",
        "return 'node-4', 7": "bad: decide's second value is a number",
        "return {name = 5, x = 1}": "bad: decide returned a table that is not a node",
        "return {'node-1', 3}": "bad: decide's list holds a number at 2",
        "return {'node-9', 'nope'}": "bad: none of the 2 nodes the policy ranked fits",
        "return {unschedulable = true}": "bad: unschedulable must be a string",
    }
    for body, failure in cases.items():
        p = make(f"function decide(ctx) {body} end")
        d = p.decide(cluster, "c", PLAIN, frozenset())
        assert d.node == "node-3", body
        assert d.reason == "platform: node-3 (0 containers, fewest; the policy gave a bad answer)", body
        assert p.last_failure.startswith(failure), (body, p.last_failure)
        assert p.counters["bad_returns"] == 1


def test_a_node_that_does_not_fit_is_a_bad_answer(make: Make, cluster: Cluster) -> None:
    big = Request("big", cpus=3)
    p = make("function decide(ctx) return 'node-4' end")  # 2 cpus
    assert p.decide(cluster, "c", big, frozenset()).node == "node-3"
    assert p.last_failure == "bad: the policy chose node-4, which does not fit (full)"
    cluster.cordon("node-4")
    p.decide(cluster, "c", PLAIN, frozenset())
    assert p.last_failure == "bad: the policy chose node-4, which does not fit (cordoned)"
    p.decide(cluster, "c", PLAIN, frozenset({"node-4"}))
    assert p.last_failure == "bad: the policy chose node-4, which is excluded"


def test_filter_and_score(make: Make, cluster: Cluster) -> None:
    most_free = "function score(node, req, ctx) return node.free_mem end"
    assert answer(make, cluster, most_free) == "node-3"
    west = "function filter(node, req, ctx) return node.labels.zone == 'west' end"
    assert answer(make, cluster, west) == "node-4"  # fewest containers among the west nodes
    assert answer(make, cluster, west + "\n" + most_free) == "node-2"
    none = "function filter(node) return false end"
    assert answer(make, cluster, none) == "policy: the policy's filter refused the 4 nodes that fit"
    # decide may decline (nil alone), leaving it to filter and score
    mixed = "function decide(ctx) if ctx.request.image == 'db' then return 'node-1' end end\n" + most_free
    assert answer(make, cluster, mixed) == "node-3"
    assert answer(make, cluster, mixed, Request("db")) == "node-1"
    # score sees only nodes that fit
    assert answer(make, cluster, most_free, Request("x", mem=10 * G)) == "node-3"
    assert answer(make, cluster, most_free, Request("x", mem=20 * G)).startswith("policy: no node fits mem>=20G")


def test_bad_scores_fall_back(make: Make, cluster: Cluster) -> None:
    for score, failure in (("'high'", "score returned a string for node-1"), ("0/0", "score returned nan for node-1")):
        p = make(f"function score(node) return {score} end")
        assert p.decide(cluster, "c", PLAIN, frozenset()).node == "node-3"
        assert p.last_failure == f"bad: {failure}"


# ---------------------------------------------------------------- the context


def test_the_context(make: Make, cluster: Cluster) -> None:
    cluster.cordon("node-2")
    cluster.set_status("node-4", "suspect")
    lua = """
function decide(ctx)
  local n = ctx.node['node-1']
  local keys = {}
  for k in pairs(n) do keys[#keys + 1] = k end
  table.sort(keys)
  log(table.concat(keys, ' '))
  log(n.name, n.cpus, n.mem, n.used_cpus, n.used_mem, n.free_cpus, n.free_mem, n.status, n.cordoned,
      n.usable, n.ncontainers, #n.containers, n.containers[1], n.labels.zone, n.kind)
  local m = ctx.node['node-2']
  log(m.cordoned, m.usable, ctx.node['node-4'].status, ctx.node['node-4'].usable, #ctx.nodes, ctx.nodes[1].name)
  local p = ctx.placements['web-2']
  log(p.name, p.node, p.image, p.cpus, p.mem)
  local r = ctx.request
  log(ctx.container, r.image, r.name, r.cpus, r.mem, r.replicas, r.labels.disk, #r.include, r.include[1],
      r.exclude[1], r.avoid[1], r.args[1], r.constraints)
  log(ctx.exclude['node-3'], ctx.exclude['node-1'])
  return nil, 'seen'
end
"""
    req = Request("web", ("--port", "80"), "web", 2, 0.5, 64 * M, (("disk", "ssd"),), ("node-*",), ("node-9",),
                  ("db-*",))
    p = make(lua)
    d = p.decide(cluster, "web-3", req, frozenset({"node-3"}))
    assert d.reason == "policy: seen"
    assert list(p.logs) == [
        "containers cordoned cpus free_cpus free_mem kind labels mem name ncontainers status usable used_cpus used_mem",
        f"node-1 4 {8 * G} 1.0 {G} 3.0 {7 * G} online false true 1 1 web-1 east fornax",
        "true false suspect false 4 node-1",
        f"web-2 node-2 web 1 {G}",
        f"web-3 web web 0.5 {64 * M} 2 ssd 1 node-* node-9 db-* --port "
        "cpu>=0.5 mem>=64M disk=ssd node=node-* node!=node-9 anti-affinity=db-*",
        "true nil",
    ]


def test_helpers(make: Make, cluster: Cluster) -> None:
    cluster.cordon("node-2")
    lua = """
local function nm(node) return node and node.name end
function decide(ctx)
  local req = ctx.request
  for _, n in ipairs(ctx.nodes) do log(n.name, fits(n, req)) end
  log(fits(ctx.node['node-3'], {cpus = 9}), fits(ctx.node['node-3'], {mem = '1G', labels = {disk = 'ssd'}}),
      fits(ctx.node['node-1'], {avoid = 'web-*'}), fits(ctx.node['node-1'], {include = {'node-[23]'}}))
  log(runs(ctx.node['node-1'], 'web-*'), runs(ctx.node['node-1'], {'db', 'web-1'}), runs(ctx.node['node-3'], '*'))
  log(glob('node-12', 'node-?2'), glob('node-12', 'node-[!1]*'), size('1.5G'), size('512k'), size(100))
  log(nm(pick(ctx)), nm(pick(ctx, nil, by.most_loaded)), nm(pick(ctx, nil, by.most_mem_free)),
      nm(pick(ctx, function(n) return n.labels.zone == 'west' end)),
      nm(pick(ctx, nil, function(n) return n.labels.zone == 'west' and 1 or 0, by.most_cpu_free(n) end)))
  log(why_not(ctx))
  log(platform.decide(ctx))
  log(pcall(size, 'lots'))
  return nil, 'done'
end
"""
    p = make(lua)
    p.decide(cluster, "c", Request("x", cpus=3, avoid=("web-*",)), frozenset({"node-4"}))
    assert list(p.logs) == [
        "node-1 false avoid",
        "node-2 false cordoned",
        "node-3 true",
        "node-4 false full",
        "false true false false filtered",  # Lua keeps only the first value of all but the last call
        "1 1 0",
        f"true false {3 * G // 2} 524288 100",
        "node-3 node-3 node-3 nil node-3",
        # node-3 fits, and is counted "avoid", as the core counts it
        "no node fits cpu>=3 anti-affinity=web-*: 1 cordoned, 2 avoid, 1 excluded",
        "node-3 0 containers, fewest",
        "false size: bad size \"lots\": want bytes or a size such as 512K, 64M or 1G",
    ]
    p.logs.clear()
    p.decide(cluster, "c", PLAIN, frozenset())
    assert list(p.logs)[7:10] == [
        "node-3 node-1 node-3 node-4 node-4",
        "no node fits cpu>=0.5 mem>=64M: 1 cordoned, 3 avoid",  # as the core counts feasible nodes
        "node-3 0 containers, fewest",
    ]


def test_why_not_says_what_the_core_says(make: Make, cluster: Cluster) -> None:
    cluster.set_status("node-1", "dead")
    cluster.cordon("node-2")
    p = make(None)
    for req, exclude in ((Request("x", cpus=9), {"node-4"}), (Request("x", labels=(("gpu", "yes"),)), set()),
                         (Request("x", avoid=("web-*",), include=("node-[12]",), mem=6 * G), set())):
        ours = p.decide(cluster, "c", req, frozenset(exclude))
        theirs = cluster.decide_builtin("c", req, exclude)
        assert ours.node is None and ours.reason == theirs.reason


# ---------------------------------------------------------------- the mirror stays true


MIRROR = """
local function f(x) return string.format('%.17g', x) end
function decide(ctx)
  local placed = 0
  for _ in pairs(ctx.placements) do placed = placed + 1 end
  log('nodes ' .. #ctx.nodes .. ' placements ' .. placed)
  for _, n in ipairs(ctx.nodes) do
    local labels, cs = {}, {}
    for k, v in pairs(n.labels) do labels[#labels + 1] = k .. '=' .. v end
    table.sort(labels)
    for _, c in ipairs(n.containers) do
      local p = ctx.placements[c]
      cs[#cs + 1] = c .. ':' .. p.node .. ':' .. p.image .. ':' .. f(p.cpus) .. ':' .. f(p.mem)
    end
    log(n.name, n.status, n.cordoned, f(n.cpus), f(n.mem), f(n.used_cpus), f(n.used_mem), n.ncontainers,
        table.concat(labels, ','), table.concat(cs, ','))
  end
  return nil, 'mirrored'
end
"""


def mirror_of(c: Cluster) -> list[str]:
    """The lines MIRROR logs, computed from the cluster itself."""
    def f(x: float) -> str:
        return f"{x:.17g}"

    out = [f"nodes {len(c.nodes)} placements {sum(len(n.containers) for n in c.nodes.values())}"]
    for name in sorted(c.nodes):
        n = c.nodes[name]
        labels = ",".join(sorted(f"{k}={v}" for k, v in n.facts.labels.items()))
        cs = ",".join(f"{x}:{name}:{c.placements[x].request.image}:{f(c.placements[x].request.cpus)}:"
                      f"{f(c.placements[x].request.mem)}" for x in n.containers)
        out.append(f"{name} {n.status} {str(n.cordoned).lower()} {f(n.facts.cpus)} {f(n.facts.mem)} "
                   f"{f(n.used_cpus)} {f(n.used_mem)} {len(n.containers)} {labels} {cs}")
    return out


OPS = st.one_of(
    st.tuples(st.just("node"), st.integers(0, 5), st.sampled_from(["east", "west"]), st.sampled_from([2, 4.5])),
    st.tuples(st.just("remove"), st.integers(0, 5)),
    st.tuples(st.just("status"), st.integers(0, 5), st.sampled_from(["online", "suspect", "dead"])),
    st.tuples(st.just("cordon"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("place"), st.sampled_from(["web", "db"]), st.sampled_from([0.25, 1.0])),
    st.tuples(st.just("forget"), st.integers(0, 30)),
    st.tuples(st.just("lost"), st.integers(0, 5)),
    st.tuples(st.just("program off and on"),),
    st.tuples(st.just("sandbox dies"),),
)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(OPS, max_size=25))
def test_the_mirror_follows_every_change(ops: list[tuple[Any, ...]]) -> None:
    """The sandbox's copy, kept by deltas from cluster.changed, equals the cluster after every step."""
    c = Cluster()
    with LuaProgram(MIRROR) as p:
        c.set_program(p)
        placed = 0
        for op in ops:
            kind, *args = op
            node = f"n{args[0]}" if args and isinstance(args[0], int) else ""
            if kind == "node":
                c.add_node(NodeFacts(node, args[2], 4 * G, {"zone": args[1]}))
            elif kind == "remove" and node in c.nodes:
                c.remove_node(node)
            elif kind == "status" and node in c.nodes:
                c.set_status(node, args[1])
            elif kind == "cordon" and node in c.nodes:
                c.cordon(node, args[1])
            elif kind == "place":
                placed += 1
                d = c.decide_builtin(f"p{placed}", Request(args[0], cpus=args[1], mem=256 * M))
                c.add(f"p{placed}", Request(args[0], cpus=args[1], mem=256 * M))
                if d.node is not None:
                    c.assign(f"p{placed}", d.node)
            elif kind == "forget" and f"p{args[0]}" in c.placements:
                c.forget(f"p{args[0]}")
            elif kind == "lost" and node in c.nodes:
                c.node_lost(node)
            elif kind == "program off and on":
                c.set_program(None)  # then changes the program is not told of
                if "quiet" in c.nodes:
                    c.remove_node("quiet")
                else:
                    c.add_node(NodeFacts("quiet", 1, G))
                c.set_program(p)
            elif kind == "sandbox dies" and p._box is not None:
                p._box.proc.kill()  # while idle: the next decision starts another, quietly
                p._box.proc.wait()
            p.logs.clear()
            assert c.decide("probe", PLAIN).reason == "policy: mirrored", p.describe()
            assert list(p.logs) == mirror_of(c)


def test_a_dry_run_leaves_the_active_program_alone(make: Make) -> None:
    c = small_cluster()
    active = make(MIRROR)
    c.set_program(active)
    c.decide("a", PLAIN)
    c.cordon("node-1")
    other = make(None)
    assert other.dry_run(c)[0].node == "node-3"  # a full copy; cluster.changed untouched
    assert c.changed == {"node-1"}
    active.logs.clear()
    c.decide("b", PLAIN)
    assert list(active.logs) == mirror_of(c)


def test_a_copied_cluster_shares_the_program(make: Make) -> None:
    """Simulating on a deep copy decides with the same program, and the original stays right."""
    import copy

    c = small_cluster()
    p = make(MIRROR)
    c.set_program(p)
    c.decide("a", PLAIN)
    sim = copy.deepcopy(c)
    assert sim.program is p
    sim.place("extra", PLAIN)
    sim.cordon("node-4")
    p.logs.clear()
    assert sim.decide("b", PLAIN).reason == "policy: mirrored" and list(p.logs) == mirror_of(sim)
    p.logs.clear()
    assert c.decide("b", PLAIN).reason == "policy: mirrored" and list(p.logs) == mirror_of(c)


def test_a_policy_tells_the_kinds_of_node_apart(make: Make, cluster: Cluster) -> None:
    cluster.add_node(NodeFacts("agent-1", 4, 8 * G, {}, "persys"))
    cluster.set_status("agent-1", "online")
    p = make("function score(node) if node.kind == 'persys' then return 10 end return 0 end")
    assert p.decide(cluster, "c", PLAIN, frozenset()).node == "agent-1"
    p = make("function score(node) if node.kind == 'fornax' then return 10 - node.ncontainers end return 0 end")
    assert p.decide(cluster, "c", PLAIN, frozenset()).node != "agent-1"


def test_a_size_past_the_cap_reaches_lua_as_a_float(make: Make, cluster: Cluster) -> None:
    """A request from a store written before sizes were capped (units.MAX_SIZE) may ask for 2^70 bytes:
    Lua gets it as a float (an integer past 2^63 stopped the sandbox: OverflowError), and decides."""
    huge = Request("hello", mem=1 << 70)
    assert answer(make, cluster, "function decide(ctx) return nil, 'mem ' .. math.type(ctx.request.mem) end",
                  huge) == "policy: mem float"
    assert answer(make, cluster, "function decide(ctx) return platform.decide(ctx) end", huge).startswith(
        "policy: no node fits mem>=1073741824T")
