"""Lua policies for the core's Program hook, run in a sandbox process.

The policy runs in a worker process (worker.py, sandbox.lua) that the
scheduler can kill: that is the only way to bound one long call inside a C
function, such as a pattern match that backtracks for minutes.  Inside the
worker a count hook stops ordinary loops at the deadline without a kill, and
a memory cap stops allocation; the scheduler kills and restarts the worker
when no answer comes within the deadline and a small grace.

The worker keeps its own copy of the cluster.  Each decision sends only the
nodes that changed since the last one (the core names them in
``cluster.changed``), as JSON kept per node, so a decision at 1,000 nodes
costs a small message and the policy's own run.

Whatever the policy does wrong (an error, a timeout, running out of memory,
an answer that names no feasible node) the platform policy (platform.lua, in
the same sandbox) decides instead, and the failure is counted, kept in
``recent`` and passed to ``on_failure``.  Only when the sandbox itself cannot
run does the native built-in spread decide.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import select
import subprocess
import sys
import sysconfig
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..sched.core import Cluster, Decision, NodeState
from ..sched.model import Request
from ..units import format_size
from .errors import PolicyError, SandboxError, SandboxTimeout

WORKER = Path(__file__).with_name("worker.py")
PLATFORM_NAME = "platform.lua"
INLINE_NODES = 64  # deltas larger than this go in a sync message of their own, outside the deadline
_ENV_KEPT = ("PATH", "HOME", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE",
             "VIRTUAL_ENV")

COUNTERS = ("decisions", "errors", "timeouts", "memory", "bad_returns", "sandbox", "fallbacks", "builtin", "restarts")
_COUNTER = {"error": "errors", "syntax": "errors", "timeout": "timeouts", "memory": "memory", "bad": "bad_returns",
            "sandbox": "sandbox"}
_CAUSE = {"error": "failed", "syntax": "failed", "timeout": "timed out", "memory": "ran out of memory",
          "bad": "gave a bad answer", "sandbox": "could not run"}


@dataclass(frozen=True)
class Limits:
    """What a policy may use per decision."""

    deadline: float = 0.050  # seconds a policy may run per decision
    grace: float = 0.015  # more wall time before the sandbox is killed (IPC, the platform's turn)
    memory: int = 64 << 20  # bytes of Lua memory for the policy, beyond the sandbox's copy of the cluster
    startup: float = 5.0  # seconds for a sandbox to start, load the policy or take a full copy of the cluster
    count: int = 10000  # Lua instructions between the hook's looks at the clock
    fail_limit: int = 5  # failures in a row before the policy is reported failing


def platform_path() -> Path:
    """Where platform.lua is: policies/ in a source checkout, else share/fornax-sched/policies/."""
    here = Path(__file__).resolve()
    candidates = [here.parent.parent.parent / "policies" / PLATFORM_NAME]
    schemes = [sysconfig.get_default_scheme(), f"{os.name}_user"]
    for scheme in schemes:
        try:
            data = sysconfig.get_path("data", scheme)
        except KeyError:
            continue
        candidates.append(Path(data) / "share" / "fornax-sched" / "policies" / PLATFORM_NAME)
    candidates.append(Path(sys.prefix) / "share" / "fornax-sched" / "policies" / PLATFORM_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{PLATFORM_NAME} not found; looked in " + ", ".join(str(p.parent) for p in candidates))


@functools.cache
def platform_source() -> str:
    """The platform policy's Lua source, as shipped."""
    return platform_path().read_text()


# ---------------------------------------------------------------- what crosses to the worker


def encode_node(cluster: Cluster, n: NodeState) -> str:
    """One node as the sandbox mirrors it; containers flat: name, image, cpus, mem, ..."""
    flat: list[Any] = []
    for c in n.containers:
        p = cluster.placements.get(c)
        if p is None:
            flat += [c, "", 0, 0]
        else:
            flat += [c, p.request.image, p.request.cpus, p.request.mem]
    return json.dumps({
        "name": n.name, "cpus": n.facts.cpus, "mem": n.facts.mem, "used_cpus": n.used_cpus,
        "used_mem": n.used_mem, "labels": n.facts.labels, "status": n.status, "cordoned": n.cordoned,
        "containers": flat,
    })


