"""Every refusal of a policy is one line, naming the policy's line where there is one.

9P clients show an error whole and a 9P2000.L client only its errno: a
traceback, or a message spread over lines, reaches nobody.  The forms a
refusal takes are a fixed set: ``line N: ...``, or one of REASONS (each
possibly after ``dry run: ``).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fornax_sched.policy import Limits, Platform, PolicyError, compile_policy, load_policy
from fornax_sched.sched.core import Cluster

from .conftest import small_cluster

REASONS = (
    r"line \d+: \S.*",
    r"timed out: ran past \d+ ms( at line \d+)?",  # a dry run's decision stopped by the hook
    r"no answer within \d+ ms \(stuck in one long call\?\)",  # ... or killed
    r"bad answer: .+",
    r"the policy chose \S+, which .+",
    r"ran out of memory( \(the cap is .+\))?",
    r"timed out loading: (ran past \d+ ms( at line \d+)? \(the load budget\)|did not load within \d+ ms "
    r"\(stuck in one long call\?\))",
    r"ran out of memory loading \(the cap is \S+\)",
    r"the policy defines none of decide, filter and score",
    r"(decide|filter|score) is a \w+, not a function",
    r"the policy is larger than \d+K",
    r"the policy is too large to parse",
    r"the policy is a binary chunk \(.+\): only Lua source is taken",
    r"the policy did not load: .+",
    r"an error with a \w+ value",
    r"an error with an empty message",
    r"YAML: .+",
    r"empty YAML: .+",
)
REFUSAL = re.compile(r"(dry run: )?(" + "|".join(REASONS) + r")( \(in the compiled Lua\))?")


def assert_refusal(message: str) -> None:
    assert "\n" not in message and "\r" not in message, repr(message)
    assert all(ch.isprintable() for ch in message), repr(message)
    assert REFUSAL.fullmatch(message), message


@pytest.mark.parametrize(("text", "line"), [
    ("return " + "{" * 100_000 + "}" * 100_000 + "\n", 1),
    ("x = " + "{" * 100_000 + "}" * 100_000 + "\n", 1),
    ("-- a table\n\nx = {\n" + "{" * 300 + "}" * 300 + "}\n", 4),
    ("x = {\n" + "{\n" * 300 + "}\n" * 300 + "}\n", None),  # one a line: where ~200 levels are reached
    ("x = " + "(" * 300 + "1" + ")" * 300, 1),
    ("x = 1" + " .. 1" * 300, 1),
    ("\r\n\r\nx = " + "- " * 300 + "1", 3),
    ("function decide(ctx)\n" + "if true then\n" * 250 + "end\n" * 250 + "end\n", None),
    ('x = "' + "\\\n" * 5 + '"\n' + "y = " + "{" * 300, 7),
])
def test_a_policy_nested_too_deeply_is_refused_with_its_line(text: str, line: int | None) -> None:
    """Lua's parser runs out of C stack without saying where (and lupa added a traceback)."""
    with pytest.raises(PolicyError) as e:
        compile_policy(text)
    m = re.fullmatch(r"line (\d+): nested too deeply to parse \(Lua allows about 200 levels of "
                     r"brackets, blocks and operators\)", str(e.value))
    assert m, str(e.value)
    assert int(m.group(1)) == line if line is not None else 150 < int(m.group(1)) < 210
    assert_refusal(str(e.value))


def test_refusals_at_each_step_are_one_line(platform: Platform, cluster: Cluster) -> None:
    cases = [
        "x" * (300 << 10),  # too large
        "function decide(ctx)\n  return 1 +\n",  # syntax
        "error({})\nfunction decide(ctx) end\n",  # a table error at load: the line still named
        "error('two\\nlines')\n",  # an error message of two lines
        "error(string.rep('x', 5000))\n",  # a long one
        "function decide(ctx) error(setmetatable and {} or 'x\\r\\ny') end\n",
        "function decide(ctx)\n  local function f(n) return f(n + 1) + 1 end\n  return f(1)\nend\n",  # stack
        "function decide(ctx)\n  local function f() return pcall(f) end\n  f()\n  error('deep')\nend\n",
        "local s = 'x' while true do s = s .. s end",  # memory at load
        "function decide(ctx) local s = 'x' while true do s = s .. s end end",  # memory in the dry run
        "decide = {}\n",
        "scheduler:\n  rules:\n    - name: x\n      condition: {request.cpus: {gt: many}}\n",
        "scheduler: [\n",
        "function decide(ctx) return ctx.nodes[1].name .. 1 end",
    ]
    for text in cases:
        with pytest.raises(PolicyError) as e:
            load_policy(text, cluster, platform=platform)
        assert_refusal(str(e.value))
    with pytest.raises(PolicyError) as e:
        load_policy("error({})\nfunction decide(ctx) end\n", cluster, platform=platform)
    assert str(e.value) == "line 1: an error with a table value"


# Pieces of Lua, and of things that are not Lua, to make odd texts from.
PIECES = ["{", "}", "(", ")", "[[", "]]", "[=[", "]=]", "--", "--[[", '"', "'", "\\", "\n", "\r", "\r\n", "\x00",
          "\v", "\f", "\u2028", "é", "function decide(ctx)", "function score(n)", "end", "return", "local x = ",
          "x = ", "error(", "error({})", "error('e', 0)", "pcall(", "1", ",", "..", "nil", "ctx.nodes[1].x.y", " ",
          "'node-9'", "if", "then", "do", "=", "#", "scheduler:", "  rules:", "- name: x", ";", "goto", "::l::",
          "spread", "pack", "0x", "1e999", "and", "...", "setmetatable", "string.rep('a', 25):find('.-.-.-.-b')"]
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4),
                           st.integers(1, 400).map(lambda n: "{" * n), st.integers(1, 400).map(lambda n: "(" * n)),
                 max_size=30).map("".join)

# Programs that pass the syntax check, to reach loading and the dry run.
BODIES = ["error('boom')", "error({})", "error()", "error(nil)", "error(1.5)", "return 'node-9'", "return 42",
          "return {}", "return nil, 'waiting'", "return {unschedulable = 1}", "local t = ctx.nodes[1].a.b",
          "while true do end", "local s = 'x' while true do s = s .. s end", "return ctx.nodes[1]",
          "local function f() return f() + 1 end f()", "local function f() pcall(f) end f() error('after')",
          "local t = {table.unpack({}, 1, 1e7)}", "string.rep('a', 300):find('.-.-.-b')", "return 'node-1', 7",
          "x = {" + "{" * 150 + "}" * 150 + "}", "error(string.rep('\\n', 3))", "return {1, 2}", ""]
programs = st.builds(
    lambda top, body, tail: f"{top}\nfunction decide(ctx)\n  {body}\nend\n{tail}",
    st.sampled_from(["", "x = 1", "error('at load')", "while true do end", "decide = 3", "local t = {}"] + BODIES[:4]),
    st.sampled_from(BODIES),
    st.sampled_from(["", "filter = 1", "function score(n) return 'x' end", "score = {}"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_odd_texts_are_refused_in_one_line(text: str) -> None:
    try:
        compile_policy(text)
    except PolicyError as e:
        assert_refusal(str(e))


FAST = Limits(deadline=0.02, load=0.05)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=st.one_of(programs, texts))
def test_odd_programs_are_refused_in_one_line(platform: Platform, text: str) -> None:
    try:
        loaded = load_policy(text, small_cluster(), platform=platform, limits=FAST)
    except PolicyError as e:
        assert_refusal(str(e))
    else:
        if loaded.program is not None:
            loaded.program.close()
