"""The Lua platform policy agrees with the built-in spread, and the helpers with the Python they mirror.

The built-in spread breaks ties among the nodes with the fewest containers
by an order internal to its index; platform.lua breaks them by name.  So the
check is: the same answer to "can it be placed?", the same number of
containers on the chosen node, both feasible, the same words when it cannot
be placed, and platform.lua's choice exactly the first by (containers, name).
"""

from __future__ import annotations

from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fornax_sched.policy import LuaProgram
from fornax_sched.sched.core import Cluster
from fornax_sched.sched.model import NodeFacts, Request
from fornax_sched.units import SizeError, parse_size

G, M = 1 << 30, 1 << 20
NAMES = ["a1", "a2", "b1", "b12", "node-1", "node-2", "node-10", "web-x", "z"]


@pytest.fixture(scope="module")
def platform() -> Iterator[LuaProgram]:
    with LuaProgram(None) as p:
        p.start()
        yield p


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    c = Cluster()
    names = draw(st.lists(st.sampled_from(NAMES), min_size=0, max_size=8, unique=True))
    for name in names:
        labels = {}
        if zone := draw(st.sampled_from([None, "east", "west"])):
            labels["zone"] = zone
        if draw(st.booleans()):
            labels["disk"] = "ssd"
        status = draw(st.sampled_from(["online"] * 4 + ["suspect", "dead"]))
        c.add_node(NodeFacts(name, draw(st.sampled_from([1, 2, 4.5, 8])), draw(st.sampled_from([G, 2 * G, 4 * G])),
                             labels), status)
        if draw(st.integers(0, 4)) == 0:
            c.cordon(name)
    if names:
        for j in range(draw(st.integers(0, 14))):
            req = Request(draw(st.sampled_from(["web", "db"])), cpus=draw(st.sampled_from([0.25, 0.5, 1.0])),
                          mem=draw(st.sampled_from([128 * M, 512 * M])))
            c.add(f"c{j}", req)
            c.assign(f"c{j}", draw(st.sampled_from(names)), force=True)
    return c


globs = st.sampled_from(["*", "a*", "?1", "node-[12]", "node-*", "b*", "[!a]*", "web-?", "*1*"])
requests = st.builds(
    Request,
    image=st.just("hello"),
    cpus=st.sampled_from([0, 0.25, 0.5, 1, 3, 5]),
    mem=st.sampled_from([0, 256 * M, G, 3 * G]),
    labels=st.lists(st.sampled_from([("zone", "east"), ("disk", "ssd"), ("zone", "west")]), max_size=2).map(tuple),
    include=st.lists(globs, max_size=2).map(tuple),
    exclude=st.lists(globs, max_size=1).map(tuple),
    avoid=st.lists(st.sampled_from(["c1", "c[0-3]", "c1*", "c?"]), max_size=1).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(c=clusters(), req=requests, exclude=st.lists(st.sampled_from(NAMES), max_size=2).map(frozenset))
def test_platform_lua_agrees_with_the_builtin_spread(platform: LuaProgram, c: Cluster, req: Request,
                                                   exclude: frozenset[str]) -> None:
    ours = platform.decide(c, "probe", req, exclude)
    theirs = c.decide_builtin("probe", req, exclude)
    assert platform.counters["builtin"] == 0 and not platform.last_failure
    if theirs.node is None:
        assert ours.node is None and ours.reason == theirs.reason
        return
    assert ours.node is not None, ours.reason
    a, b = c.nodes[ours.node], c.nodes[theirs.node]
    assert c.feasible(a, req) and ours.node not in exclude
    assert len(a.containers) == len(b.containers)
    first = min((len(n.containers), n.name) for n in c.nodes.values() if n.name not in exclude and c.feasible(n, req))
    assert ours.node == first[1]


def test_platform_lua_places_like_the_builtin_in_a_stream() -> None:
    """Placing one after another, the clusters stay alike: node by node the same container counts."""
    ours, theirs = Cluster(), Cluster()
    for c in (ours, theirs):
        for i in range(30):
            c.add_node(NodeFacts(f"node-{i:02d}", 4, 8 * G, {"disk": "ssd"} if i % 3 == 0 else {}))
    with LuaProgram(None) as p:
        ours.set_program(p)
        for i in range(200):
            req = Request("web", cpus=0.25, mem=128 * M, labels=(("disk", "ssd"),) if i % 4 == 0 else ())
            a, b = ours.place(f"c{i}", req), theirs.place(f"c{i}", req)
            assert (a.node is None) == (b.node is None)
        assert p.counters["builtin"] == 0
    assert sorted(len(n.containers) for n in ours.nodes.values()) == sorted(
        len(n.containers) for n in theirs.nodes.values())


# ---------------------------------------------------------------- helpers against Python


@pytest.fixture(scope="module")
def helpers() -> object:
    import lupa.lua54 as lua

    rt = lua.LuaRuntime(register_eval=False, register_builtins=False)
    sandbox = Path(__file__).resolve().parents[2] / "fornax_sched" / "policy" / "sandbox.lua"
    return rt.execute(sandbox.read_text())


CHARS = "ab1-[]!?*."
# Patterns from random text, and from pieces: classes with dashes and ranges are where fnmatch is subtle.
pieces = st.one_of(st.sampled_from(["*", "?", "a", "1", "-", ".", "]"]),
                   st.builds(lambda neg, body: "[" + neg + body + "]", st.sampled_from(["", "!"]),
                             st.text("ab1-]!.", min_size=1, max_size=5)))
patterns = st.one_of(st.text(CHARS, max_size=8), st.lists(pieces, max_size=5).map("".join))


@settings(max_examples=1500, deadline=None)
@given(name=st.text("ab1-]!.", max_size=8), pattern=patterns)
def test_glob_is_fnmatchcase(helpers: object, name: str, pattern: str) -> None:
    assert helpers.glob(name, pattern) == fnmatchcase(name, pattern), (name, pattern)  # type: ignore[attr-defined]


def test_glob_classes_exhaustively(helpers: object) -> None:
    """Every [...] body of up to four characters, against every one-character name."""
    from itertools import product

    alphabet = "ab1-!]"
    bodies = ["".join(p) for n in range(1, 5) for p in product(alphabet, repeat=n)]
    wrong = [(name, pat) for body in bodies for pat in (f"[{body}]", f"[!{body}]", f"[{body}")
             for name in alphabet + "[" if helpers.glob(name, pat) != fnmatchcase(name, pat)]  # type: ignore
    assert not wrong, wrong[:10]


@settings(max_examples=800, deadline=None)
@given(text=st.text("0123456789.kKmMgGtTbBi x", max_size=10))
def test_size_is_parse_size(helpers: object, text: str) -> None:
    import lupa.lua54 as lua

    try:
        want: int | None = parse_size(text, allow_zero=True)
    except SizeError:
        want = None
    try:
        got = helpers.size(text)  # type: ignore[attr-defined]
    except lua.LuaError:
        got = None
    assert got == want, text


def test_size_refuses_past_the_cap_as_parse_size(helpers: object) -> None:
    """At the cap (8192T, 2^53 bytes) and past it, whole numbers too long for a float or an int64."""
    import lupa.lua54 as lua

    for text in ("8192T", "8193T", "9007199254740992", "9007199254740993", "99999999999999999999T",
                 "99999999999999999999999", "8192.0001T", "8191.5T"):
        try:
            want: int | None = parse_size(text)
        except SizeError:
            want = None
        try:
            got = helpers.size(text)  # type: ignore[attr-defined]
        except lua.LuaError as e:
            assert "must be at most 8192T" in str(e), e
            got = None
        assert got == want, text
