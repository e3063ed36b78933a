"""YAML rules: what they compile to, how the compiled policy decides, and errors that name the line."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fornax_sched.policy import PolicyError, compile_policy, compile_yaml, load_policy
from fornax_sched.policy.yamlrules import lua_comment, lua_string
from fornax_sched.sched.core import Cluster
from fornax_sched.sched.model import NodeFacts, Request

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


# ---------------------------------------------------------------- text from YAML never becomes code


def yaml_quote(s: str) -> str:
    """s as a YAML double-quoted scalar, every character outside printable ASCII escaped."""
    return '"' + "".join(ch if " " <= ch <= "~" and ch not in '"\\' else f"\\U{ord(ch):08X}" for ch in s) + '"'


# Characters that end a line or a comment somewhere (Lua: \n and \r), or are not text.
NASTY = ["\r", "\n", "\r\n", "\x00", "\v", "\f", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\u202e", "\ufeff"]
# Printable text that would be code if it were spliced: long brackets, quotes, statements.
TRICKY = ["]]", "--[[", "]] os.exit(1) --[[", "]==] --[==[", '"); os.exit(1) --', "'", "\\", "\\\\",
          "end end function decide(ctx) return 'node-1' end --", "ναι, zone ☃"]
ALL_NASTY = "".join(NASTY) + "]] --[[ x"

TEMPLATE = """\
scheduler:
  name: {sched}
  version: {sched}
  description: {about}
  rules:
    - name: {rule}
      description: {about}
      priority: 10
      condition:
        request.image: {{eq: {value}}}
      action:
        wait: {reason}
    - name: {other}
      condition: always
      action:
        dispatch: {{select: most-loaded, nodes: {{{key}: {{eq: {value}}}}}, prefer: {{labels.zone: {{eq: {value}}}}}}}
"""


def template(sched: str = "s", about: str = "plain", rule: str = "r1", other: str = "r2", value: str = "plain",
             reason: str = "why", key: str = "labels.k-1") -> str:
    return TEMPLATE.format(sched=yaml_quote(sched), about=yaml_quote(about), rule=yaml_quote(rule),
                           other=yaml_quote(other), value=yaml_quote(value), reason=yaml_quote(reason),
                           key=yaml_quote(key))


@pytest.mark.parametrize("bad", NASTY, ids=[f"U+{ord(b[0]):04X}" for b in NASTY])
def test_names_and_reasons_refuse_control_characters(bad: str) -> None:
    """A name or a reason is one line of printable text; anything else is refused, naming the line."""
    code = f"U+{ord(bad[0]):04X}"
    for fields, line, what in (({"rule": f"a{bad}b"}, 6, "a rule's name"),
                               ({"other": f"{bad}"}, 13, "a rule's name"),
                               ({"sched": f"x{bad}"}, 2, "the scheduler's name"),
                               ({"reason": f"x{bad}y"}, 12, "rule 'r1': wait (the reason)")):
        with pytest.raises(PolicyError) as e:
            compile_policy(template(**fields))
        assert str(e.value) == (f"line {line}: {what} must be one line of printable text: it holds {code}, "
                                "a control character or line break"), fields


def test_a_raw_control_character_is_refused_with_its_line() -> None:
    with pytest.raises(PolicyError, match=r"^line 3: YAML: U\+0000: special characters are not allowed$"):
        compile_policy("scheduler:\n  rules:\n    - name: a\x00b\n")


def _program_shape(lua: str) -> list[str]:
    """What the Lua does (its tokens, strings blanked); every comment checked to be one short line."""
    from .lualex import code, comments

    found = comments(lua)
    for t in found:
        assert t.text.startswith("-- ") or t.text == "--", t  # a short comment: never --[ (a long one)
        assert "\n" not in t.text and "\r" not in t.text, t
        assert all(" " <= ch <= "~" or (ch > "\x7f" and ch.isprintable()) for ch in t.text), t
    # one comment a line: a comment never runs into the next line's code
    lines = lua.split("\n")
    assert all(line.count("--") == 0 or line.lstrip().startswith("--") or "'" in line or '"' in line
               for line in lines)
    return code(lua)


@pytest.mark.parametrize("tricky", TRICKY)
def test_text_from_yaml_stays_in_strings_and_comments(tricky: str, make: Make, cluster: Cluster) -> None:
    """Names, descriptions, values, reasons and label keys holding long brackets, quotes, line breaks
    and code compile to the very program harmless text compiles to, and it decides the same."""
    harmless = template()
    nasty_value = tricky + ALL_NASTY
    nasty = template(sched=tricky, about=nasty_value, rule=tricky, other=tricky + " 2", value=nasty_value,
                     reason=tricky, key="labels." + nasty_value)
    plain_lua, bad_lua = compile_policy(harmless).lua, compile_policy(nasty).lua
    assert _program_shape(bad_lua) == _program_shape(plain_lua)
    # and it decides the same: the rule that waits, the rule that dispatches (to the busiest of the nodes
    # whose label k holds the value, or else no node: the platform policy)
    for lua, value, key, rule, reason in ((plain_lua, "plain", "k-1", "r1", "why"),
                                          (bad_lua, nasty_value, nasty_value, tricky, tricky)):
        cluster.nodes["node-4"].facts = NodeFacts("node-4", 2, 4 * G, {"zone": value, key: value})
        cluster.changed.add("node-4")
        p = make(lua)
        waits = p.decide(cluster, "c", Request(value), frozenset())
        assert waits.node is None and waits.reason.startswith("policy: rule "), waits
        assert waits.reason == "policy: " + _cleaned(f"rule {rule}: {reason}")
        d = p.decide(cluster, "c", Request("other"), frozenset())
        assert (d.node, d.reason) == ("node-4", "policy: " + _cleaned(f"node-4 (rule {rule} 2)" if rule == tricky
                                                                       else "node-4 (rule r2)")), d
        assert not p.last_failure


def _cleaned(s: str) -> str:
    """A reason as the sandbox makes it one line (sandbox.lua's clean)."""
    return "".join("?" if ord(ch) < 32 or ord(ch) == 127 else ch for ch in s)


@settings(max_examples=400, deadline=None)
@given(s=st.text(st.characters(codec=None, categories=None, exclude_categories=())))
def test_lua_string_and_lua_comment_hold_any_text(s: str) -> None:
    import lupa.lua54 as lua

    from .lualex import tokens

    rt = lua.LuaRuntime(register_eval=False, encoding=None)
    literal = lua_string(s)
    assert "\n" not in literal and "\r" not in literal
    assert rt.execute(("return " + literal).encode("utf-8", "surrogatepass")) == s.encode("utf-8", "surrogatepass")
    comment = lua_comment(s)
    assert [t.kind for t in tokens(comment)] == ["comment"] and "\n" not in comment and "\r" not in comment
    assert rt.execute((comment + "\nreturn 1").encode("utf-8", "surrogatepass")) == 1
    assert rt.execute((comment + "\rreturn 2").encode("utf-8", "surrogatepass")) == 2
