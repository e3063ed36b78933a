"""Lua policies for the core's Program hook, each in a sandbox process of its own.

A policy runs in a worker process (worker.py, sandbox.lua) that the
scheduler can kill: that is the only way to bound one long call inside a C
function, such as a pattern match that backtracks for minutes.  Inside the
worker a count hook stops ordinary loops at the deadline without a kill, and
a memory cap stops allocation; the scheduler kills the worker when no answer
comes by the deadline and a small grace, and starts another.

Two kinds of sandbox, two processes:

- ``Platform``: the platform policy (platform.lua) alone, started once and
  shared by every user policy and version (restarted on its own if it dies).
  It decides whenever a user's policy does not: an error, a timeout, a kill,
  running out of memory, a bad answer, a policy that would not load, or a
  command whose policy budget is spent.  No user policy can make it
  unavailable.  Only when it cannot answer either does the core's native
  built-in spread decide.
- ``LuaProgram``: a user's policy, in a sandbox of its own (which also holds
  platform.lua, as the library behind ``platform.decide(ctx)``).

One clock: every time limit is an absolute time on CLOCK_MONOTONIC
(``time.monotonic``, the same clock in both processes on Linux), sent with
the message.  The hook stops the policy at that time; the scheduler kills
the worker at that time plus the grace.  The time a message waits in the
pipe counts, and a loaded machine slows the policy and its deadline alike.

Each sandbox keeps its own copy of the cluster.  Each decision sends only
the nodes that changed since that sandbox's last decision (the core names
them in ``cluster.changed``), as JSON kept per node, so a decision at 1,000
nodes costs a small message and the policy's own run.

Threads: a LuaProgram is used from one thread at a time (the scheduler's
decider thread); its callbacks are called from that thread.  Loading a
program (``start``) needs no cluster and may run on another thread before
the program is handed over.  A Platform may be shared between threads: it
serialises its own use.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import select
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..sched.core import Cluster, Decision, NodeState
from ..sched.model import Request
from ..units import MAX_SIZE, format_size
from .errors import PolicyError, SandboxError, SandboxTimeout

WORKER = Path(__file__).with_name("worker.py")
PLATFORM_NAME = "platform.lua"
INLINE_NODES = 64  # deltas larger than this go in a sync message of their own, outside the deadline
PLATFORM_TRIES = 2  # platform failures in one command before the built-in decides the rest of it
_ENV_KEPT = ("PATH", "HOME", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE",
             "VIRTUAL_ENV")

# Why a decision was not the policy's own, as on_fallback tells it: the policy failed in one of
# these ways (the platform decided), the command's budget was spent, the platform failed too.
FALLBACKS = ("error", "load", "timeout", "memory", "bad", "sandbox", "budget", "builtin")
COUNTERS = ("decisions", "errors", "timeouts", "memory", "bad_returns", "sandbox", "fallbacks", "handed_over",
            "builtin", "restarts")
_COUNTER = {"error": "errors", "syntax": "errors", "load": "errors", "timeout": "timeouts", "memory": "memory",
            "bad": "bad_returns", "sandbox": "sandbox"}
_CAUSE = {"error": "failed", "syntax": "failed", "load": "would not load", "timeout": "timed out",
          "memory": "ran out of memory", "bad": "gave a bad answer", "sandbox": "could not run"}


@dataclass(frozen=True)
class Limits:
    """What a policy may use per decision, and to load."""

    deadline: float = 0.050  # seconds a policy may run per decision
    grace: float = 0.015  # more wall time before the sandbox is killed (the answer's way back)
    memory: int = 64 << 20  # bytes of Lua memory for the policy, beyond the sandbox's copy of the cluster
    startup: float = 5.0  # seconds for a worker's interpreter to start, or to take a full copy of the cluster
    count: int = 10000  # Lua instructions between the hook's looks at the clock
    fail_limit: int = 5  # failures in a row before the policy is reported failing
    load: float | None = None  # seconds the policy's top-level code may run as it loads; None: load_budget
    command: float = 1.0  # seconds of policy time one command's decisions share (LuaProgram.budget)

    @property
    def load_budget(self) -> float:
        """Seconds to load a policy: ``load`` if given, else five deadlines and at least 250 ms (at most startup)."""
        if self.load is not None:
            return self.load
        return min(max(0.25, 5 * self.deadline), max(self.startup, 0.25))


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


def _ms(seconds: float) -> str:
    """A duration as people write it: 50 ms, 1s, 1.5s."""
    if seconds < 1:
        return f"{round(seconds * 1000)} ms"
    return f"{seconds:g}s"


# ---------------------------------------------------------------- what crosses to the worker


def _size(n: int) -> int | float:
    """A size as Lua can take it: past what sizes may say (units.MAX_SIZE; a store from before that
    cap) as a float, which Lua holds, not an integer past 2^63, which stopped the sandbox."""
    return n if n <= MAX_SIZE else float(n)


def encode_node(cluster: Cluster, n: NodeState) -> str:
    """One node as the sandbox mirrors it; containers flat: name, image, cpus, mem, ..."""
    flat: list[Any] = []
    for c in n.containers:
        p = cluster.placements.get(c)
        if p is None:
            flat += [c, "", 0, 0]
        else:
            flat += [c, p.request.image, p.request.cpus, _size(p.request.mem)]
    return json.dumps({
        "name": n.name, "cpus": n.facts.cpus, "mem": _size(n.facts.mem), "used_cpus": n.used_cpus,
        "used_mem": _size(n.used_mem), "labels": n.facts.labels, "status": n.status, "cordoned": n.cordoned,
        "kind": n.facts.kind, "containers": flat,
    })


@functools.lru_cache(maxsize=256)
def encode_request(req: Request) -> str:
    return json.dumps({
        "image": req.image, "name": req.name, "cpus": req.cpus, "mem": _size(req.mem), "replicas": req.replicas,
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


class _LoadFailed(Exception):
    """The policy did not load in a fresh sandbox: (kind, why), as the worker said, or a timeout."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind, self.why = kind, why


