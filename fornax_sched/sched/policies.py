"""The scheduler's policy: the one in force, the versions before it, and how it is doing.

A policy arrives as text (the policy file, or ``policy restore N`` on ctl).
``fornax_sched.policy.load_policy`` checks it (syntax, then a dry run
against the current cluster) and starts its sandbox; only then does the
service make it a new version here and record it.  The store's
``policies`` table holds one ``vN`` entry per version kept (the last
HISTORY) and ``active``, naming the version in force.  Older stores hold
the text rules themselves under ``active``; they load as version 1.

Nothing here does I/O: the service commits what ``record`` gives it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..policy import (
    Limits,
    Loaded,
    LuaProgram,
    Platform,
    PolicyError,
    SandboxError,
    compile_policy,
    dry_run_policy,
    load_policy,
    prepare_policy,
)
from .core import Cluster
from .model import Policy

HISTORY = 20  # versions kept


@dataclass(frozen=True)
class Version:
    n: int
    at: float
    kind: str  # rules | lua | yaml
    source: str  # as written
    by: str  # who wrote it ("alice", "alice: restore of v3")
    name: str = ""  # a YAML scheduler's name

    def title(self) -> str:
        """A few words for a list: the YAML name, or the first line that says something."""
        if self.name:
            return self.name
        for line in self.source.splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "--")):
                return line[:60]
        return "-"


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Policies:
    """What the policy files and ctl's policy commands show, and the cluster's program."""

    def __init__(self, cluster: Cluster, note: Callable[[str], None], *, limits: Limits | None = None,
                 platform: Platform | None = None) -> None:
        self.cluster = cluster
        self.note = note
        self.limits = limits
        # The platform policy's own sandbox, behind every version (made here unless given; closed by close()).
        self._own_platform = platform is None
        self.platform = platform if platform is not None else Platform(limits=limits)
        self.versions: dict[int, Version] = {}
        self.active: Version | None = None  # None: never written, the default spread
        self.lua = ""  # the Lua that runs ("" for text rules)
        self.program: LuaProgram | None = None
        self.load_error = ""  # why the stored policy did not start (the platform policy decides)
        self.on_fallback: Callable[[str], None] | None = None  # told why a program did not decide (metrics)

    # ------------------------------------------------------------ what is active
    def label(self) -> str:
        """How log lines name the policy: ``spread``, ``pack``, ``lua v3``, ``yaml web-first v4``."""
        v = self.active
        if v is None or v.kind == "rules":
            return self.cluster.policy.base
        what = f"yaml {v.name}" if v.kind == "yaml" and v.name else v.kind
        return f"{what} v{v.n}" + (" (not loaded: the platform policy decides)" if self.load_error else "")

    def health(self) -> str:
        """"" while all is well, else what ctl's summary should say of the policy."""
        if self.load_error:
            return f"failing: did not start: {self.load_error}"
        p = self.program
        if p is not None and p.failing:
            return f"failing: {p.in_a_row} decisions in a row; last: {p.last_failure} (see policy.status)"
        return ""

    def source_text(self) -> str:
        v = self.active
        if v is None or v.kind == "rules":
            return self.cluster.policy.text()  # in the normal form the core keeps
        return v.source if v.source.endswith("\n") else v.source + "\n"

    def lua_text(self) -> str:
        if self.lua:
            return self.lua if self.lua.endswith("\n") else self.lua + "\n"
        rules = self.cluster.policy.text().strip().replace("\n", "; ")
        return (f"-- The active policy is text rules ({rules}), run by the scheduler's core:\n"
                "-- no Lua runs.  Write a Lua program or YAML rules to the policy file to change that.\n")

    def status_text(self) -> str:
        v = self.active
        lines = [f"version {v.n if v else 0}", f"kind {v.kind if v else 'rules'}", f"label {self.label()}"]
        if v is not None:
            lines.append(f"written {_stamp(v.at)} by {v.by}")
        p = self.program
        if self.load_error:
            lines.append(f"state failing: the stored policy did not start: {self.load_error}")
        elif p is None:
            lines.append("state ok")
        out = "\n".join(lines) + "\n"
        if p is not None:
            if not self.load_error:
                out += p.describe()
            if p.recent:
                out += "\nrecent failures:\n" + "".join(f"  {line}\n" for line in p.recent)
            if p.logs:
                out += "\nrecent policy log lines:\n" + "".join(f"  {line}\n" for line in list(p.logs)[-20:])
        return out

    def history_text(self) -> str:
        if not self.versions:
            return "no policy written yet: the default, spread, is active\n"
        active = self.active.n if self.active else 0
        return "".join(f"{'*' if n == active else ' '} v{n} {_stamp(v.at)} {v.kind} by {v.by}: {v.title()}\n"
                       for n, v in sorted(self.versions.items()))

    # ------------------------------------------------------------ changing it
    def check(self, text: str) -> Loaded:
        """Compile, start and dry-run ``text`` against the cluster; PolicyError says why not."""
        return load_policy(text, self.cluster, platform=self.platform, limits=self.limits, on_failure=self._failed,
                           on_log=self._logged)

    def prepare(self, text: str) -> Loaded:
        """Step one of a check: compile, start and load the policy; needs no cluster (any thread)."""
        return prepare_policy(text, platform=self.platform, limits=self.limits, on_failure=self._failed,
                              on_log=self._logged)

    def dry_run(self, loaded: Loaded) -> Loaded:
        """Step two: the dry run against the cluster, on the thread that owns it (the decider's)."""
        return dry_run_policy(loaded, self.cluster)

    def plan_version(self, loaded: Loaded, at: float, by: str) -> tuple[Version, list[tuple[str, str, Any]]]:
        """The new version for ``loaded`` and the rows that record it (nothing changes here)."""
        n = max(self.versions, default=0) + 1
        v = Version(n, at, loaded.kind, loaded.source, by, loaded.name)
        rows: list[tuple[str, str, Any]] = [("policies", f"v{n}", asdict(v)), ("policies", "active", {"n": n})]
        keep = sorted([*self.versions, n])[-HISTORY:]
        rows += [("policies", f"v{old}", None) for old in sorted(self.versions) if old not in keep]
        return v, rows

    def install(self, v: Version, loaded: Loaded) -> LuaProgram | None:
        """Make the recorded version ``v`` active (on the decider's thread, once its rows are durable);
        the program it replaces, for the caller to close."""
        old = self.program
        self.versions[v.n] = v
        for gone in sorted(self.versions)[:-HISTORY]:
            del self.versions[gone]
        self._install(v, loaded)
        return old if old is not None and old is not self.program else None

    def _install(self, v: Version, loaded: Loaded) -> None:
        self.active, self.lua, self.program, self.load_error = v, loaded.lua, loaded.program, ""
        if loaded.program is None:
            assert loaded.rules is not None
            self.cluster.set_program(None)
            self.cluster.set_policy(loaded.rules)
            self.cluster.policy_kind = "rules"
        else:
            loaded.program.on_fallback = self._fallback
            self.cluster.set_policy(Policy())
            self.cluster.set_program(loaded.program)
            self.cluster.policy_kind = v.kind

    def _fallback(self, reason: str) -> None:
        if self.on_fallback is not None:
            self.on_fallback(reason)

    def source_of(self, n: int) -> str:
        v = self.versions.get(n)
        if v is None:
            kept = ", ".join(f"v{k}" for k in sorted(self.versions)) or "none"
            raise KeyError(f"no policy version {n} (kept: {kept})")
        return v.source

    # ------------------------------------------------------------ from the store
    def load(self, stored: dict[str, Any], at: float) -> None:
        """Take up the stored versions and start the active one (no dry run: the nodes are not back yet)."""
        for key, d in stored.items():
            if key.startswith("v") and key[1:].isdigit() and isinstance(d, dict):
                self.versions[int(key[1:])] = Version(int(d["n"]), float(d["at"]), d["kind"], d["source"],
                                                      d.get("by", "-"), d.get("name", ""))
        active = stored.get("active")
        if isinstance(active, str):  # a store from before versions: the text rules themselves
            self.versions[1] = Version(1, at, "rules", active, "store")
            active = {"n": 1}
        if not isinstance(active, dict) or active.get("n") not in self.versions:
            return
        v = self.versions[active["n"]]
        try:
            c = compile_policy(v.source)
        except PolicyError as e:  # written by an older version that accepted more, say
            self._fall_back(v, str(e))
            return
        program = None
        if c.kind != "rules":
            try:  # it starts by itself when first needed; now, so that the first fallback need not wait
                self.platform.start()
            except (PolicyError, SandboxError) as e:
                self.note(f"the platform policy did not start: {e}; it is tried again when needed")
            program = LuaProgram(c.lua, limits=self.limits, platform=self.platform, on_failure=self._failed,
                                 on_log=self._logged)
            try:
                program.start()
            except (PolicyError, SandboxError) as e:
                program.close()
                self._fall_back(v, str(e))
                return
        self._install(v, Loaded(c.kind, c.source, c.lua, c.rules, c.name, program))

    def _fall_back(self, v: Version, why: str) -> None:
        """The stored policy cannot run: keep it on show, let the platform policy decide."""
        self.active, self.lua, self.load_error = v, "", why
        self.note(f"policy v{v.n} ({v.kind}) did not start: {why}; the platform policy decides")
        program = LuaProgram(None, limits=self.limits, platform=self.platform, on_failure=self._failed,
                             on_log=self._logged)
        try:
            program.start()
        except (PolicyError, SandboxError) as e:
            program.close()
            self.note(f"the platform policy did not start either: {e}; the built-in spread decides")
            self.program = None
            self.cluster.set_program(None)
            self.cluster.policy_kind = "rules"
            return
        program.on_fallback = self._fallback
        self.program = program
        self.cluster.set_policy(Policy())
        self.cluster.set_program(program)
        self.cluster.policy_kind = "platform"

    def close(self) -> None:
        if self.program is not None:
            self.program.close()
        if self._own_platform:
            self.platform.close()

    # ------------------------------------------------------------ what the sandbox says
    def _failed(self, line: str) -> None:
        self.note(line)

    def _logged(self, line: str) -> None:
        self.note(f"policy says: {line}")
