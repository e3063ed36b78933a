"""YAML scheduling rules, the ``scheduler: rules:`` form, compiled to readable Lua.

::

    scheduler:
      name: web-first
      rules:
        - name: web-on-ssd
          priority: 100
          condition:
            request.image: "web*"
          action:
            dispatch:
              select: least-loaded
              nodes: {labels.disk: ssd}
        - name: fallback
          condition: always
          action: {use: platform}

Rules are tried from the highest priority down (a tie keeps the file's
order); the first whose condition holds decides.  The Lua is what runs, so
it is written to be read: users see it when they read the policy back.
Every error names the YAML line (from the parser's marks), and nothing is
compiled that could fail at run time for a reason visible here.

No text from the YAML is ever spliced into the Lua as it is: values and
reasons become string literals through ``lua_string``, names and
descriptions become comments through ``lua_comment`` (which nothing can
end early), and label keys become fields only when they are plain
identifiers.  Names, reasons and the like must be one line of printable
text; a control character in one is refused, naming the line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..units import SizeError, parse_size
from .errors import PolicyError

MAX_NODES = 5000  # YAML nodes visited: aliases must not multiply the work

# Fields a condition may test, by kind: text, number, size (a number of bytes that may be written 512M).
REQUEST_FIELDS = {"image": "text", "name": "text", "container": "text", "cpus": "number", "mem": "size",
                  "replicas": "number"}
NODE_FIELDS = {"name": "text", "cpus": "number", "mem": "size", "free_cpus": "number", "free_mem": "size",
               "used_cpus": "number", "used_mem": "size", "containers": "number"}
SELECT = {"least-loaded": "least_loaded", "most-loaded": "most_loaded", "most-cpu-free": "most_cpu_free",
          "most-mem-free": "most_mem_free", "least-cpu-free": "least_cpu_free", "least-mem-free": "least_mem_free",
          "spread": "least_loaded", "pack": "most_loaded"}
OPS = {"eq": "==", "==": "==", "ne": "~=", "!=": "~=", "gt": ">", ">": ">", "ge": ">=", ">=": ">=",
       "lt": "<", "<": "<", "le": "<=", "<=": "<="}
LUA_KEYWORDS = set("and break do else elseif end false for function goto if in local nil not or repeat return "
                   "then true until while".split())
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
GLOB_CHARS = re.compile(r"[*?\[]")


def compile_yaml(text: str) -> tuple[str, str]:
    """(the Lua, the scheduler's name) for YAML rules; PolicyError naming the line if they are wrong."""
    try:
        loader = yaml.SafeLoader(text)  # the reader refuses characters YAML does not admit, here
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise PolicyError(f"{where}YAML: {e.problem or e.context}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not admit (a raw NUL, say)
        line = text.count("\n", 0, e.position) + 1 if isinstance(e.position, int) else None
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        raise PolicyError(f"{f'line {line}: ' if line else ''}YAML: {char}: {e.reason}") from None
    except yaml.YAMLError as e:
        raise PolicyError(f"YAML: {e}") from None
    try:
        if root is None:
            raise PolicyError("empty YAML: want scheduler: with rules:")
        return _Compiler(loader).top(root)
    finally:
        loader.dispose()


def lua_string(s: str) -> str:
    """A Lua string literal that Lua reads back as s in UTF-8 (lone surrogates as their bytes).

    Printable text stays readable; everything else (control characters, line
    and paragraph separators, format characters, surrogates) is written as
    decimal byte escapes, so the literal is always one line of printable text.
    """
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif " " <= ch <= "~" or (ch > "\x7f" and ch.isprintable()):
            out.append(ch)
        else:
            out.extend(f"\\{b:03d}" for b in ch.encode("utf-8", "surrogatepass"))
    out.append('"')
    return "".join(out)


def lua_comment(text: str) -> str:
    """A Lua comment line saying text: ``-- text``, with nothing in it that could end it or open a long one.

    A short comment ends at the first \\n or \\r; ``--`` followed by a long
    bracket would open a comment that ends elsewhere.  So the comment starts
    with ``-- `` (never ``--[``) and every character that is not printable
    (line terminators, control and format characters, separators,
    surrogates) is written as ``\\u{XXXX}`` text instead.
    """
    out = ["-- "]
    for ch in text:
        if " " <= ch <= "~" or (ch > "\x7f" and ch.isprintable()):
            out.append(ch)
        else:
            out.append(f"\\u{{{ord(ch):04X}}}")
    return "".join(out)


def _unprintable(value: str) -> str | None:
    """The first character of value that may not be in a name or a one-line text, as U+XXXX."""
    for ch in value:
        if not (" " <= ch <= "~" or (ch > "\x7f" and ch.isprintable())):
            return f"U+{ord(ch):04X}"
    return None


def _field(base: str, key: str) -> str:
    return f"{base}.{key}" if IDENT.match(key) and key not in LUA_KEYWORDS else f"{base}[{lua_string(key)}]"


def _grouped(expr: str) -> str:
    """expr in parentheses, unless one pair already holds all of it."""
    if expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, ch in enumerate(expr):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                if i == len(expr) - 1:
                    return expr
                break
    return f"({expr})"


def _size_literal(n: int) -> str:
    """Bytes as Lua, the way they were probably written: 64G is 64 << 30."""
    for shift in (40, 30, 20, 10):
        if n and n % (1 << shift) == 0:
            return f"({n >> shift} << {shift})"
    return str(n)


@dataclass
class _Rule:
    name: str
    priority: int
    line: int
    index: int
    code: list[str]


class _Compiler:
    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.seen = 0

    # ------------------------------------------------------------ reading YAML with its lines
    def fail(self, node: Node, msg: str) -> PolicyError:
        return PolicyError(f"line {node.start_mark.line + 1}: {msg}")

    def visit(self, node: Node) -> None:
        self.seen += 1
        if self.seen > MAX_NODES:
            raise self.fail(node, f"too large: more than {MAX_NODES} YAML values")

    def mapping(self, node: Node, what: str, allowed: tuple[str, ...] | None = None) -> dict[str, tuple[Node, Node]]:
        """A mapping's items by key, refusing duplicate and (if allowed is given) unknown keys."""
        self.visit(node)
        if not isinstance(node, MappingNode):
            raise self.fail(node, f"{what} must be a mapping (key: value lines)")
        out: dict[str, tuple[Node, Node]] = {}
        for k, v in node.value:
            self.visit(k)
            key = self.scalar(k, "a key")
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                raise self.fail(k, f"{key} given twice in {what}")
            if allowed is not None and key not in allowed:
                raise self.fail(k, f"unknown key {key!r} in {what}: want {', '.join(allowed)}")
            out[key] = (k, v)
        return out

    def scalar(self, node: Node, what: str) -> Any:
        self.visit(node)
        if not isinstance(node, ScalarNode):
            raise self.fail(node, f"{what} must be a single value")
        return self.loader.construct_object(node)

    def text(self, node: Node, what: str) -> str:
        """One non-empty line of printable text: a name, a reason, a selection."""
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(node, f"{what} must be text")
        value = str(value)
        if not value:
            raise self.fail(node, f"{what} must be one non-empty line")
        bad = _unprintable(value)
        if bad is not None:
            raise self.fail(node, f"{what} must be one line of printable text: it holds {bad}, a control "
                                  "character or line break")
        return value

    def prose(self, node: Node, what: str) -> list[str]:
        """A description: any text, kept as comment lines (what cannot be printed is escaped there)."""
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(node, f"{what} must be text")
        return [lua_comment(line.rstrip()) for line in str(value).splitlines() if line.strip()]

    # ------------------------------------------------------------ the document
    def top(self, root: Node) -> tuple[str, str]:
        doc = self.mapping(root, "the document", ("scheduler",))
        if "scheduler" not in doc:
            raise self.fail(root, "want scheduler: at the top")
        knode, snode = doc["scheduler"]
        sched = self.mapping(snode, "scheduler", ("name", "version", "description", "rules"))
        name = self.text(sched["name"][1], "the scheduler's name") if "name" in sched else ""
        version = self.text(sched["version"][1], "the version") if "version" in sched else ""
        about = self.prose(sched["description"][1], "the description") if "description" in sched else []
        if "rules" not in sched:
            raise self.fail(snode, "scheduler needs rules: a list of rules")
        rnode = sched["rules"][1]
        self.visit(rnode)
        if not isinstance(rnode, SequenceNode) or not rnode.value:
            raise self.fail(rnode, "rules must be a list of rules (- name: ...)")
        rules: list[_Rule] = []
        names: set[str] = set()
        for i, item in enumerate(rnode.value):
            rule = self.rule(item, i)
            if rule.name in names:
                raise self.fail(item, f"a second rule named {rule.name!r}")
            names.add(rule.name)
            rules.append(rule)
        rules.sort(key=lambda r: (-r.priority, r.index))
        return self.program(name, version, about, rules), name

    def rule(self, node: Node, index: int) -> _Rule:
        r = self.mapping(node, "a rule", ("name", "description", "condition", "action", "priority"))
        if "name" not in r:
            raise self.fail(node, "a rule needs a name")
        name = self.text(r["name"][1], "a rule's name")
        where = f"rule {name!r}"
        priority = 0
        if "priority" in r:
            pnode = r["priority"][1]
            p = self.scalar(pnode, "priority")
            if isinstance(p, bool) or not isinstance(p, int):
                raise self.fail(pnode, f"{where}: priority must be a whole number")
            priority = p
        if "condition" not in r:
            raise self.fail(node, f"{where} needs a condition: always, or tests on the request")
        if "action" not in r:
            raise self.fail(node, f"{where} needs an action: dispatch, use or wait")
        about = self.prose(r["description"][1], f"{where}'s description") if "description" in r else []
        cond = self.condition(r["condition"][1], where)
        body = self.action(r["action"][1], where, name)
        code = [lua_comment(f"{name}: priority {priority} (line {node.start_mark.line + 1})"), *about,
                "rules[#rules + 1] = function(ctx, req)"]
        if cond != "true":
            code.append(f"  if not {_grouped(cond)} then return end")
        code += ["  " + line for line in body]
        code.append("end")
        return _Rule(name, priority, node.start_mark.line + 1, index, code)

    # ------------------------------------------------------------ conditions
    def condition(self, node: Node, where: str) -> str:
        if isinstance(node, ScalarNode):
            value = self.scalar(node, "a condition")
            if value == "always" or value is True:
                return "true"
            raise self.fail(node, f"{where}: a condition is always, or tests such as request.image: \"web*\"")
        return self.tests(node, where, "request")

    def tests(self, node: Node, where: str, subject: str) -> str:
        """All the tests in a mapping, on the request or on a node, as one Lua expression."""
        items = self.mapping(node, f"{where}'s tests")
        if not items:
            raise self.fail(node, f"{where}: no tests given")
        parts = []
        for key, (knode, vnode) in items.items():
            if key in ("all", "any"):
                self.visit(vnode)
                if not isinstance(vnode, SequenceNode) or not vnode.value:
                    raise self.fail(vnode, f"{where}: {key} wants a list of tests")
                joined = f" {'and' if key == 'all' else 'or'} ".join(self.tests(v, where, subject) for v in vnode.value)
                parts.append(f"({joined})")
            elif key == "not":
                parts.append(f"not {_grouped(self.tests(vnode, where, subject))}")
            else:
                expr, kind = self.path(knode, key, where, subject)
                parts.append(self.match(vnode, expr, kind, f"{where}: {key}"))
        return " and ".join(parts)

    def path(self, knode: Node, key: str, where: str, subject: str) -> tuple[str, str]:
        """The Lua expression for a field and its kind (text, number, size, label)."""
        if subject == "request":
            head, _, rest = key.partition(".")
            if head not in ("request", "job") or not rest:
                raise self.fail(knode, f"{where}: unknown test {key!r}: want request.FIELD "
                                       f"({', '.join(REQUEST_FIELDS)}, labels.KEY), or all, any, not")
            fields, base = REQUEST_FIELDS, "req"
        else:
            rest = key.removeprefix("node.")
            fields, base = NODE_FIELDS, "n"
        if rest.startswith("labels."):
            label = rest.removeprefix("labels.")
            if not label:
                raise self.fail(knode, f"{where}: labels. needs a label name")
            return _field(f"{base}.labels", label), "label"
        if rest not in fields:
            raise self.fail(knode, f"{where}: unknown field {rest!r}: want {', '.join(fields)} or labels.KEY")
        if base == "req" and rest == "container":
            return "ctx.container", "text"
        if base == "n" and rest == "containers":
            return "n.ncontainers", "number"
        return _field(base, rest), fields[rest]

    def literal(self, node: Node, kind: str, what: str) -> str:
        """A value to compare a field of this kind with, as Lua."""
        value = self.scalar(node, what)
        if isinstance(value, bool) or value is None:
            raise self.fail(node, f"{what}: want {'text' if kind in ('text', 'label') else 'a number'}"
                                  f"{' (quote it)' if value is not None else ''}")
        if kind in ("text", "label"):
            if isinstance(value, float):
                raise self.fail(node, f"{what}: quote {value!r} to compare it as text")
            return lua_string(str(value))
        if isinstance(value, str):
            if kind == "size":
                try:
                    return _size_literal(parse_size(value, what, allow_zero=True))
                except SizeError as e:
                    raise self.fail(node, str(e)) from None
            raise self.fail(node, f"{what}: want a number, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(node, f"{what}: want a finite number")
        return repr(value)

    def match(self, node: Node, expr: str, kind: str, what: str) -> str:
        """A field tested against a value (equality, or a glob for text) or a mapping of operators."""
        if isinstance(node, ScalarNode):
            lit = self.literal(node, kind, what)
            value = self.scalar(node, what)
            if kind in ("text", "label") and isinstance(value, str) and GLOB_CHARS.search(value):
                return self.glob(expr, kind, lit)
            return f"{expr} == {lit}"
        ops = self.mapping(node, what)
        if not ops:
            raise self.fail(node, f"{what}: no test given")
        parts = []
        for op, (onode, vnode) in ops.items():
            if op in OPS:
                if OPS[op] not in ("==", "~=") and kind in ("text", "label"):
                    raise self.fail(onode, f"{what}: {op} compares numbers; this field is text")
                lit = self.literal(vnode, kind, f"{what} {op}")
                if kind == "label" and OPS[op] == "==":
                    parts.append(f"{expr} == {lit}")
                else:
                    parts.append(f"{expr} {OPS[op]} {lit}")
            elif op == "glob":
                if kind not in ("text", "label"):
                    raise self.fail(onode, f"{what}: glob matches text; this field is a number")
                parts.append(self.glob(expr, kind, lua_string(self.text(vnode, f"{what} glob"))))
            elif op == "exists":
                flag = self.scalar(vnode, f"{what} exists")
                if not isinstance(flag, bool):
                    raise self.fail(vnode, f"{what}: exists wants true or false")
                empty = {"label": "nil", "text": '""'}.get(kind, "0")
                parts.append(f"{expr} {'~=' if flag else '=='} {empty}")
            elif op == "in":
                self.visit(vnode)
                if not isinstance(vnode, SequenceNode) or not vnode.value:
                    raise self.fail(vnode, f"{what}: in wants a list of values")
                alts = " or ".join(f"{expr} == {self.literal(v, kind, what)}" for v in vnode.value)
                parts.append(f"({alts})")
            elif op == "not":
                parts.append(f"not {_grouped(self.match(vnode, expr, kind, what))}")
            else:
                raise self.fail(onode, f"{what}: unknown test {op!r}: want one of "
                                       f"{', '.join(OPS)}, glob, exists, in, not")
        return " and ".join(parts) if len(parts) == 1 else "(" + " and ".join(parts) + ")"

    @staticmethod
    def glob(expr: str, kind: str, lit: str) -> str:
        if kind == "label":
            return f"({expr} ~= nil and glob({expr}, {lit}))"
        return f"glob({expr}, {lit})"

    # ------------------------------------------------------------ actions
    def action(self, node: Node, where: str, name: str) -> list[str]:
        items = self.mapping(node, f"{where}'s action", ("dispatch", "use", "wait"))
        if len(items) != 1:
            raise self.fail(node, f"{where}: an action is exactly one of dispatch, use, wait")
        (verb, (knode, vnode)), = items.items()
        if verb == "use":
            target = self.text(vnode, f"{where}: use")
            if target not in ("platform", "platform-scheduler", "platform-policy"):
                raise self.fail(vnode, f"{where}: use wants platform (the platform policy)")
            return ["return platform.decide(ctx)"]
        if verb == "wait":
            if isinstance(vnode, MappingNode):
                w = self.mapping(vnode, f"{where}: wait", ("reason",))
                if "reason" not in w:
                    raise self.fail(vnode, f"{where}: wait wants reason: TEXT")
                reason = self.text(w["reason"][1], f"{where}: the reason")
            else:
                reason = self.text(vnode, f"{where}: wait (the reason)")
            return [f"return nil, {lua_string(f'rule {name}: {reason}')}"]
        return self.dispatch(vnode, where, name)

    def dispatch(self, node: Node, where: str, name: str) -> list[str]:
        select, keep, prefer, required = "least-loaded", None, None, False
        if isinstance(node, ScalarNode):
            select = self.text(node, f"{where}: dispatch")
            snode: Node = node
        else:
            d = self.mapping(node, f"{where}: dispatch",
                             ("select", "worker_selection", "nodes", "prefer", "required"))
            snode = node
            for key in ("select", "worker_selection"):
                if key in d:
                    snode = d[key][1]
                    select = self.text(snode, f"{where}: {key}")
            if "nodes" in d:
                keep = self.tests(d["nodes"][1], f"{where}: nodes", "node")
            if "prefer" in d:
                prefer = self.tests(d["prefer"][1], f"{where}: prefer", "node")
            if "required" in d:
                flag = self.scalar(d["required"][1], "required")
                if not isinstance(flag, bool):
                    raise self.fail(d["required"][1], f"{where}: required wants true or false")
                required = flag
        if select not in SELECT:
            raise self.fail(snode, f"{where}: unknown selection {select!r}: want {', '.join(SELECT)}")
        rank = f"by.{SELECT[select]}"
        keep_fn = f"function(n) return {keep} end" if keep else "nil"
        rank_fn = f"function(n) return ({prefer}) and 1 or 0, {rank}(n) end" if prefer else rank
        call = f"local node = pick(ctx, {keep_fn}, {rank_fn})"
        out = [call] if len(call) <= 100 else [f"local node = pick(ctx, {keep_fn},", f"  {rank_fn})"]
        out.append(f"if node then return node.name, {lua_string(f'rule {name}')} end")
        if required:
            out.append(f"return nil, {lua_string(f'rule {name}: no node it allows has room')}")
        else:
            out.append("-- no node it allows has room: the next rule tries")
        return out

    # ------------------------------------------------------------ the program
    @staticmethod
    def program(name: str, version: str, about: list[str], rules: list[_Rule]) -> str:
        title = f"scheduler {name}" if name else "scheduler"
        if version:
            title += f", version {version}"
        out = [
            "-- Compiled from YAML rules by fornax-sched: change the YAML, not this.",
            lua_comment(title),
            *about,
            "--",
            "-- The rules, highest priority first (a tie keeps the order of the file).",
            "-- The first rule whose condition holds decides; one that dispatches but",
            "-- finds no node with room lets the next rule try, unless it is required.",
            "-- When no rule decides, the platform policy does.",
            "",
            "local rules = {}",
            "",
        ]
        for r in rules:
            out += r.code
            out.append("")
        out += [
            "function decide(ctx)",
            "  for _, rule in ipairs(rules) do",
            "    local node, why = rule(ctx, ctx.request)",
            "    if node ~= nil or why ~= nil then return node, why end",
            "  end",
            "  return platform.decide(ctx)",
            "end",
        ]
        return "\n".join(out) + "\n"