class Sandbox:
    """One worker process running one policy.

    Calls are synchronous and bounded by an absolute end on time.monotonic:
    every read and write waits at most until then, and on any failure the
    process is killed, so a Sandbox that raised is dead and a new one must
    be started.
    """

    def __init__(self) -> None:
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
        self.started = False  # the interpreter said it is ready
        self.defined = ""  # what the loaded policy defines
        self.follows: object | None = None  # the token of the view (_View) whose copy of a cluster it holds
        self.alive = True

    def usable(self) -> bool:
        return self.alive and self.proc.poll() is None

    def wait_started(self, timeout: float) -> None:
        """Wait (at most timeout seconds) for the interpreter to say it is ready."""
        if self.started:
            return
        try:
            reply = self._exchange(b"", time.monotonic() + timeout)
        except SandboxTimeout:
            raise SandboxError("the sandbox did not start in time") from None
        if not reply.get("ready"):
            self.close()
            raise SandboxError(f"the sandbox failed to start: {reply.get('crash', reply)}")
        self.started = True

    def load(self, platform: str, policy: str | None, limits: Limits) -> None:
        """Load the policy (None: the platform policy itself) within limits.load_budget.

        _LoadFailed if it does not (the sandbox then is closed); SandboxError if the process fails.
        """
        budget = limits.load_budget
        end = time.monotonic() + budget
        msg = json.dumps({"op": "init", "platform": platform, "policy": policy, "end": end,
                          "deadline": limits.deadline, "load": budget, "count": limits.count,
                          "memory": limits.memory}).encode() + b"\n"
        try:
            reply = self.call(msg, end + limits.grace)
        except SandboxTimeout:
            raise _LoadFailed("timeout", f"did not load within {_ms(budget)} (stuck in one long call?)") from None
        if not reply.get("ok"):
            self.close()
            raise _LoadFailed(str(reply.get("kind") or "error"), str(reply.get("error") or "it did not load"))
        self.defined = str(reply.get("defined") or "")

    def reload(self, limits: Limits) -> None:
        """Load the policy again after it ran out of memory; _LoadFailed or SandboxError (and closed) if not."""
        end = time.monotonic() + limits.load_budget
        try:
            reply = self.call(json.dumps({"op": "reload", "end": end}).encode() + b"\n", end + limits.grace)
        except SandboxTimeout:
            raise _LoadFailed("timeout", "did not load again in time") from None
        if not reply.get("ok"):
            self.close()
            raise _LoadFailed(str(reply.get("kind") or "error"), str(reply.get("error") or "it did not load"))

    def call(self, data: bytes, end: float) -> dict[str, Any]:
        reply = self._exchange(data, end)
        if "crash" in reply:
            self.close()
            raise SandboxError(f"the sandbox failed: {reply['crash']}")
        return reply

    def close(self) -> None:
        self.alive = False
        self._finalizer()

    # ------------------------------------------------------------ the pipe
    def _exchange(self, data: bytes, end: float) -> dict[str, Any]:
        if not self.alive:
            raise SandboxError("the sandbox is closed")
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


