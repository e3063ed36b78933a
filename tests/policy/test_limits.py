"""Deadlines and memory caps: a policy that runs long or allocates without end is
stopped, the platform decides that request, and the next ones are answered as usual.

No test here measures time: that a stop came from the hook (not a kill) shows in
``restarts``; how long decisions take under these policies is bench/policy_bounds_bench.py's.
"""

from __future__ import annotations

import pytest

from fornax_sched.policy import Limits, LuaProgram, Platform, PolicyError, load_policy
from fornax_sched.sched.core import Cluster
from fornax_sched.sched.model import Request

from .conftest import PLAIN, Make, decide_body

DEADLINE = 0.05

LOOPS = {
    "while true": "while true do end",
    "goto": "::top:: goto top",
    "recursion in a loop": "local function f() return pcall(f) end while true do f() end",
    "pcall swallows": "while true do pcall(function() while true do end end) end",
    "xpcall handler loops": "xpcall(function() while true do end end, function() while true do end end)",
    "xpcall in a loop": "while true do xpcall(function() while true do end end, function(e) return e end) end",
    "coroutine.wrap": "coroutine.wrap(function() while true do end end)()",
    "coroutine.resume in a loop":
        "while true do coroutine.resume(coroutine.create(function() while true do end end)) end",
    "coroutine yields forever": "local co = coroutine.wrap(function() while true do coroutine.yield() end end) "
                                "while true do co() end",
    "gsub callback": "string.gsub(string.rep('a', 1000), 'a', function() while true do end end)",
    "sort comparator": "local t = {3, 2, 1} table.sort(t, function(a, b) while true do end end)",
    "error handler error": "while true do pcall(error, setmetatable) end",
}


@pytest.mark.parametrize("loop", LOOPS.values(), ids=LOOPS.keys())
def test_loops_are_stopped_at_the_deadline(loop: str, make: Make, cluster: Cluster) -> None:
    p = make(decide_body(loop), deadline=DEADLINE, grace=1.0)  # a kill would be a failure of the hook
    d = p.decide(cluster, "x", PLAIN, frozenset())
    assert d.node == "node-3", p.describe()
    assert d.reason == "platform: node-3 (0 containers, fewest; the policy timed out)"
    assert p.counters["timeouts"] == 1 and p.counters["restarts"] == 0  # stopped by the hook: no kill
    assert p.last_failure.startswith("timeout: ran past 50 ms")  # and, mostly, " at line N"
    assert p.decide(cluster, "y", PLAIN, frozenset()).node == "node-3"


# Policies that catch errors at depth, hoping to catch the stop: at the C-stack
# limit (about 200 nested C calls) Lua cannot even call the hook, nor raise the
# stop; the flag the harness keeps makes the turn timed out all the same.
NESTED = {
    "pcall 200 deep, each level loops":
        "local function f(n) if n > 0 then pcall(f, n - 1) end while true do end end f(200)",
    "pcall 250 deep": "local function f(n) if n > 0 then pcall(f, n - 1) end while true do end end f(250)",
    "pcall at the C-stack limit, looping there": "local function f() while true do pcall(f) end end f()",
    "pcall at the limit, twice a level": "local function f() pcall(f) pcall(f) while true do end end f()",
    "pcall at the limit, swallowing and going on":
        "local function f(n) local ok = pcall(f, n + 1) while true do pcall(f, n + 1) end end f(1)",
    "xpcall at the limit": "local function f() while true do xpcall(f, function(e) return e end) end end f()",
    "xpcall handlers that loop":
        "local function h(e) while true do end end local function f() xpcall(f, h) while true do end end f()",
    "xpcall handler calling pcall":
        "local function f() xpcall(f, function(e) while true do pcall(f) end end) end f()",
    "coroutines nested to the limit":
        "local function f() local co = coroutine.create(f) while true do coroutine.resume(co) end end f()",
    "coroutine.wrap nested": "local function f() while true do pcall(coroutine.wrap(f)) end end f()",
    "coroutine.close in a loop":
        "while true do local co = coroutine.create(function() while true do end end) "
        "coroutine.resume(co) coroutine.close(co) end",
    "pcall of error at depth": "local function f(n) if n > 0 then pcall(f, n - 1) end "
                               "while true do pcall(error, 'x') end end f(190)",
}


