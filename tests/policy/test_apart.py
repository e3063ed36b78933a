"""The platform policy in a sandbox of its own, one clock for deadlines, loading in two bounded
steps, and a command's shared budget.

No test here measures how long anything takes (bench/policy_bounds_bench.py does): a stop by
the hook shows as a timeout without a restart, a kill as a restart, and a bound as a test
that ends (pytest-timeout is the guard where a missing bound would hang).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fornax_sched.policy import (
    Limits,
    LuaProgram,
    Platform,
    PolicyError,
    dry_run_policy,
    load_policy,
    prepare_policy,
)
from fornax_sched.policy.engine import encode_node, encode_request
from fornax_sched.sched.core import Cluster
from fornax_sched.sched.model import NodeFacts, Request
from fornax_sched.sched.policies import Policies

from .conftest import PLAIN, Make, decide_body, small_cluster
from .test_api import MIRROR, mirror_of

G, M = 1 << 30, 1 << 20
FOREVER = "string.rep('a', 5000):find('.-.-.-b')"  # one C call that runs for hours
STALLS_AT_LOAD = f"local x = {FOREVER}\nfunction decide(ctx) return 'node-1' end\n"
LOOPS_AT_LOAD = "while true do end\nfunction decide(ctx) return 'node-1' end\n"
KILLED_AT_LOAD = "timed out loading: did not load within 250 ms (stuck in one long call?)"


def pid(platform: Platform) -> int:
    assert platform._box is not None
    return platform._box.proc.pid


# ---------------------------------------------------------------- 1. the platform apart


@pytest.mark.timeout(120)
def test_a_policy_stalling_at_load_cannot_make_the_platform_unavailable(platform: Platform, cluster: Cluster) -> None:
    """It used to share the platform's sandbox start: each write blocked 5 s, and a stored one left
    the built-in spread deciding.  Now it is refused within the load budget, and the platform's own
    process, untouched, goes on deciding."""
    before, restarts = pid(platform), platform.restarts
    for text, why in ((STALLS_AT_LOAD, KILLED_AT_LOAD),
                      (LOOPS_AT_LOAD, "timed out loading: ran past 250 ms at line 1 (the load budget)")):
        with pytest.raises(PolicyError) as e:
            load_policy(text, cluster, platform=platform, limits=Limits(startup=600))
        assert str(e.value) == why
    with LuaProgram(None, platform=platform) as p:
        p.start()
        assert p.decide(cluster, "x", PLAIN, frozenset()).reason == "platform: node-3 (0 containers, fewest)"
    assert pid(platform) == before and platform.restarts == restarts

    # the service's view: a stored policy that stalls at load; the platform policy decides for it
    notes: list[str] = []
    policies = Policies(cluster, notes.append, platform=platform)
    policies.load({"v1": {"n": 1, "at": 0.0, "kind": "lua", "source": STALLS_AT_LOAD}, "active": {"n": 1}}, 0.0)
    try:
        assert notes == [f"policy v1 (lua) did not start: {KILLED_AT_LOAD}; the platform policy decides"]
        assert policies.label() == "lua v1 (not loaded: the platform policy decides)"
        d = cluster.decide("x", PLAIN)
        assert d.reason == "platform: node-3 (0 containers, fewest)", d
    finally:
        policies.close()
    assert pid(platform) == before  # a Policies given a platform does not close it


FAILURES = {
    "error": ("error('boom')", "failed"),
    "timeout": ("while true do end", "timed out"),
    "kill": (FOREVER, "timed out"),
    "memory": ("local s = 'x' while true do s = s .. s end", "ran out of memory"),
    "bad answer": ("do return 'node-9' end", "gave a bad answer"),
}


@pytest.mark.parametrize(("body", "cause"), FAILURES.values(), ids=FAILURES.keys())
def test_the_platform_decides_from_its_own_process(body: str, cause: str, make: Make, platform: Platform,
                                                   cluster: Cluster) -> None:
    before = pid(platform)
    p = make(decide_body(body), memory=8 << 20)
    for name in ("x", "y"):
        d = p.decide(cluster, name, PLAIN, frozenset())
        assert d.reason == f"platform: node-3 (0 containers, fewest; the policy {cause})", d
    assert p.counters["fallbacks"] == 2 and p.counters["builtin"] == 0
    assert pid(platform) == before


def test_a_policy_that_will_not_load_again(make: Make, cluster: Cluster) -> None:
    """A restarted sandbox whose policy does not load: the platform decides, backing off the retries."""
    p = make("function decide(ctx) return 'node-1' end")
    assert p.decide(cluster, "x", PLAIN, frozenset()).node == "node-1"
    p.lua = "error('not today')"  # what the next sandbox will load
    assert p._box is not None
    p._box.proc.kill()
    p._box.proc.wait()
    d = p.decide(cluster, "y", PLAIN, frozenset())
    assert d.reason == "platform: node-3 (0 containers, fewest; the policy would not load)"
    assert p.last_failure == "load: line 1: not today" and p.counters["errors"] == 1
    d = p.decide(cluster, "z", PLAIN, frozenset())  # within the back-off: no new sandbox tried
    assert d.reason == "platform: node-3 (0 containers, fewest; the policy could not run)"
    assert p.counters["builtin"] == 0


def test_the_platform_sandbox_restarts_on_its_own(cluster: Cluster) -> None:
    with Platform() as platform, LuaProgram(decide_body("error('x')"), platform=platform) as p:
        p.start()
        assert p.decide(cluster, "a", PLAIN, frozenset()).reason.startswith("platform: node-3")
        first = pid(platform)
        os.kill(first, signal.SIGKILL)
        os.waitpid(first, 0)
        d = p.decide(cluster, "b", PLAIN, frozenset())
        assert d.reason == "platform: node-3 (0 containers, fewest; the policy failed)", d
        assert platform.restarts == 1 and pid(platform) != first and p.counters["builtin"] == 0


def test_only_when_the_platforms_process_cannot_answer_does_the_builtin_decide(cluster: Cluster) -> None:
    with Platform() as platform, LuaProgram(decide_body("error('x')"), platform=platform) as p:
        p.start()
        platform.start()
        platform.source = "error('the platform is broken')"  # its next start will not load
        dead = pid(platform)
        os.kill(dead, signal.SIGKILL)
        os.waitpid(dead, 0)  # dead before the next decision, not dying during it
        d = p.decide(cluster, "a", PLAIN, frozenset())
        assert d.node == cluster.decide_builtin("a", PLAIN).node
        assert d.reason.endswith("(built-in: the platform policy could not decide; the policy failed)"), d
        assert p.recent[-1].startswith("platform policy unavailable: the platform policy did not load: line 1: "
                                       "the platform is broken; the built-in spread decided")
        assert "platform unavailable: the platform policy did not load" in p.describe()


MIRROR_OPS = st.one_of(
    st.tuples(st.just("node"), st.integers(0, 1), st.integers(0, 4), st.sampled_from(["east", "west"])),
    st.tuples(st.just("remove"), st.integers(0, 1), st.integers(0, 4)),
    st.tuples(st.just("cordon"), st.integers(0, 1), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("place"), st.integers(0, 1), st.sampled_from(["web", "db"])),
    st.tuples(st.just("decide"), st.integers(0, 1)),
    st.tuples(st.just("platform dies"),),
)


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(MIRROR_OPS, max_size=20))
def test_the_shared_platforms_copy_follows_each_program(ops: list[tuple[Any, ...]]) -> None:
    """Two programs on two clusters share one platform sandbox (here running MIRROR as the
    platform policy); whichever asks, the platform's copy is that program's cluster."""
    with Platform(MIRROR) as platform:
        clusters = [Cluster(), Cluster()]
        programs = [LuaProgram(decide_body("error('always')"), platform=platform) for _ in clusters]
        try:
            for c, p in zip(clusters, programs, strict=True):
                p.start()
                c.set_program(p)
            placed = 0
            for op in ops:
                kind, *args = op
                if kind == "platform dies":
                    if platform._box is not None:
                        platform._box.proc.kill()
                        platform._box.proc.wait()
                    continue
                c, p = clusters[args[0]], programs[args[0]]
                node = f"n{args[1]}" if len(args) > 1 and isinstance(args[1], int) else ""
                if kind == "node":
                    c.add_node(NodeFacts(node, 4, 4 * G, {"zone": args[2]}))
                elif kind == "remove" and node in c.nodes:
                    c.remove_node(node)
                elif kind == "cordon" and node in c.nodes:
                    c.cordon(node, args[2])
                elif kind == "place":
                    placed += 1
                    req = Request(args[1], cpus=0.5, mem=256 * M)
                    d = c.decide_builtin(f"p{placed}", req)
                    c.add(f"p{placed}", req)
                    if d.node is not None:
                        c.assign(f"p{placed}", d.node)
                p.logs.clear()
                d = c.decide("probe", PLAIN)
                assert d.reason == "mirrored (the policy failed)", (d, p.describe())
                assert list(p.logs) == mirror_of(c)
        finally:
            for p in programs:
                p.close()


# ---------------------------------------------------------------- 2. one clock


@pytest.fixture
def box(platform: Platform) -> Iterator[Any]:
    b = platform.launcher.take()
    try:
        yield b
    finally:
        b.close()


def _decide_message(end: float) -> bytes:
    c = small_cluster()
    nodes = [encode_node(c, n) for n in c.nodes.values()]
    return (json.dumps({"op": "decide", "c": "x", "x": [], "end": end, "full": True, "gone": []})[:-1]
            + ',"r":' + encode_request(PLAIN) + ',"nodes":[' + ",".join(nodes) + "]}\n").encode()


@pytest.mark.parametrize("policy", ["function decide(ctx) return 'node-1' end",
                                    "function decide(ctx) while true do end end"], ids=["quick", "loops"])
def test_the_deadline_is_on_the_schedulers_clock(policy: str, box: Any, platform: Platform) -> None:
    """The deadline travels as an absolute CLOCK_MONOTONIC time: a message that waited past it
    (here: the worker stopped, as a loaded machine would leave it) finds the turn over, however
    little CPU it has had.  A deadline in CPU time would have answered node-1, or run on."""
    box.load(platform.source, policy, Limits())
    if "return" in policy:  # given the time, it answers
        end = time.monotonic() + 60
        assert box.call(_decide_message(end), end + 1).get("node") == "node-1"
    os.kill(box.proc.pid, signal.SIGSTOP)
    try:
        end = time.monotonic() + 0.05
        box._write(_decide_message(end), end + 60)
        threading.Event().wait(max(0.0, end - time.monotonic()) + 0.01)  # until the deadline has passed
        assert time.monotonic() > end
    finally:
        os.kill(box.proc.pid, signal.SIGCONT)
    reply = box._read(time.monotonic() + 60)
    assert reply["fail"] == "timeout" and reply["fail_why"].startswith("ran past 50 ms"), reply


# ---------------------------------------------------------------- 6. loading in two steps


@pytest.mark.timeout(120)
def test_loading_is_bounded_by_the_load_budget(platform: Platform, cluster: Cluster) -> None:
    """Not by the (here ten-minute) allowance for an interpreter to start."""
    slow = Limits(startup=600, load=0.1)
    for text, why in ((STALLS_AT_LOAD, "timed out loading: did not load within 100 ms (stuck in one long call?)"),
                      (LOOPS_AT_LOAD, "timed out loading: ran past 100 ms at line 1 (the load budget)"),
                      ("function decide(ctx) end\n" + f"x = {FOREVER}", "timed out loading: did not load within "
                                                                        "100 ms (stuck in one long call?)")):
        with pytest.raises(PolicyError) as e:
            prepare_policy(text, platform=platform, limits=slow)
        assert str(e.value) == why
    assert Limits().load_budget == 0.25 and Limits(deadline=0.2).load_budget == 1.0
    assert Limits(deadline=60, startup=5).load_budget == 5


def test_loading_needs_no_cluster_and_the_dry_run_is_apart(platform: Platform, cluster: Cluster) -> None:
    """Step one on one thread, step two on the thread that owns the cluster."""
    got: list[Any] = []
    worker = threading.Thread(target=lambda: got.append(prepare_policy(
        "function decide(ctx) return 'node-2', 'second' end", platform=platform)))
    worker.start()
    worker.join()
    loaded = got[0]
    assert loaded.program is not None and loaded.program.defined == "decide"
    assert dry_run_policy(loaded, cluster) is loaded
    cluster.set_program(loaded.program)
    assert cluster.decide("x", PLAIN).reason == "policy: node-2 (second)"
    loaded.program.close()
    # a dry run that fails refuses the policy and leaves nothing running
    bad = prepare_policy("function decide(ctx) return 'node-9' end", platform=platform)
    assert bad.program is not None
    with pytest.raises(PolicyError, match="^dry run: bad answer: the policy chose node-9, which does not exist$"):
        dry_run_policy(bad, cluster)
    assert bad.program._box is None
    # text rules have nothing to load
    assert dry_run_policy(prepare_policy("pack\n", platform=platform), cluster).program is None


def test_a_worker_is_kept_started_ahead(platform: Platform) -> None:
    """So that loading a policy waits for its loading, not for Python and lupa to start."""
    loaded = prepare_policy("function decide(ctx) end", platform=platform)
    try:
        ahead = platform.launcher._ahead
        assert ahead is not None and ahead.usable()
        ahead.wait_started(60)
        loaded2 = prepare_policy("function score(n) return 1 end", platform=platform)
        assert loaded2.program is not None and loaded2.program._box is ahead
        loaded2.program.close()
    finally:
        assert loaded.program is not None
        loaded.program.close()


# ---------------------------------------------------------------- 7. a command's budget


def _cluster_of(n: int) -> Cluster:
    c = Cluster()
    for i in range(n):
        c.add_node(NodeFacts(f"node-{i:02d}", 64, 64 * G))
    return c


@pytest.mark.parametrize(("body", "least_per_decision"), [("while true do end", 0.05),
                                                          (FOREVER, 0.05 + 0.015)], ids=["stopped", "killed"])
def test_a_command_shares_one_budget(body: str, least_per_decision: float, make: Make) -> None:
    """A stalling policy under a place of many replicas: once the command's budget is spent, the
    rest go straight to the platform, each saying so, and the budget counts them.  Every decision
    asked of the policy takes at least its deadline (the hook stops it there by the clock; a kill
    comes at the deadline and the grace), which bounds how many the budget lets through."""
    c = _cluster_of(8)
    p = make(decide_body(body))
    c.set_program(p)
    names = [f"w-{i}" for i in range(40)]
    with p.budget(0.3) as b:
        decisions = c.simulate(names, PLAIN)
    asked = b.decisions - b.handed_over
    assert b.decisions == 40 and 1 <= asked <= int(0.3 / least_per_decision) + 1, (asked, b)
    assert p.counters["handed_over"] == b.handed_over and p.counters["timeouts"] == asked
    spent = [d for d in decisions if d.reason.endswith("; the command's policy budget of 300 ms was spent)")]
    assert len(spent) == b.handed_over and all(d.reason.startswith("platform: node-") for d in spent)
    assert all(d.reason.endswith("the policy timed out)") for d in decisions if d not in spent)
    assert len({d.node for d in decisions}) == 8  # spread: the platform still decides well
    assert b.line() == (f"policy budget of 300 ms spent after {asked} of 40 decisions; "
                        "the platform policy decided the rest")
    assert p.counters["builtin"] == 0
    # the next command has a budget of its own
    with p.budget(0.2) as again:
        c.decide("one-more", PLAIN)
    assert again.decisions == 1 and again.handed_over == 0 and again.line() == ""


def test_a_budget_that_lasts_hands_nothing_over(make: Make) -> None:
    c = _cluster_of(4)
    p = make("function decide(ctx) return pick(ctx, nil, by.most_loaded).name, 'packed' end")
    c.set_program(p)
    with p.budget(30) as b:
        decisions = c.simulate([f"x-{i}" for i in range(50)], PLAIN)
    assert b.decisions == 50 and b.handed_over == 0 and b.line() == ""
    assert {d.reason for d in decisions} == {f"policy: {decisions[0].node} (packed)"}
    with pytest.raises(ValueError):
        with p.budget():
            pass


def test_a_spent_budget_and_no_platform_leaves_the_rest_to_the_builtin(cluster: Cluster) -> None:
    with Platform() as platform, LuaProgram(decide_body("while true do end"), platform=platform) as p:
        p.start()
        cluster.set_program(p)
        platform.start()
        platform.source = "error('broken')"
        dead = pid(platform)
        os.kill(dead, signal.SIGKILL)
        os.waitpid(dead, 0)  # dead before the next decision, not dying during it
        with p.budget(0.12) as b:
            decisions = cluster.simulate([f"w-{i}" for i in range(20)], PLAIN)
        assert b.handed_over >= 17 and b.builtin == b.handed_over
        assert b.line().endswith("; the built-in spread decided the rest (the platform policy could not)")
        assert all("(built-in: the platform policy could not decide" in d.reason for d in decisions)
        # told twice (then the built-in decides the rest without asking), not once a decision
        assert sum("platform policy unavailable" in line for line in p.recent) == 2


def test_a_simulation_with_a_budget_counts_for_nothing(make: Make) -> None:
    c = _cluster_of(4)
    p = make(decide_body("while true do end"))
    c.set_program(p)
    before = dict(p.counters)
    with p.aside(), p.budget(0.1) as b:
        c.simulate([f"s-{i}" for i in range(10)], PLAIN)
    assert b.handed_over >= 7 and p.counters == before


def test_nested_budgets_end_with_the_outer(make: Make) -> None:
    p = make("function decide(ctx) end")
    with p.budget(0.5) as outer, p.budget(100) as inner:
        assert inner.end == outer.end
        assert p._budget is inner
    assert p._budget is None
    end = time.monotonic() + 5
    with p.budget(until=end) as b:
        assert b.end == end and 0 < b.seconds <= 5


def test_a_platform_policy_out_of_memory_is_loaded_again(cluster: Cluster) -> None:
    hog = ("function decide(ctx)\n"
           "  if ctx.request.image == 'hog' then local s = 'x' while true do s = s .. s end end\n"
           "  return ctx.nodes[1].name, 'first'\nend\n")
    with Platform(hog, limits=Limits(memory=4 << 20, deadline=0.5)) as platform, \
            LuaProgram(decide_body("error('x')"), platform=platform) as p:
        p.start()
        d = p.decide(cluster, "a", Request("hog"), frozenset())
        assert "(built-in: the platform policy could not decide; the policy failed)" in d.reason
        assert p.recent[-1].startswith("platform policy failed: memory: ran out of memory")
        d = p.decide(cluster, "b", PLAIN, frozenset())
        assert d.reason == "platform: node-1 (first; the policy failed)" and platform.restarts == 0