class Launcher:
    """Starts worker processes, keeping one started ahead (once asked to) so that a new
    sandbox does not wait for Python and lupa to start: only for its policy to load."""

    def __init__(self, limits: Limits, spare: bool = True) -> None:
        self.limits = limits
        self.spare = spare  # keep one started ahead
        self._lock = threading.Lock()
        self._ahead: Sandbox | None = None
        self._closed = False

    def take(self) -> Sandbox:
        """A worker whose interpreter is up; SandboxError if none starts within limits.startup."""
        with self._lock:
            if self._closed:
                raise SandboxError("the sandboxes are closed")
            box, self._ahead = self._ahead, None
            if box is not None and not box.usable():
                box.close()
                box = None
            if box is None:
                box = Sandbox()
            if self.spare:
                try:
                    self._ahead = Sandbox()
                except SandboxError:
                    pass
        try:
            box.wait_started(self.limits.startup)
        except SandboxError:
            box.close()
            raise
        return box

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._ahead is not None:
                self._ahead.close()
            self._ahead = None


# ---------------------------------------------------------------- a program's copy of a cluster


class _View:
    """The JSON of every node of the cluster a program decides for, and what each sandbox holds of it.

    ``token`` names this copy: a sandbox whose ``follows`` is the token holds
    it up to the names pending for it here; any other sandbox (a new one, or
    one another program used meanwhile) is sent the whole copy.
    """

    def __init__(self) -> None:
        self.cache: dict[str, str] = {}
        self.token = object()
        self._tracking: weakref.ref[Cluster] | None = None  # the active cluster whose changes we follow
        self._changed: set[str] | None = None  # the set we left in cluster.changed
        self._snapshot: weakref.ref[Cluster] | None = None  # or the cluster we last copied whole
        self._pending: weakref.WeakKeyDictionary[Sandbox, set[str]] = weakref.WeakKeyDictionary()

    def refresh(self, cluster: Cluster, program: object, again: bool = False) -> None:
        """Bring the copy up to date with ``cluster``.

        If ``program`` is the cluster's program, the copy follows
        ``cluster.changed`` (and clears it); otherwise (a dry run, a
        simulation on a copy) the cluster is copied whole, unless ``again``
        says it has not changed since the last call.
        """
        if cluster.program is not program:
            self._tracking = None
            if again and self._snapshot is not None and self._snapshot() is cluster:
                return
            self._reset({name: encode_node(cluster, n) for name, n in cluster.nodes.items()})
            self._snapshot = weakref.ref(cluster)
            return
        self._snapshot = None
        # set_program() installs a new set naming every node; ours still there
        # means every change since our last look is in it.
        continuous = (self._tracking is not None and self._tracking() is cluster
                      and cluster.changed is self._changed)
        changed = cluster.changed
        cluster.changed = self._changed = set()
        self._tracking = weakref.ref(cluster)
        if not continuous:
            self._reset({name: encode_node(cluster, n) for name, n in cluster.nodes.items()})
            return
        if not changed:
            return
        for name in changed:
            n = cluster.nodes.get(name)
            if n is None:
                self.cache.pop(name, None)
            else:
                self.cache[name] = encode_node(cluster, n)
        for pending in self._pending.values():
            pending |= changed

    def _reset(self, cache: dict[str, str]) -> None:
        self.cache = cache
        self.token = object()
        self._pending = weakref.WeakKeyDictionary()

    def delta(self, box: Sandbox) -> tuple[bool, list[str], list[str]]:
        """What box must learn: (whole copy?, node JSON, names gone); box is then taken to hold it."""
        pending = self._pending.get(box)
        self._pending[box] = set()
        if box.follows is not self.token or pending is None:
            box.follows = self.token
            return True, list(self.cache.values()), []
        nodes = [self.cache[n] for n in pending if n in self.cache]
        gone = [n for n in pending if n not in self.cache]
        return False, nodes, gone


