"""Deadlines and memory caps: a policy that runs long or allocates without end is
stopped, the platform decides that request, and the next ones are answered as usual."""

from __future__ import annotations

import asyncio
import time

import pytest

from fornax_sched.policy import Limits, LuaProgram, PolicyError, load_policy
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
    p = make(decide_body(loop), deadline=DEADLINE)
    t = time.perf_counter()
    d = p.decide(cluster, "x", PLAIN, frozenset())
    took = time.perf_counter() - t
    assert d.node == "node-3", p.describe()
    assert d.reason == "platform: node-3 (0 containers, fewest; the policy timed out)"
    assert p.counters["timeouts"] == 1 and p.counters["restarts"] == 0  # stopped by the hook: no kill
    assert p.last_failure.startswith("timeout: ran past 50 ms")  # and, mostly, " at line N"
    assert DEADLINE <= took < DEADLINE + 0.2
    assert p.decide(cluster, "y", PLAIN, frozenset()).node == "node-3"


def test_a_score_function_that_loops(make: Make, cluster: Cluster) -> None:
    p = make("function score(node, req, ctx)\n  while true do end\nend\n", deadline=DEADLINE)
    d = p.decide(cluster, "x", PLAIN, frozenset())
    assert "timed out" in d.reason and p.last_failure == "timeout: ran past 50 ms at line 2"


def test_one_long_c_call_is_killed(make: Make, cluster: Cluster) -> None:
    """A pattern match that backtracks inside C never meets the hook: the sandbox is killed."""
    p = make(decide_body("string.rep('a', 250):find('.-.-.-b')"), deadline=DEADLINE)
    t = time.perf_counter()
    d = p.decide(cluster, "x", PLAIN, frozenset())
    took = time.perf_counter() - t
    assert d.node == "node-3" and d.reason.endswith("; the policy timed out)")
    assert p.counters["timeouts"] == 1 and p.counters["restarts"] == 1
    assert "the sandbox was restarted" in p.last_failure
    # killed at deadline + grace; the platform then answered in a fresh sandbox
    assert DEADLINE + p.limits.grace <= took < 1.0
    t = time.perf_counter()
    assert p.decide(cluster, "y", PLAIN, frozenset()).node == "node-3"
    assert p.counters["restarts"] == 2 and time.perf_counter() - t < 1.0


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
""", deadline=DEADLINE)
    for bad in ("loop", "match", "bomb", "loop", "match"):
        d = p.decide(cluster, bad, Request(bad), frozenset())
        assert d.node == "node-3" and d.reason.startswith("platform: node-3 (0 containers, fewest; the policy")
        good = p.decide(cluster, "good", PLAIN, frozenset())
        assert good.node == "node-1" and good.reason == "policy: node-1 (as asked)"
    assert p.counters["timeouts"] == 4 and p.counters["memory"] == 1 and p.counters["restarts"] == 2
    assert not p.failing  # a good decision between failures


def test_asyncio_keeps_running_while_policies_misbehave(make: Make, cluster: Cluster) -> None:
    """Decisions are synchronous, so each blocks the loop, but never for longer than its bound."""
    p = make("""
function decide(ctx)
  if ctx.request.image == 'loop' then while true do end end
  if ctx.request.image == 'match' then string.rep('a', 250):find('.-.-.-b') end
  return 'node-1'
end
""", deadline=DEADLINE)
    ticks: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    async def scheduler() -> list[str | None]:
        stop = asyncio.Event()
        task = asyncio.create_task(ticker(stop))
        answers = []
        for i in range(12):
            image = ("loop", "match", "hello")[i % 3]
            answers.append(p.decide(cluster, f"c{i}", Request(image), frozenset()).node)
            await asyncio.sleep(0.01)
        stop.set()
        await task
        return answers

    answers = asyncio.run(scheduler())
    assert answers == ["node-3", "node-3", "node-1"] * 4
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert len(ticks) >= 12 and max(gaps) < 0.5, max(gaps)


def test_a_policy_that_never_loads_is_refused(cluster: Cluster) -> None:
    with pytest.raises(PolicyError, match="timeout: ran past 50 ms at line 2|ran past 50 ms at line 2"):
        load_policy("local x = 0\nwhile true do x = x + 1 end\nfunction decide(ctx) end\n", cluster)
    with pytest.raises(PolicyError, match="memory"):
        load_policy("local s = 'x'\nwhile true do s = s .. s end\n", cluster)
    with pytest.raises(PolicyError, match="dry run: no answer within 50 ms"):
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
    """A sandbox that cannot start (here: no time to) leaves the decision to the core's own spread."""
    lines: list[str] = []
    with LuaProgram("function decide(ctx) return 'node-1' end", limits=Limits(startup=0, deadline=0.001),
                    on_failure=lines.append) as p:
        d = p.decide(cluster, "x", PLAIN, frozenset())
        assert d.node == cluster.decide_builtin("x", PLAIN).node
        assert d.reason.endswith("(built-in: the sandbox could not decide)")
        assert p.counters["sandbox"] == 1 and p.counters["builtin"] == 1 and p.counters["timeouts"] == 0
        assert "the sandbox did not start in time" in lines[0]
    with pytest.raises(PolicyError, match="cannot check the policy: the sandbox did not start in time"):
        load_policy("function decide(ctx) end", cluster, limits=Limits(startup=0, deadline=0.001))


def test_a_broken_platform_policy_leaves_it_to_the_builtin(cluster: Cluster) -> None:
    with LuaProgram("function decide(ctx) error('mine fails too') end", platform="this is not Lua") as p:
        with pytest.raises(PolicyError, match="the platform policy did not load: line 1"):
            p.start()
        d = p.decide(cluster, "x", PLAIN, frozenset())
        assert d.node is not None and d.reason.endswith("(built-in: the sandbox could not decide)")
        assert p.counters["builtin"] == 1 and "platform policy failed" in p.recent[-1]