@functools.lru_cache(maxsize=256)
def encode_request(req: Request) -> str:
    return json.dumps({
        "image": req.image, "name": req.name, "cpus": req.cpus, "mem": req.mem, "replicas": req.replicas,
        "labels": dict(req.labels), "pairs": [list(p) for p in req.labels], "include": list(req.include),
        "exclude": list(req.exclude), "avoid": list(req.avoid), "args": list(req.args),
        "constraints": req.constraints(),
    })


def _sync_message(op: str, full: bool, nodes: Sequence[str], gone: Sequence[str], **fields: Any) -> bytes:
    head = json.dumps({"op": op, "full": full, "gone": list(gone), **fields})
    return (head[:-1] + ',"nodes":[' + ",".join(nodes) + "]}\n").encode()


# ---------------------------------------------------------------- one worker process


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


class Sandbox:
    """One worker process holding the platform policy and, optionally, a user policy.

    Calls are synchronous and bounded: every read and write waits at most
    until its deadline, and on any failure the process is killed, so a
    Sandbox that raised is dead and a new one must be started.
    """

    def __init__(self, platform: str, policy: str | None, limits: Limits) -> None:
        self.limits = limits
        self._init = json.dumps({"op": "init", "platform": platform, "policy": policy, "deadline": limits.deadline,
                                 "count": limits.count, "memory": limits.memory}).encode() + b"\n"
        # -P: nothing next to worker.py shadows a module.  The environment carries
        # only what finds Python and its packages: the sandbox needs no more.
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEPT}
        try:
            self.proc = subprocess.Popen([sys.executable, "-P", str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                         start_new_session=True)
        except OSError as e:
            raise SandboxError(f"cannot start the sandbox: {e}") from None
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self._in, self._out, self._err = self.proc.stdin.fileno(), self.proc.stdout.fileno(), self.proc.stderr.fileno()
        for fd in (self._in, self._err):
            os.set_blocking(fd, False)
        self._readable = select.poll()
        self._readable.register(self._out, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(self._in, select.POLLOUT)
        self._buf = bytearray()
        self._finalizer = weakref.finalize(self, _reap, self.proc)
        self.loaded: dict[str, Any] | None = None  # the init reply
        self.mirror: weakref.ref[Cluster] | None = None  # the active cluster its copy follows
        self.snapshot: weakref.ref[Cluster] | None = None  # or the cluster it last copied whole
        self.alive = True

    def ready(self) -> dict[str, Any]:
        """Load the policies (once); the worker's answer: {"ok": true, "defined": ...} or why not."""
        if self.loaded is None:
            try:
                reply = self._exchange(self._init, self.limits.startup + self.limits.deadline)
            except SandboxTimeout:
                raise SandboxError("the sandbox did not start in time") from None
            if "crash" in reply:
                self.close()
                raise SandboxError(f"the sandbox failed to start: {reply['crash']}")
            self.loaded = reply
        return self.loaded

    def call(self, data: bytes, timeout: float) -> dict[str, Any]:
        self.ready()
        reply = self._exchange(data, timeout)
        if "crash" in reply:
            self.close()
            raise SandboxError(f"the sandbox failed: {reply['crash']}")
        return reply

    def close(self) -> None:
        self.alive = False
        self._finalizer()

    # ------------------------------------------------------------ the pipe
    def _exchange(self, data: bytes, timeout: float) -> dict[str, Any]:
        if not self.alive:
            raise SandboxError("the sandbox is closed")
        end = time.monotonic() + timeout
        try:
            self._write(data, end)
            return self._read(end)
        except SandboxError:
            self.close()
            raise
        except (OSError, ValueError) as e:
            self.close()
            raise SandboxError(f"the sandbox failed: {e}") from None

    def _write(self, data: bytes, end: float) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._in, view):]
            except BlockingIOError:
                pass
            except BrokenPipeError:
                raise SandboxError(f"the sandbox died{self._last_words()}") from None
            if view and not self._writable.poll(self._ms(end)):
                raise SandboxTimeout("the sandbox took no input")

    def _read(self, end: float) -> dict[str, Any]:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                reply: dict[str, Any] = json.loads(line)
                return reply
            if not self._readable.poll(self._ms(end)):
                raise SandboxTimeout("no answer")
            chunk = os.read(self._out, 1 << 16)
            if not chunk:
                raise SandboxError(f"the sandbox died{self._last_words()}")
            self._buf += chunk

    @staticmethod
    def _ms(end: float) -> int:
        return max(0, math.ceil((end - time.monotonic()) * 1000))

    def _last_words(self) -> str:
        try:
            text = os.read(self._err, 1 << 16).decode(errors="replace").strip()
        except (BlockingIOError, OSError):
            text = ""
        return f": {text.splitlines()[-1]}" if text else ""