def _ask(box: Sandbox, view: _View, name: str, req: Request, exclude: Iterable[str], limits: Limits,
         cap: float | None = None) -> tuple[dict[str, Any], bool]:
    """One decision by box's policy for view's cluster: (the reply, whether cap bounded its deadline).

    A large delta goes first in a sync of its own, outside the deadline; the
    deadline (now + limits.deadline, or cap if earlier) is an absolute time
    the sandbox stops the policy at, and the worker is killed at it plus the
    grace.  SandboxTimeout / SandboxError (and box closed) if no answer comes.
    """
    full, nodes, gone = view.delta(box)
    if full or len(nodes) + len(gone) > INLINE_NODES:
        size = sum(map(len, nodes))
        try:
            box.call(_sync_message("sync", full, nodes, gone), time.monotonic() + limits.startup + size / 20e6)
        except SandboxTimeout:
            raise SandboxError("the sandbox took too long to copy the cluster") from None
        nodes, gone = [], []
    end = time.monotonic() + limits.deadline
    capped = cap is not None and cap < end
    if cap is not None and capped:
        end = cap
    head = json.dumps({"op": "decide", "c": name, "x": sorted(exclude), "end": end, "full": False, "gone": gone})
    msg = (head[:-1] + ',"r":' + encode_request(req) + ',"nodes":[' + ",".join(nodes) + "]}\n").encode()
    try:
        return box.call(msg, end + limits.grace), capped
    except SandboxTimeout:
        raise _Killed(capped) from None


class _Killed(SandboxTimeout):
    """No answer by the deadline and the grace: the worker was killed (capped: the deadline was a budget's end)."""

    def __init__(self, capped: bool) -> None:
        super().__init__("no answer")
        self.capped = capped


# ---------------------------------------------------------------- the platform policy, apart


class Platform:
    """The platform policy in a sandbox process of its own, shared by every user policy.

    Make one per scheduler (``Platform(limits=limits)``) and pass it to every
    LuaProgram and load_policy; ``start()`` once (it starts again by itself
    after its process dies, backing off if it will not).  Its ``launcher``
    starts the user policies' sandboxes too, one kept started ahead.
    """

    def __init__(self, source: str | None = None, *, limits: Limits | None = None, spare: bool = True) -> None:
        self.source = source if source is not None else platform_source()
        self.limits = limits or Limits()
        self.launcher = Launcher(self.limits, spare=spare)
        self.restarts = 0  # times its process was lost (killed, died) and started again
        self.error = ""  # why it last could not answer ("" while it can)
        self._lock = threading.RLock()
        self._box: Sandbox | None = None
        self._retry_at = 0.0
        self._backoff = 0.5

    def start(self) -> None:
        """Start its process and load platform.lua, if not done yet.

        PolicyError if platform.lua does not load; SandboxError if no process starts.
        """
        with self._lock:
            self._ready()

    def _ready(self) -> Sandbox:
        box = self._box
        if box is not None and box.usable():
            return box
        if box is not None:
            self._lost()
        if time.monotonic() < self._retry_at:
            raise SandboxError(f"the platform sandbox would not start ({self.error}); trying again shortly")
        try:
            box = self.launcher.take()
            try:
                box.load(self.source, None, self.limits)
            except _LoadFailed as e:
                box.close()
                why = e.why if e.kind == "platform" else _load_words(e.kind, e.why, self.limits)
                raise PolicyError(why if why.startswith("the platform") else
                                  f"the platform policy did not load: {why}") from None
        except (SandboxError, PolicyError) as e:
            self.error = str(e)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 30.0)
            raise
        self._backoff = 0.5
        self.error = ""
        self._box = box
        return box

    def _lost(self) -> None:
        if self._box is not None:
            self._box.close()
            self._box = None
            self.restarts += 1
            self.launcher.spare = True  # one process lost makes another likely: start them ahead

    def decide(self, view: _View, name: str, req: Request, exclude: Iterable[str]) -> dict[str, Any]:
        """The platform policy's reply for view's cluster (``view`` refreshed by the caller).

        SandboxError if its process cannot answer (it is then restarted at the next call).
        """
        with self._lock:
            try:
                box = self._ready()
            except PolicyError as e:
                raise SandboxError(str(e)) from None
            try:
                reply, _ = _ask(box, view, name, req, exclude, self.limits)
                if reply.get("fail") == "memory":  # its state was dropped: load it again, for the next one
                    box.reload(self.limits)
            except (SandboxError, _LoadFailed) as e:
                self._lost()
                self.error = str(e)
                if isinstance(e, SandboxError):
                    raise
            return reply

    def close(self) -> None:
        with self._lock:
            if self._box is not None:
                self._box.close()
                self._box = None
            self.launcher.close()

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- a command's budget