@pytest.mark.parametrize("body", NESTED.values(), ids=NESTED.keys())
def test_no_pcall_depth_escapes_the_stop(body: str, make: Make, cluster: Cluster) -> None:
    p = make(decide_body(body), deadline=DEADLINE, grace=2.0)  # a kill here would mean the stop was swallowed
    d = p.decide(cluster, "x", PLAIN, frozenset())
    assert d.reason == "platform: node-3 (0 containers, fewest; the policy timed out)", p.describe()
    assert p.counters["timeouts"] == 1 and p.counters["restarts"] == 0, p.describe()
    assert p.last_failure.startswith("timeout: ran past 50 ms"), p.last_failure
    assert p.decide(cluster, "y", PLAIN, frozenset()).reason.endswith("the policy timed out)")
    assert p.counters["restarts"] == 0


def test_a_score_function_that_loops(make: Make, cluster: Cluster) -> None:
    p = make("function score(node, req, ctx)\n  while true do end\nend\n", deadline=DEADLINE)
    d = p.decide(cluster, "x", PLAIN, frozenset())
    assert "timed out" in d.reason and p.last_failure == "timeout: ran past 50 ms at line 2"


def test_one_long_c_call_is_killed(make: Make, cluster: Cluster) -> None:
    """A pattern match that backtracks inside C never meets the hook: the sandbox is killed."""
    p = make(decide_body("string.rep('a', 250):find('.-.-.-b')"), deadline=DEADLINE)
    restarts = p.platform.restarts
    d = p.decide(cluster, "x", PLAIN, frozenset())
    assert d.node == "node-3" and d.reason.endswith("; the policy timed out)")
    assert p.counters["timeouts"] == 1 and p.counters["restarts"] == 1
    assert "the sandbox was restarted" in p.last_failure
    # the platform answered from its own process, untouched by the kill
    assert p.platform.restarts == restarts and p.counters["builtin"] == 0
    assert p.decide(cluster, "y", PLAIN, frozenset()).node == "node-3"
    assert p.counters["restarts"] == 2


MEMORY = {
    "string.rep": "local s = string.rep('x', 1 << 30)",
    "string doubling": "local s = 'x' while true do s = s .. s end",
    "table growth": "local t = {} for i = 1, 1e9 do t[i] = i end",
    "table of strings": "local t = {} for i = 1, 1e9 do t[i] = ('x'):rep(100) .. i end",
    "table.concat": "local t = {} for i = 1, 64 do t[i] = ('y'):rep(1 << 20) end local s = table.concat(t)",
}


@pytest.mark.parametrize("bomb", MEMORY.values(), ids=MEMORY.keys())
def test_memory_bombs_are_contained(bomb: str, make: Make, cluster: Cluster) -> None:
    p = make(decide_body(bomb), memory=8 << 20, deadline=0.5)
    d = p.decide(cluster, "x", PLAIN, frozenset())
    assert d.node == "node-3", p.describe()
    assert d.reason == "platform: node-3 (0 containers, fewest; the policy ran out of memory)"
    assert p.counters["memory"] == 1 and p.counters["restarts"] == 0
    assert p.decide(cluster, "y", PLAIN, frozenset()).node == "node-3"


def test_deep_recursion_is_contained(make: Make, cluster: Cluster) -> None:
    p = make(decide_body("local function f(n) return 1 + f(n + 1) end f(1)"), deadline=0.5)
    d = p.decide(cluster, "x", PLAIN, frozenset())
    assert d.node == "node-3" and ("failed" in d.reason or "memory" in d.reason)
    assert p.counters["errors"] + p.counters["memory"] == 1


def test_state_kept_between_decisions_is_capped(make: Make, cluster: Cluster) -> None:
    """Globals persist between decisions; hoarding them hits the cap, and the policy starts afresh."""
    p = make("""
hoard = {}
function decide(ctx)
  hoard[#hoard + 1] = string.rep('x', 3 << 20) .. #hoard
  return nil, 'holding ' .. #hoard
end
""", memory=16 << 20, deadline=0.5)
    reasons = [p.decide(cluster, f"c{i}", PLAIN, frozenset()).reason for i in range(8)]
    assert reasons[:3] == ["policy: holding 1", "policy: holding 2", "policy: holding 3"]
    failed = reasons.index("platform: node-3 (0 containers, fewest; the policy ran out of memory)")
    assert reasons[failed + 1] == "policy: holding 1"  # reloaded: its globals are fresh