# ---------------------------------------------------------------- the program


class LuaProgram:
    """A Lua policy deciding for the core (``cluster.set_program``), with the platform policy behind it.

    ``lua`` None makes the platform policy itself the program.  Failures are
    counted in ``counters``, the recent ones kept in ``recent`` and passed
    to ``on_failure``; lines the policy logs go to ``logs`` and ``on_log``.
    After ``limits.fail_limit`` failures in a row ``failing`` is set (and
    cleared by the next good decision).
    """

    def __init__(self, lua: str | None, *, limits: Limits | None = None, platform: str | None = None,
                 on_failure: Callable[[str], None] | None = None, on_log: Callable[[str], None] | None = None):
        self.lua = lua
        self.platform = platform if platform is not None else platform_source()
        self.limits = limits or Limits()
        self.on_failure = on_failure
        self.on_log = on_log
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.failing = False
        self.in_a_row = 0
        self.last_failure = ""
        self.recent: deque[str] = deque(maxlen=50)
        self.logs: deque[str] = deque(maxlen=200)
        self.defined = ""  # which of decide, filter and score the policy defines
        self._box: Sandbox | None = None
        self._spare: Sandbox | None = None
        self._retry_at = 0.0
        self._backoff = 0.5
        # The JSON of every node of the cluster this program decides for, kept
        # current from cluster.changed, so that a new sandbox gets its copy cheaply.
        self._cache: dict[str, str] = {}
        self._tracking: weakref.ref[Cluster] | None = None
        self._changed: set[str] | None = None  # the set we left in cluster.changed

    # ------------------------------------------------------------ life
    def start(self) -> None:
        """Start the sandbox and load the policy; PolicyError if it does not load."""
        box = self._ready_box()
        info = box.ready()
        if not info.get("ok"):
            raise PolicyError(info.get("error") or "the policy did not load")
        self.defined = info.get("defined", "")

    def close(self) -> None:
        for box in (self._box, self._spare):
            if box is not None:
                box.close()
        self._box = self._spare = None

    def __enter__(self) -> LuaProgram:
        return self

    def __copy__(self) -> LuaProgram:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> LuaProgram:
        """A copy of a cluster (to simulate on) shares its program: there is one sandbox."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Decisions that do not count (a simulation): counters, the failing state, the recent
        failures and log lines are as before afterwards, and nothing reaches the callbacks."""
        saved = (dict(self.counters), self.in_a_row, self.failing, self.last_failure, list(self.recent),
                 list(self.logs), self.on_failure, self.on_log)
        self.on_failure = self.on_log = None
        try:
            yield
        finally:
            restarts = self.counters["restarts"]  # a sandbox killed meanwhile was killed for real
            self.counters, self.in_a_row, self.failing, self.last_failure = saved[0], saved[1], saved[2], saved[3]
            self.counters["restarts"] = restarts
            self.recent.clear()
            self.recent.extend(saved[4])
            self.logs.clear()
            self.logs.extend(saved[5])
            self.on_failure, self.on_log = saved[6], saved[7]

    def _ready_box(self) -> Sandbox:
        if self._box is not None:
            if self._box.alive and self._box.proc.poll() is None:
                return self._box
            self._lost()  # died while idle (killed by the OOM killer, say): start another
        if time.monotonic() < self._retry_at:
            raise SandboxError("the sandbox would not start; trying again shortly")
        box, self._spare = self._spare, None
        try:
            if box is None or not box.alive:
                box = Sandbox(self.platform, self.lua, self.limits)
            box.ready()
        except SandboxError:
            if box is not None:
                box.close()
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 30.0)
            raise
        self._backoff = 0.5
        self._box = box
        if self.counters["restarts"] and self.lua is not None:
            # One killed sandbox makes another likely: have the next one already started.
            try:
                self._spare = Sandbox(self.platform, self.lua, self.limits)
            except SandboxError:
                pass
        return box

    def _lost(self) -> None:
        """The sandbox was killed or died: the next call starts (or takes over) another."""
        if self._box is not None:
            self._box.close()
        self._box = None
        self.counters["restarts"] += 1

    # ------------------------------------------------------------ talking to the sandbox
    def _plan(self, cluster: Cluster, box: Sandbox, again: bool) -> tuple[bool, list[str], list[str]]:
        """What the sandbox must learn before deciding for ``cluster``: (full?, nodes, removed names).

        ``again``: the cluster has not changed since the last call (a dry run's next request).
        """
        if cluster.program is not self:
            # A dry run or a simulation: the whole cluster, leaving cluster.changed
            # (the active program's business) alone.
            box.mirror = None
            self._tracking = None
            if again and box.snapshot is not None and box.snapshot() is cluster:
                return False, [], []
            box.snapshot = weakref.ref(cluster)
            return True, [encode_node(cluster, n) for n in cluster.nodes.values()], []
        box.snapshot = None
        # set_program() installs a new set naming every node; ours still there
        # means every change since our last look is in it.
        continuous = (self._tracking is not None and self._tracking() is cluster
                      and cluster.changed is self._changed)
        changed = cluster.changed
        cluster.changed = self._changed = set()
        self._tracking = weakref.ref(cluster)
        nodes: list[str] = []
        gone: list[str] = []
        if continuous:
            for name in changed:
                n = cluster.nodes.get(name)
                if n is None:
                    self._cache.pop(name, None)
                    gone.append(name)
                else:
                    self._cache[name] = js = encode_node(cluster, n)
                    nodes.append(js)
        else:
            self._cache = {name: encode_node(cluster, n) for name, n in cluster.nodes.items()}
            box.mirror = None
        if box.mirror is not None and box.mirror() is cluster:
            return False, nodes, gone
        box.mirror = weakref.ref(cluster)
        return True, list(self._cache.values()), []

    def _ask(self, cluster: Cluster, name: str, req: Request, exclude: Iterable[str], who: str,
             again: bool = False) -> dict[str, Any]:
        """One decision by the sandbox; SandboxTimeout / SandboxError (and the sandbox gone) if it gives none."""
        box = self._ready_box()
        try:
            full, nodes, gone = self._plan(cluster, box, again)
            inline = not full and len(nodes) + len(gone) <= INLINE_NODES
            if not inline:
                size = sum(map(len, nodes))
                try:
                    box.call(_sync_message("sync", full, nodes, gone), self.limits.startup + size / 20e6)
                except SandboxTimeout:
                    raise SandboxError("the sandbox took too long to copy the cluster") from None
                nodes, gone = [], []
            head = json.dumps({"op": "decide", "c": name, "x": sorted(exclude), "who": who, "full": False,
                               "gone": gone})
            msg = (head[:-1] + ',"r":' + encode_request(req) + ',"nodes":[' + ",".join(nodes) + "]}\n").encode()
            reply = box.call(msg, self.limits.deadline + self.limits.grace)
        except SandboxError:
            self._lost()
            raise
        for line in reply.get("log", ()):
            self.logs.append(line)
            _tell(self.on_log, line)
        return reply

    # ------------------------------------------------------------ deciding
    def decide(self, cluster: Cluster, name: str, req: Request, exclude: frozenset[str]) -> Decision:
        self.counters["decisions"] += 1
        if self.lua is None:
            return self._platform(cluster, name, req, exclude, None)
        try:
            reply = self._ask(cluster, name, req, exclude, "policy")
        except SandboxTimeout:
            ms = round(self.limits.deadline * 1000)
            self._failed("timeout", f"no answer within {ms} ms (stuck in one long call?); the sandbox was restarted")
            return self._platform(cluster, name, req, exclude, "timeout")
        except SandboxError as e:
            self._failed("sandbox", str(e))
            return self._platform(cluster, name, req, exclude, "sandbox")
        fail = reply.get("fail")
        if fail:
            self._failed(fail, reply.get("fail_why", ""))
        if reply.get("by") != "policy":
            return self._settle_platform(cluster, name, req, exclude, reply, fail or "error")
        node = reply.get("node")
        if reply.get("how") != "node" or node is None:
            self._good()
            return Decision(name, None, f"policy: {reply.get('why', 'unschedulable')}", 0)
        wrong = self._wrong(cluster, node, req, exclude)
        if wrong:
            self._failed("bad", f"the policy chose {node}, which {wrong}")
            return self._platform(cluster, name, req, exclude, "bad")
        self._good()
        why = reply.get("why")
        return Decision(name, node, f"policy: {node}" + (f" ({why})" if why else ""), int(reply.get("looked", 1)))

    def _platform(self, cluster: Cluster, name: str, req: Request, exclude: frozenset[str],
                  cause: str | None) -> Decision:
        """The platform policy's decision (cause: why the user's policy did not decide)."""
        try:
            reply = self._ask(cluster, name, req, exclude, "platform")
        except SandboxError as e:
            return self._builtin(cluster, name, req, exclude, f"platform policy unavailable: {e}")
        return self._settle_platform(cluster, name, req, exclude, reply, cause)

    def _settle_platform(self, cluster: Cluster, name: str, req: Request, exclude: frozenset[str],
                         reply: dict[str, Any], cause: str | None) -> Decision:
        if reply.get("by") != "platform":
            return self._builtin(cluster, name, req, exclude, f"platform policy failed: {reply.get('platform_fail')}")
        if cause is not None:
            self.counters["fallbacks"] += 1
        note = f"the policy {_CAUSE.get(cause, 'failed')}" if cause else ""
        node, why = reply.get("node"), reply.get("why")
        if reply.get("how") != "node" or node is None:
            return Decision(name, None, f"{why or 'unschedulable'}" + (f" ({note})" if note else ""), 0)
        wrong = self._wrong(cluster, node, req, exclude)
        if wrong:
            return self._builtin(cluster, name, req, exclude, f"platform policy chose {node}, which {wrong}")
        detail = "; ".join(x for x in (why, note) if x)
        return Decision(name, node, f"platform: {node}" + (f" ({detail})" if detail else ""),
                        int(reply.get("looked", 1)))

    def _builtin(self, cluster: Cluster, name: str, req: Request, exclude: frozenset[str], why: str) -> Decision:
        self.counters["builtin"] += 1
        line = f"{why}; the built-in spread decided"
        self.recent.append(line)
        _tell(self.on_failure, line)
        d = cluster.decide_builtin(name, req, exclude)
        return Decision(d.name, d.node, f"{d.reason} (built-in: the sandbox could not decide)", d.candidates)

    @staticmethod
    def _wrong(cluster: Cluster, node: str, req: Request, exclude: frozenset[str]) -> str | None:
        n = cluster.nodes.get(node)
        if n is None:
            return "does not exist"
        if node in exclude:
            return "is excluded"
        if not cluster.feasible(n, req):
            return "does not fit"
        return None

    def _failed(self, kind: str, why: str) -> None:
        self.counters[_COUNTER.get(kind, "errors")] += 1
        self.in_a_row += 1
        self.last_failure = f"{kind}: {why}"
        line = f"lua policy {_CAUSE.get(kind, 'failed')}: {why}; the platform policy decides"
        if self.in_a_row >= self.limits.fail_limit:
            self.failing = True
            line += f" (failing: {self.in_a_row} decisions in a row)"
        self.recent.append(line)
        _tell(self.on_failure, line)

    def _good(self) -> None:
        self.in_a_row = 0
        self.failing = False

    # ------------------------------------------------------------ checking
    def dry_run(self, cluster: Cluster, requests: Sequence[Request] | None = None) -> list[Decision]:
        """Decide for sample requests against ``cluster`` without changing it or any counter.

        PolicyError (naming the line where there is one) if the policy fails
        any of them: an error, a timeout, running out of memory, a bad answer.
        """
        out = []
        for i, req in enumerate(requests if requests is not None else sample_requests(cluster)):
            name = req.name or f"dry-run-{i + 1}"
            try:
                reply = self._ask(cluster, name, req, frozenset(), "policy" if self.lua is not None else "platform",
                                  again=i > 0)
            except SandboxTimeout:
                raise PolicyError(f"dry run: no answer within {round(self.limits.deadline * 1000)} ms "
                                  "(stuck in one long call?)") from None
            except SandboxError as e:
                raise PolicyError(f"dry run: {e}") from None
            if reply.get("fail"):
                raise PolicyError(f"dry run: {_dry_words(reply['fail'], reply.get('fail_why', ''))}")
            if reply.get("by") not in ("policy", "platform"):
                raise PolicyError(f"dry run: the platform policy failed: {reply.get('platform_fail')}")
            node = reply.get("node") if reply.get("how") == "node" else None
            if node is not None:
                wrong = self._wrong(cluster, node, req, frozenset())
                if wrong:
                    raise PolicyError(f"dry run: the policy chose {node}, which {wrong}")
                out.append(Decision(name, node, f"policy: {node}", int(reply.get("looked", 1))))
            else:
                out.append(Decision(name, None, f"policy: {reply.get('why', 'unschedulable')}", 0))
        return out

    def describe(self) -> str:
        """``key value`` lines: the state a service shows (counters, failing, the last failure)."""
        state = "failing" if self.failing else "ok"
        lines = [f"state {state}", f"defined {self.defined or '-'}",
                 f"deadline {round(self.limits.deadline * 1000)}ms", f"memory_cap {format_size(self.limits.memory)}"]
        lines += [f"{k} {v}" for k, v in self.counters.items()]
        if self.last_failure:
            lines.append(f"last_failure {self.last_failure}")
        return "\n".join(lines) + "\n"


def _tell(callback: Callable[[str], None] | None, line: str) -> None:
    """Pass a line to the service; its failure must not stop a decision."""
    if callback is not None:
        try:
            callback(line)
        except Exception:  # whatever the callback does wrong, the decision stands
            pass


def _dry_words(kind: str, why: str) -> str:
    if kind == "timeout":
        return f"timed out: {why}"
    if kind == "memory":
        return f"{why} (the cap is the sandbox's memory limit)"
    if kind == "bad":
        return f"bad answer: {why}"
    return why


def sample_requests(cluster: Cluster) -> list[Request]:
    """Requests for a dry run: a plain one, and the last two distinct ones the cluster holds."""
    out = [Request("dry-run", name="dry-run")]
    for p in reversed(list(cluster.placements.values())[-50:]):
        if p.request not in out:
            out.append(p.request)
        if len(out) == 3:
            break
    return out