@dataclass
class Budget:
    """One command's time for the user's policy, shared by all its decisions (``LuaProgram.budget``).

    Once ``end`` (time.monotonic) has passed, the command's remaining
    decisions go straight to the platform policy, without asking the user's
    sandbox; ``handed_over`` counts them (and a decision the budget's end cut
    short).  If the platform's process cannot answer either (twice in the
    command), the built-in spread decides the rest (``builtin``).
    """

    seconds: float
    end: float
    decisions: int = 0  # decisions made under this budget
    handed_over: int = 0  # of which the platform policy (or, failing it, the built-in) made for want of time
    builtin: int = 0  # of those, decided by the built-in spread
    platform_failures: int = 0  # times the platform's process could not answer in this command
    platform_down: bool = False  # it failed PLATFORM_TRIES times: the built-in decides the rest

    def spent(self) -> bool:
        return time.monotonic() >= self.end

    def note(self) -> str:
        return f"the command's policy budget of {_ms(self.seconds)} was spent"

    def line(self) -> str:
        """"" if the budget lasted, else one line for the log, e.g. "policy budget spent after 37 of 1000
        decisions; the platform policy decided the rest"."""
        if not self.handed_over:
            return ""
        asked = self.decisions - self.handed_over
        if not self.builtin:
            rest = "the platform policy decided the rest"
        elif self.builtin == self.handed_over:
            rest = "the built-in spread decided the rest (the platform policy could not)"
        else:
            rest = (f"the platform policy decided {self.handed_over - self.builtin} of the rest and the built-in "
                    f"spread {self.builtin}")
        return f"policy budget of {_ms(self.seconds)} spent after {asked} of {self.decisions} decisions; {rest}"


# ---------------------------------------------------------------- the program


