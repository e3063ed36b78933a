"""YAML rules: what they compile to, how the compiled policy decides, and errors that name the line."""

from __future__ import annotations

import re

import pytest

from fornax_sched.policy import PolicyError, compile_policy, compile_yaml, load_policy
from fornax_sched.sched.core import Cluster
from fornax_sched.sched.model import Request

from .conftest import PLAIN, Make

G = 1 << 30

RULES = """\
scheduler:
  name: demo
  rules:
    - name: fallback
      condition: always
      action: {use: platform}
    - name: databases
      priority: 100
      condition:
        job.image: "db*"
      action:
        dispatch:
          worker_selection: most-mem-free
          nodes: {labels.disk: ssd, free_mem: {">=": 1G}}
          required: true
    - name: west-web
      priority: 50
      condition:
        all:
          - request.image: web
          - not: {request.name: "batch-*"}
      action:
        dispatch: {select: least-loaded, prefer: {labels.zone: west}}
    - name: huge
      priority: 200
      condition:
        request.cpus: {gt: 6}
      action:
        wait: {reason: too big for us}
"""


def test_rules_compile_to_lua_that_decides(make: Make, cluster: Cluster) -> None:
    lua, name = compile_yaml(RULES)
    assert name == "demo"
    order = [line for line in lua.splitlines() if re.match(r"-- \S+: priority", line)]
    assert order == ["-- huge: priority 200 (line 24)", "-- databases: priority 100 (line 7)",
                     "-- west-web: priority 50 (line 16)", "-- fallback: priority 0 (line 4)"]
    p = make(lua)

    def place(req: Request) -> str:
        d = p.decide(cluster, "c", req, frozenset())
        assert not p.last_failure, p.last_failure
        return f"{d.node} {d.reason}"

    assert place(Request("db")) == "node-3 policy: node-3 (rule databases)"
    assert place(Request("db", mem=20 * G)) == "None policy: rule databases: no node it allows has room"
    assert place(Request("web")) == "node-4 policy: node-4 (rule west-web)"  # west first, then least loaded
    # by the fallback rule
    assert place(Request("web", name="batch-7")) == "node-3 policy: node-3 (0 containers, fewest)"
    assert place(Request("web", cpus=7)) == "None policy: rule huge: too big for us"
    assert place(Request("web", cpus=3)) == "node-2 policy: node-2 (rule west-web)"  # node-4 has 2 cpus
    assert place(PLAIN) == "node-3 policy: node-3 (0 containers, fewest)"


def test_the_policy_file_takes_yaml(cluster: Cluster) -> None:
    loaded = load_policy(RULES, cluster)
    try:
        assert loaded.kind == "yaml" and loaded.source == RULES and loaded.name == "demo"
        assert "function decide(ctx)" in loaded.lua and loaded.program is not None
        assert loaded.program.defined == "decide"
    finally:
        assert loaded.program is not None
        loaded.program.close()


def doc(rules: str) -> str:
    return "scheduler:\n  rules:\n" + rules


