"""From the text written to the policy file to something the service can activate.

The file takes three forms, told apart by their first line that says
anything: text rules (``spread``, ``pack``, ``affinity``, ``anti-affinity``,
run by the core itself), YAML rules (``scheduler:``, compiled to Lua) and
Lua (anything else).  A policy becomes active only after it passed its
checks: its syntax (the error names the line), loading in the sandbox that
will run it (bounded by the load budget), then a dry run against the
current cluster.  On failure nothing is left running and PolicyError says
why, in one line, so the old policy stays.

Loading comes in two steps, so that a scheduler can load on one thread and
dry-run on the thread that owns its cluster::

    loaded = prepare_policy(text, platform=platform)   # compile, start, load: no cluster
    dry_run_policy(loaded, cluster)                    # PolicyError: refuse the write
    if loaded.program is None:                         # text rules
        cluster.set_program(None); cluster.set_policy(loaded.rules)
    else:
        cluster.set_policy(Policy()); cluster.set_program(loaded.program); old.close()

``load_policy(text, cluster, platform=platform)`` does both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..sched.core import Cluster
from ..sched.lang import LangError, parse_policy
from ..sched.model import NodeFacts, Policy, Request
from .engine import Limits, LuaProgram, Platform
from .errors import PolicyError, SandboxError
from .yamlrules import LUA_KEYWORDS, compile_yaml

MAX_POLICY = 256 << 10  # bytes of policy text
RULE_WORDS = ("spread", "pack", "affinity", "anti-affinity")
_YAML_START = re.compile(r"[A-Za-z_][\w.-]*\s*:(\s|$)")  # a mapping key: no Lua statement starts so
_LUA_LINE = re.compile(r"^policy:(\d+):")
_LUA_NEWLINE = re.compile(r"\r\n|\n\r|\n|\r")  # a line break as Lua counts lines


@dataclass(frozen=True)
class Compiled:
    """A policy whose syntax is right: what was written, and what runs."""

    kind: str  # "rules" | "yaml" | "lua"
    source: str  # the text as written
    lua: str  # the Lua that runs (compiled from YAML, or the source); "" for text rules
    rules: Policy | None = None  # text rules, parsed
    name: str = ""  # the YAML scheduler's name


@dataclass(frozen=True)
class Loaded(Compiled):
    """A policy that passed its dry run; ``program`` (None for text rules) is started, ready for set_program."""

    program: LuaProgram | None = None

    def passed(self, where: str, nodes: int, placements: int) -> str:
        """What a check of this policy says (``fornax-sched policy check``, the web page's validate)."""
        what = self.kind if self.program is None else f"{self.kind} policy defining {self.program.defined}"
        return f"ok: {what}; dry run on {where} ({nodes} nodes, {placements} placements) passed"

    def close(self) -> None:
        if self.program is not None:
            self.program.close()


def detect_kind(text: str) -> str:
    """rules, yaml or lua, from the first line that is not blank or a comment."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line == "---":
            continue
        if line.startswith("--"):
            return "lua"  # a Lua comment ("---" alone starts a YAML document)
        if line.startswith("#"):
            continue  # a comment in text rules and YAML
        if _YAML_START.match(line):
            return "yaml"
        if line.split()[0] in RULE_WORDS:
            return "rules"
        return "lua"
    return "rules"  # nothing but comments: the default, spread


_DEEP = ("C stack overflow", "error in error handling", "stack overflow")


def lua_syntax(src: str) -> None:
    """PolicyError naming the line if src is not Lua; parses without running anything."""
    import lupa.lua54 as lua

    # Bytes both ways: Lua's messages quote the source byte by byte, a UTF-8
    # character cut in two included.
    rt = lua.LuaRuntime(register_eval=False, register_builtins=False, max_memory=64 << 20, encoding=None)
    # Under pcall, so that an error that is not a syntax error (the parser's own
    # stack overflowing) comes back as a plain message, without lupa's traceback.
    check = rt.eval(b'function(src) local ok, f, err = pcall(load, src, "=policy", "t", {}) '
                    b'if not ok then return f end return err end')

    def error_of(text: str) -> str:
        try:
            err = check(text.encode("utf-8", "surrogatepass"))
        except lua.LuaMemoryError:
            raise PolicyError("the policy is too large to parse") from None
        except lua.LuaError as e:
            return str(e)
        if isinstance(err, bytes):
            return err.decode("utf-8", "replace")
        return str(err or "")

    err = error_of(src)
    if not err:
        return
    if err.startswith(_DEEP):
        # The parser's C stack ran out (brackets, blocks or operators nested ~200
        # deep) and Lua does not say where: find the first line where it does.
        starts = [0] + [m.end() for m in _LUA_NEWLINE.finditer(src)]
        lo, hi = 1, len(starts)
        while lo < hi:
            mid = (lo + hi) // 2
            end = starts[mid] if mid < len(starts) else len(src)
            if error_of(src[:end]).startswith(_DEEP):
                hi = mid
            else:
                lo = mid + 1
        raise PolicyError(f"line {lo}: nested too deeply to parse (Lua allows about 200 levels of brackets, "
                          "blocks and operators)")
    if err.startswith("attempt to load a binary chunk"):
        raise PolicyError("the policy is a binary chunk (compiled Lua, or text starting with ESC): "
                          "only Lua source is taken")
    raise PolicyError(_LUA_LINE.sub(r"line \1:", err))


def compile_policy(text: str) -> Compiled:
    """Check a policy's syntax and compile YAML to Lua; PolicyError naming the line if it is wrong."""
    if len(text.encode()) > MAX_POLICY:
        raise PolicyError(f"the policy is larger than {MAX_POLICY >> 10}K")
    kind = detect_kind(text)
    if kind == "rules":
        try:
            return Compiled("rules", text, "", parse_policy(text))
        except LangError as e:
            raise PolicyError(str(e)) from None
    if kind == "yaml":
        lua, name = compile_yaml(text)
        try:
            lua_syntax(lua)
        except PolicyError as e:  # a bug of ours, not the user's: say so
            raise PolicyError(f"the YAML compiled to bad Lua ({e}); please report it") from None
        return Compiled("yaml", text, lua, None, name)
    try:
        lua_syntax(text)
    except PolicyError as e:
        raise PolicyError(_misspelled_rule(text) or str(e)) from None
    return Compiled("lua", text, text)


def _misspelled_rule(text: str) -> str:
    """For text that is neither rules nor Lua but reads like a rule line: say so (``frobnicate``, ``spred``)."""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word = line.split()[0]
        if (re.fullmatch(r"[a-z][a-z-]*", word) and word not in LUA_KEYWORDS
                and not any(ch in line for ch in "=(){}[]\"'")):
            want = ", ".join(RULE_WORDS[:-1]) + " or " + RULE_WORDS[-1]
            return f"line {n}: unknown rule {word!r}: want {want} (nor is it a Lua program)"
        return ""
    return ""


def prepare_policy(text: str, *, platform: Platform | None = None, limits: Limits | None = None,
                   on_failure: Callable[[str], None] | None = None,
                   on_log: Callable[[str], None] | None = None) -> Loaded:
    """Step one of loading: compile the policy, start its sandbox and load it there; no cluster needed.

    Bounded by the limits' load budget (plus the grace, and the interpreter's
    start if no worker was started ahead), so it may run on any thread.
    PolicyError (one line) if the policy is refused; nothing is left running.
    The program is ready for ``dry_run_policy``.
    """
    c = compile_policy(text)
    if c.kind == "rules":
        return Loaded(c.kind, c.source, c.lua, c.rules, c.name)
    program = LuaProgram(c.lua, limits=limits, platform=platform, on_failure=on_failure, on_log=on_log)
    try:
        program.start()
    except PolicyError as e:
        program.close()
        raise PolicyError(_in_yaml(c, str(e))) from None
    except SandboxError as e:
        program.close()
        raise PolicyError(f"cannot check the policy: {e}") from None
    return Loaded(c.kind, c.source, c.lua, c.rules, c.name, program)


def dry_run_policy(loaded: Loaded, cluster: Cluster) -> Loaded:
    """Step two: dry-run the loaded policy against ``cluster`` (unchanged), on the thread that owns it.

    Each sample decision is bounded as any decision is.  PolicyError (one
    line) if the policy fails one; its sandbox is then closed.
    """
    if loaded.program is None:
        return loaded
    try:
        loaded.program.dry_run(cluster)
    except PolicyError as e:
        loaded.program.close()
        raise PolicyError(_in_yaml(loaded, str(e))) from None
    return loaded


def load_policy(text: str, cluster: Cluster, *, platform: Platform | None = None, limits: Limits | None = None,
                on_failure: Callable[[str], None] | None = None,
                on_log: Callable[[str], None] | None = None) -> Loaded:
    """Both steps: compile, start and dry-run a policy against ``cluster`` (unchanged); PolicyError if any fails."""
    loaded = prepare_policy(text, platform=platform, limits=limits, on_failure=on_failure, on_log=on_log)
    return dry_run_policy(loaded, cluster)


def _in_yaml(c: Compiled, why: str) -> str:
    """A refusal of YAML's compiled Lua says so: the line it names is the Lua's."""
    return f"{why} (in the compiled Lua)" if c.kind == "yaml" else why


def sample_cluster() -> Cluster:
    """A small cluster for checking a policy away from a live scheduler (``policy check FILE``)."""
    g = 1 << 30
    c = Cluster()
    c.add_node(NodeFacts("node-1", 4, 8 * g, {"zone": "east", "disk": "ssd"}))
    c.add_node(NodeFacts("node-2", 4, 8 * g, {"zone": "east"}))
    c.add_node(NodeFacts("node-3", 8, 16 * g, {"zone": "west", "disk": "ssd"}))
    c.add_node(NodeFacts("node-4", 2, 4 * g, {"zone": "west"}))
    web = Request("web", name="web", replicas=2, cpus=0.5, mem=256 << 20, avoid=("web-*",))
    c.place("web-1", web)
    c.place("web-2", web)
    c.place("db-1", Request("db", name="db-1", cpus=2, mem=2 * g, labels=(("disk", "ssd"),)))
    return c