class LuaProgram:
    """A Lua policy deciding for the core (``cluster.set_program``), with the platform policy behind it.

    ``lua`` None makes the platform policy itself the program.  ``platform``
    is the shared platform sandbox (without one, the program makes its own
    and closes it with itself).  Failures are counted in ``counters``, the
    recent ones kept in ``recent`` and passed to ``on_failure``; lines the
    policy logs go to ``logs`` and ``on_log``.  After ``limits.fail_limit``
    failures in a row ``failing`` is set (and cleared by the next good
    decision).
    """

    def __init__(self, lua: str | None, *, limits: Limits | None = None, platform: Platform | None = None,
                 on_failure: Callable[[str], None] | None = None, on_log: Callable[[str], None] | None = None):
        self.lua = lua
        self.limits = limits or Limits()
        self._own_platform = platform is None
        self.platform = platform if platform is not None else Platform(limits=self.limits, spare=False)
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
        self._retry_at = 0.0
        self._backoff = 0.5
        self._view = _View()
        self._budget: Budget | None = None
        self._closed = False
        # Told why the policy did not decide, one of FALLBACKS (the scheduler's metrics set it).
        self.on_fallback: Callable[[str], None] | None = None

    # ------------------------------------------------------------ life
    def start(self) -> None:
        """Load the policy in a sandbox of its own (no cluster needed: any thread may do this).

        Bounded by ``limits.load_budget`` (and the grace), plus the interpreter's
        start if no worker was started ahead.  PolicyError (one line) if the
        policy does not load; SandboxError if no sandbox starts.
        """
        if self.lua is None:
            self.platform.start()
            self.defined = "decide"
            return
        if self._box is not None and self._box.usable():
            return
        try:
            self._box = self._spawn()
        except _LoadFailed as e:
            raise PolicyError(_load_words(e.kind, e.why, self.limits)) from None
        self.defined = self._box.defined

    def _spawn(self) -> Sandbox:
        box = self.platform.launcher.take()
        try:
            box.load(self.platform.source, self.lua, self.limits)
        except BaseException:
            box.close()
            raise
        return box

    def close(self) -> None:
        self._closed = True
        if self._box is not None:
            self._box.close()
        self._box = None
        if self._own_platform:
            self.platform.close()

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

    @contextlib.contextmanager
    def budget(self, seconds: float | None = None, *, until: float | None = None) -> Iterator[Budget]:
        """Share ``seconds`` (or until the time.monotonic ``until``) among the decisions made inside.

        Each decision still has its own deadline, cut to the budget's end; once
        the budget is spent the rest go to the platform policy without asking
        the user's sandbox, each Decision's reason saying so, and the Budget
        yielded counts them (``handed_over``, ``line()`` for the log).  Nested,
        a budget cannot outlast the one it is in.
        """
        start = time.monotonic()
        if until is None:
            if seconds is None:
                raise ValueError("budget: give seconds or until")
            until = start + seconds
        outer = self._budget
        if outer is not None:
            until = min(until, outer.end)
        b = Budget(seconds if seconds is not None else max(0.0, until - start), until)
        self._budget = b
        try:
            yield b
        finally:
            self._budget = outer

    def _ready_box(self) -> Sandbox:
        """The user's sandbox, started again (the policy loaded anew) if it was lost."""
        box = self._box
        if box is not None and box.usable():
            return box
        if box is not None:
            self._lost()  # died while idle (killed by the OOM killer, say): start another
        if self._closed:
            raise SandboxError("the program is closed")
        if time.monotonic() < self._retry_at:
            raise SandboxError("the sandbox would not start; trying again shortly")
        try:
            box = self._spawn()
        except (SandboxError, _LoadFailed):
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 30.0)
            raise
        self._backoff = 0.5
        self._box = box
        return box

    def _lost(self) -> None:
        """The sandbox was killed or died: the next call starts another."""
        if self._box is not None:
            self._box.close()
        self._box = None
        self.counters["restarts"] += 1
        self.platform.launcher.spare = True  # one killed sandbox makes another likely: start them ahead

    def _told(self, reply: dict[str, Any]) -> None:
        for line in reply.get("log", ()):
            self.logs.append(line)
            _tell(self.on_log, line)

    # ------------------------------------------------------------ deciding
    def decide(self, cluster: Cluster, name: str, req: Request, exclude: frozenset[str]) -> Decision:
        self.counters["decisions"] += 1
        self._view.refresh(cluster, self)
        b = self._budget
        if b is not None:
            b.decisions += 1
        if self.lua is None:
            return self._platform(cluster, name, req, exclude, None)
        if b is not None and b.spent():
            return self._hand_over(cluster, name, req, exclude, b)
        try:
            box = self._ready_box()
            reply, capped = _ask(box, self._view, name, req, exclude, self.limits, b.end if b else None)
        except _LoadFailed as e:
            self._failed("load", _load_words(e.kind, e.why, self.limits))
            return self._platform(cluster, name, req, exclude, "load")
        except SandboxTimeout as e:
            self._lost()
            if isinstance(e, _Killed) and e.capped and b is not None:
                return self._hand_over(cluster, name, req, exclude, b)
            self._failed("timeout", f"no answer within {_ms(self.limits.deadline)} (stuck in one long call?); "
                                    "the sandbox was restarted")
            return self._platform(cluster, name, req, exclude, "timeout")
        except SandboxError as e:
            if self._box is not None and not self._box.usable():
                self._lost()
            self._failed("sandbox", str(e))
            return self._platform(cluster, name, req, exclude, "sandbox")
        self._told(reply)
        fail = reply.get("fail")
        if fail:
            if fail == "memory":
                self._reload()
            if fail == "timeout" and capped and b is not None:
                return self._hand_over(cluster, name, req, exclude, b)
            self._failed(fail, reply.get("fail_why", ""))
            return self._platform(cluster, name, req, exclude, fail)
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

    def _reload(self) -> None:
        """After the policy ran out of memory (its globals dropped): load it again, outside any deadline."""
        box = self._box
        if box is None:
            return
        try:
            box.reload(self.limits)
        except (SandboxError, _LoadFailed):
            self._lost()

    def _hand_over(self, cluster: Cluster, name: str, req: Request, exclude: frozenset[str], b: Budget) -> Decision:
        """The command's budget is spent: the platform decides, and the budget counts it."""
        b.handed_over += 1
        self.counters["handed_over"] += 1
        self._fell_back("budget")
        return self._platform(cluster, name, req, exclude, None, b.note())

    def _platform(self, cluster: Cluster, name: str, req: Request, exclude: frozenset[str], cause: str | None,
                  note: str | None = None) -> Decision:
        """The platform policy's decision, from its own sandbox (cause: why the user's policy did not decide)."""
        if cause is not None:
            note = f"the policy {_CAUSE.get(cause, 'failed')}"
        b = self._budget
        if b is not None and b.platform_down:
            return self._builtin(cluster, name, req, exclude, "", note)
        try:
            reply = self.platform.decide(self._view, name, req, exclude)
        except SandboxError as e:
            return self._builtin(cluster, name, req, exclude, f"platform policy unavailable: {e}", note)
        self._told(reply)
        fail = reply.get("fail")
        if fail:
            return self._builtin(cluster, name, req, exclude, f"platform policy failed: {fail}: "
                                 f"{reply.get('fail_why', '')}", note)
        if cause is not None:
            self.counters["fallbacks"] += 1
            self._fell_back("error" if cause == "syntax" else cause if cause in FALLBACKS else "error")
        node, why = reply.get("node"), reply.get("why")
        if reply.get("how") != "node" or node is None:
            return Decision(name, None, f"{why or 'unschedulable'}" + (f" ({note})" if note else ""), 0)
        wrong = self._wrong(cluster, node, req, exclude)
        if wrong:
            return self._builtin(cluster, name, req, exclude, f"platform policy chose {node}, which {wrong}", note)
        detail = "; ".join(x for x in (why, note) if x)
        return Decision(name, node, f"platform: {node}" + (f" ({detail})" if detail else ""),
                        int(reply.get("looked", 1)))

    def _builtin(self, cluster: Cluster, name: str, req: Request, exclude: frozenset[str], why: str,
                 note: str | None = None) -> Decision:
        """The core's own spread: the platform's process could not answer (why; "" if already told)."""
        self.counters["builtin"] += 1
        self._fell_back("builtin")
        b = self._budget
        if b is not None:
            if note is not None and note == b.note():
                b.builtin += 1
            if why:  # the platform failed again in this command: the rest go straight to the built-in
                b.platform_failures += 1
                b.platform_down = b.platform_failures >= PLATFORM_TRIES
        if why:
            line = f"{why}; the built-in spread decided"
            self.recent.append(line)
            _tell(self.on_failure, line)
        d = cluster.decide_builtin(name, req, exclude)
        return Decision(d.name, d.node, f"{d.reason} (built-in: the platform policy could not decide"
                        + (f"; {note}" if note else "") + ")", d.candidates)

    def _fell_back(self, reason: str) -> None:
        if self.on_fallback is not None:
            try:
                self.on_fallback(reason)
            except Exception:  # a metrics hook must not fail a decision
                logging.getLogger("fornax_sched.policy").exception("on_fallback failed")

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

        Each decision is bounded as any other.  PolicyError (one line, naming
        the line where there is one) if the policy fails any of them: an
        error, a timeout, running out of memory, a bad answer.  On the
        thread that owns ``cluster``.
        """
        out = []
        for i, req in enumerate(requests if requests is not None else sample_requests(cluster)):
            name = req.name or f"dry-run-{i + 1}"
            self._view.refresh(cluster, self, again=i > 0)
            try:
                if self.lua is None:
                    reply = self.platform.decide(self._view, name, req, frozenset())
                else:
                    if self._box is None or not self._box.usable():
                        raise SandboxError("the policy's sandbox is not running")
                    reply, _ = _ask(self._box, self._view, name, req, frozenset(), self.limits)
            except SandboxTimeout:
                raise PolicyError(f"dry run: no answer within {_ms(self.limits.deadline)} "
                                  "(stuck in one long call?)") from None
            except SandboxError as e:
                raise PolicyError(f"dry run: {e}") from None
            if reply.get("fail"):
                raise PolicyError(f"dry run: {_dry_words(reply['fail'], reply.get('fail_why', ''))}")
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
                 f"deadline {round(self.limits.deadline * 1000)}ms",
                 f"load_budget {round(self.limits.load_budget * 1000)}ms",
                 f"memory_cap {format_size(self.limits.memory)}"]
        lines += [f"{k} {v}" for k, v in self.counters.items()]
        lines.append(f"platform_restarts {self.platform.restarts}")
        if self.platform.error:
            lines.append(f"platform unavailable: {self.platform.error}")
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


def _load_words(kind: str, why: str, limits: Limits) -> str:
    """Why a policy did not load, as a refusal: the worker's words, a timeout worded with the load budget."""
    if kind == "timeout" and why.startswith("ran past "):
        return f"timed out loading: {why} (the load budget)"
    if kind == "timeout":
        return f"timed out loading: {why}"
    if kind == "memory":
        return f"ran out of memory loading (the cap is {format_size(limits.memory)})"
    return why


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