ERRORS = [
    ("scheduler:\n  rules: [\n", "line 3: YAML: expected the node content"),
    ("scheduler:\n\trules: []\n", "line 2: YAML: found character '\\t'"),
    ("scheduler:\n  name: x\n", "line 2: scheduler needs rules"),
    ("scheduler:\n  rules: []\n", "line 2: rules must be a list of rules"),
    ("schedule:\n  rules: []\n", "line 1: unknown key 'schedule'"),
    ("scheduler:\n  rules:\n    - 3\n", "line 3: a rule must be a mapping"),
    (doc("    - name: a\n      condition: always\n"), "line 3: rule 'a' needs an action"),
    (doc("    - condition: always\n      action: {use: platform}\n"), "line 3: a rule needs a name"),
    (doc("    - name: a\n      action: {use: platform}\n"), "line 3: rule 'a' needs a condition"),
    (doc("    - name: a\n      condition: sometimes\n      action: {use: platform}\n"),
     "line 4: rule 'a': a condition is always, or tests"),
    (doc("    - name: a\n      condition: always\n      action: {use: platform}\n      priority: high\n"),
     "line 6: rule 'a': priority must be a whole number"),
    (doc("    - name: a\n      condition: always\n      action: {use: platform}\n"
         "    - name: a\n      condition: always\n      action: {use: platform}\n"),
     "line 6: a second rule named 'a'"),
    (doc("    - name: a\n      condition:\n        request.gpu: 1\n      action: {use: platform}\n"),
     "line 5: rule 'a': unknown field 'gpu'"),
    (doc("    - name: a\n      condition:\n        pod.image: x\n      action: {use: platform}\n"),
     "line 5: rule 'a': unknown test 'pod.image'"),
    (doc("    - name: a\n      condition:\n        request.mem: {'>=': lots}\n      action: {use: platform}\n"),
     "line 5: bad rule 'a': request.mem >= 'lots'"),
    (doc("    - name: a\n      condition:\n        request.image: {'>': 3}\n      action: {use: platform}\n"),
     "line 5: rule 'a': request.image: > compares numbers"),
    (doc("    - name: a\n      condition:\n        request.cpus: two\n      action: {use: platform}\n"),
     "line 5: rule 'a': request.cpus: want a number, not 'two'"),
    (doc("    - name: a\n      condition:\n        request.labels.gpu: yes\n      action: {use: platform}\n"),
     "line 5: rule 'a': request.labels.gpu: want text (quote it)"),
    (doc("    - name: a\n      condition:\n        request.image: {like: x}\n      action: {use: platform}\n"),
     "line 5: rule 'a': request.image: unknown test 'like'"),
    (doc("    - name: a\n      condition:\n        request.image: x\n        request.image: y\n"
         "      action: {use: platform}\n"), "line 6: request.image given twice"),
    (doc("    - name: a\n      condition: always\n      action: {dispatch: fastest}\n"),
     "line 5: rule 'a': unknown selection 'fastest'"),
    (doc("    - name: a\n      condition: always\n      action:\n        dispatch: {nodes: {labels.x: 1.5}}\n"),
     "line 6: rule 'a': nodes: labels.x: quote 1.5"),
    (doc("    - name: a\n      condition: always\n      action:\n        dispatch: {nodes: {gpus: 1}}\n"),
     "line 6: rule 'a': nodes: unknown field 'gpus'"),
    (doc("    - name: a\n      condition: always\n      action: {use: platform, wait: x}\n"),
     "line 5: rule 'a': an action is exactly one of dispatch, use, wait"),
    (doc("    - name: a\n      condition: always\n      action: {use: other}\n"),
     "line 5: rule 'a': use wants platform"),
    (doc("    - name: a\n      condition: always\n      action: {evict: x}\n"),
     "line 5: unknown key 'evict' in rule 'a''s action"),
    (doc("    - name: a\n      condition: always\n      action:\n        dispatch: {required: maybe}\n"),
     "line 6: rule 'a': required wants true or false"),
]


@pytest.mark.parametrize(("text", "error"), ERRORS, ids=[e for _, e in ERRORS])
def test_errors_name_the_line(text: str, error: str) -> None:
    with pytest.raises(PolicyError) as e:
        compile_policy(text)
    assert str(e.value).startswith(error), str(e.value)


def test_aliases_do_not_multiply_the_work() -> None:
    """Each alias doubles the tests: 2**24 of them, unless the compiler stops counting early."""
    lines = ["scheduler:", "  rules:", "    - name: x", "      action: {use: platform}", "      condition:",
             "        all:", "          - &m1 {any: [{request.image: x}, {request.image: y}]}"]
    lines += [f"          - &m{i} {{any: [*m{i - 1}, *m{i - 1}]}}" for i in range(2, 25)]
    with pytest.raises(PolicyError, match=r"^line \d+: too large: more than 5000 YAML values"):
        compile_policy("\n".join(lines) + "\n")


def test_text_rules_still_work(cluster: Cluster) -> None:
    loaded = load_policy("pack\naffinity zone=west\n", cluster)
    assert loaded.kind == "rules" and loaded.program is None and loaded.lua == ""
    assert loaded.rules is not None and loaded.rules.text() == "pack\naffinity zone=west\n"
    with pytest.raises(PolicyError, match="^line 2: unknown rule 'packed'"):
        compile_policy("spread\npacked\n")