def test_the_policy_keeps_serving_other_requests(make: Make, cluster: Cluster) -> None:
    """Bad requests stop the policy (by hook, by kill, by memory); the others it keeps deciding."""
    p = make("""
function decide(ctx)
  local image = ctx.request.image
  if image == 'loop' then while true do end end
  if image == 'match' then string.rep('a', 250):find('.-.-.-b') end
  if image == 'bomb' then local s = 'x' while true do s = s .. s end end
  return 'node-1', 'as asked'
end
""", deadline=DEADLINE, memory=4 << 20)
    for bad in ("loop", "match", "bomb", "loop", "match"):
        d = p.decide(cluster, bad, Request(bad), frozenset())
        assert d.node == "node-3" and d.reason.startswith("platform: node-3 (0 containers, fewest; the policy")
        good = p.decide(cluster, "good", PLAIN, frozenset())
        assert good.node == "node-1" and good.reason == "policy: node-1 (as asked)"
    assert p.counters["timeouts"] == 4 and p.counters["memory"] == 1 and p.counters["restarts"] == 2
    assert not p.failing  # a good decision between failures


def test_a_policy_that_never_loads_is_refused(cluster: Cluster) -> None:
    with pytest.raises(PolicyError, match=r"^timed out loading: ran past 250 ms at line 2 \(the load budget\)$"):
        load_policy("local x = 0\nwhile true do x = x + 1 end\nfunction decide(ctx) end\n", cluster)
    with pytest.raises(PolicyError, match=r"^ran out of memory loading \(the cap is 64M\)$"):
        load_policy("local s = 'x'\nwhile true do s = s .. s end\n", cluster)
    with pytest.raises(PolicyError, match=r"^dry run: no answer within 50 ms \(stuck in one long call\?\)$"):
        load_policy("function decide(ctx)\n  string.rep('a', 250):find('.-.-.-b')\nend\n", cluster)
    assert cluster.program is None


def test_a_policy_that_keeps_failing_is_reported(make: Make, cluster: Cluster) -> None:
    lines: list[str] = []
    p = make("function decide(ctx)\n  if ctx.request.image == 'bad' then error('boom') end\n  return 'node-1'\nend\n")
    p.on_failure = lines.append
    for i in range(5):
        assert p.decide(cluster, f"b{i}", Request("bad"), frozenset()).node == "node-3"
        assert p.failing == (i == 4)
    assert p.counters["errors"] == 5 and p.counters["fallbacks"] == 5
    assert lines[0] == "lua policy failed: line 2: boom; the platform policy decides"
    assert lines[-1].endswith("(failing: 5 decisions in a row)")
    assert "state failing" in p.describe() and "last_failure error: line 2: boom" in p.describe()
    assert p.decide(cluster, "g", PLAIN, frozenset()).node == "node-1"
    assert not p.failing and "state ok" in p.describe()


def test_without_a_sandbox_the_builtin_decides(cluster: Cluster) -> None:
    """A sandbox that cannot start (here: no time to) leaves the decision to the core's own spread,
    but only when the platform's sandbox cannot start either."""
    lines: list[str] = []
    with LuaProgram("function decide(ctx) return 'node-1' end", limits=Limits(startup=0, deadline=0.001),
                    on_failure=lines.append) as p:
        d = p.decide(cluster, "x", PLAIN, frozenset())
        assert d.node == cluster.decide_builtin("x", PLAIN).node
        assert d.reason.endswith("(built-in: the platform policy could not decide; the policy could not run)")
        assert p.counters["sandbox"] == 1 and p.counters["builtin"] == 1 and p.counters["timeouts"] == 0
        assert "the sandbox did not start in time" in lines[0]
        assert lines[1].startswith("platform policy unavailable: the sandbox did not start in time")
    with pytest.raises(PolicyError, match="cannot check the policy: the sandbox did not start in time"):
        load_policy("function decide(ctx) end", cluster, limits=Limits(startup=0, deadline=0.001))


def test_a_broken_platform_policy_leaves_it_to_the_builtin(cluster: Cluster) -> None:
    with Platform("this is not Lua") as broken, \
            LuaProgram("function decide(ctx) error('mine fails too') end", platform=broken) as p:
        with pytest.raises(PolicyError, match="the platform policy did not load: line 1"):
            p.start()
        with pytest.raises(PolicyError, match="^the platform policy did not load: line 1"):
            broken.start()
        d = p.decide(cluster, "x", PLAIN, frozenset())
        assert d.node is not None and "(built-in: the platform policy could not decide" in d.reason
        assert p.counters["builtin"] == 1 and "platform policy" in p.recent[-1]
