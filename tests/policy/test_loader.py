"""From text to an active policy: telling the forms apart, syntax, the dry run, and what is kept on failure."""

from __future__ import annotations

import configparser

import pytest

from fornax_sched.policy import (
    PolicyError,
    compile_policy,
    detect_kind,
    load_policy,
    platform_path,
    platform_source,
    sample_cluster,
)
from fornax_sched.policy.engine import WORKER
from fornax_sched.sched.core import Cluster
from fornax_sched.sched.model import Policy

from .conftest import PLAIN, ROOT_DIR


@pytest.mark.parametrize(("text", "kind"), [
    ("", "rules"),
    ("# nothing yet\n", "rules"),
    ("spread\n", "rules"),
    ("  # comment\naffinity zone=east\n", "rules"),
    ("anti-affinity web-* spread\n", "rules"),
    ("scheduler:\n  rules: []\n", "yaml"),
    ("---\n# rules\nscheduler:\n", "yaml"),
    ("schedulr:\n  rules: []\n", "yaml"),  # a typo is still YAML, and gets a YAML error
    ("-- my policy\nfunction decide(ctx) end\n", "lua"),
    ("--- doc comment\nfunction decide(ctx) end\n", "lua"),
    ("function decide(ctx) return nil end\n", "lua"),
    ("local x = 1\n", "lua"),
    ("sprad\n", "lua"),
])
def test_detect_kind(text: str, kind: str) -> None:
    assert detect_kind(text) == kind


def test_lua_syntax_errors_name_the_line() -> None:
    with pytest.raises(PolicyError, match=r"^line 3: 'end' expected \(to close 'function' at line 1\) near <eof>"):
        compile_policy("function decide(ctx)\n  return 'node-1'\n")
    with pytest.raises(PolicyError, match=r"^line 2: <name> expected near '='"):
        compile_policy("-- policy\nlocal = 3\n")
    assert compile_policy("function decide(ctx) end").kind == "lua"


def test_what_load_policy_refuses(cluster: Cluster) -> None:
    cases = {
        "-- nothing to call\nlocal x = 1\n": "the policy defines none of decide, filter and score",
        "decide = 5\n": "decide is a number, not a function",
        "error('no')\n": "line 1: no",
        "function decide(ctx)\n  return ctx.nodes[1].labels.gpu.model\nend\n":
            "dry run: line 2: attempt to index a nil value (field 'gpu')",
        "function decide(ctx) return 'node-7' end\n":
            "dry run: bad answer: the policy chose node-7, which does not exist",
        "function decide(ctx) while true do end end\n": "dry run: timed out: ran past 50 ms at line 1",
        "x" * (300 << 10): "the policy is larger than 256K",
    }
    for text, error in cases.items():
        with pytest.raises(PolicyError) as e:
            load_policy(text, cluster)
        assert str(e.value).startswith(error), (text[:60], str(e.value))


def test_a_refused_policy_changes_nothing(cluster: Cluster) -> None:
    old = load_policy("function decide(ctx) return 'node-1' end\n", cluster)
    assert old.program is not None
    cluster.set_program(old.program)
    cluster.cordon("node-2")
    with pytest.raises(PolicyError):
        load_policy("function decide(ctx) error('broken') end\n", cluster)
    assert cluster.program is old.program and cluster.changed == {"node-1", "node-2", "node-3", "node-4"}
    assert cluster.decide("x", PLAIN).reason == "policy: node-1"
    old.program.close()


def test_a_loaded_policy_is_ready_to_activate(cluster: Cluster) -> None:
    loaded = load_policy("-- mine\nfunction score(node) return node.free_cpus end\n", cluster)
    assert loaded.kind == "lua" and loaded.lua == loaded.source and loaded.rules is None
    assert loaded.program is not None and loaded.program.defined == "score"
    try:
        cluster.set_policy(Policy())
        cluster.set_program(loaded.program)
        assert cluster.place("x", PLAIN).node == "node-3"
        assert loaded.program.counters["decisions"] == 1  # the dry run is not counted
    finally:
        loaded.program.close()


def test_a_dry_run_against_an_empty_cluster() -> None:
    loaded = load_policy("function decide(ctx) return ctx.nodes[1] and ctx.nodes[1].name end\n", Cluster())
    assert loaded.program is not None
    loaded.program.close()


def test_the_platform_policy_ships_with_the_package() -> None:
    assert platform_path() == ROOT_DIR / "policies" / "platform.lua"
    assert "function decide(ctx)" in platform_source()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT_DIR / "setup.cfg")
    assert "policies/platform.lua" in cfg["options.data_files"]["share/fornax-sched/policies"]
    assert cfg["options.package_data"]["fornax_sched.policy"].strip() == "*.lua"
    assert WORKER.with_name("sandbox.lua").is_file()


def test_sample_cluster_checks_offline() -> None:
    c = sample_cluster()
    loaded = load_policy(platform_source(), c)
    assert loaded.program is not None
    try:
        decisions = loaded.program.dry_run(c)  # a plain request, and the two latest the cluster holds
        assert len(decisions) == 3 and decisions[0].node == "node-4"  # the one empty node
        for d, req in zip(decisions, [PLAIN, *[p.request for p in c.placements.values()][::-1]], strict=False):
            assert d.node is not None and c.feasible(c.nodes[d.node], req)
    finally:
        loaded.program.close()
