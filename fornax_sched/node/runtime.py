"""The container runtime of fornax-node: every container is a real Linux process.

An image is a directory ``<images>/<name>/`` with a ``config`` file (one
command line, shlex-split, ``#`` lines ignored; run arguments are appended)
and an optional ``rootfs/``, the working directory when present (else the
image directory).  The container gets the daemon's environment, then
FORNAX_CONTAINER, FORNAX_NODE and FORNAX_IMAGE, then the run's own variables
(which may not set FORNAX_*: those tell a container where it is), stdin from
/dev/null, stdout+stderr into its log, and a session (hence process group)
of its own.  Labels are the run's ``key value`` tags, kept in the record:
they are how a scheduler tells its containers from those a user started.

Why a monitor per container (see rt_monitor): the daemon may be killed and
restarted on the same state directory.  Each container's parent is a small
monitor process (forked, via a fork server made at start, from the daemon's
own code: no interpreter starts per container) in a session of its own; it
captures the output and writes the exit status to disk, so a new daemon
adopts running containers and still learns how they end.  The daemon watches
each monitor with a pidfd (which works for monitors of a previous daemon,
not its children) and reads the exit file when the monitor ends.  Adoption
checks identity with the /proc start times saved with each pid.

Limits (rt_cgroup): cgroup v2 when it has the controllers and we can write
it, else cgroup v1, else rlimits (RLIMIT_DATA for memory, set in the child
before exec; cpu rate cannot be limited then, which the container's log and
``note`` say).  With cgroups, one group per container under
``fornax-<node>-<hash of state dir>/`` below the daemon's own cgroup.  When
the container joins its group: right after spawn, *frozen*: the monitor
SIGSTOPs it the moment posix_spawn returns (the new program has at most run
its loader), answers run(), writes it into its groups and SIGCONTs it.  Not
before exec, because a cgroup migration can wait ~10 ms for an RCU grace
period (after a quiet spell, on kernels without favordynmods), which run()
must not pay, and the monitor itself must stay outside (its pages would be
charged to the container).  An OOM kill (the group's oom_kill counter) ends
the container "failed" with reason "memory limit 64M exceeded"; with
rlimits a failed allocation is recognised by the program's last words
(MemoryError, "Cannot allocate memory", ...), a heuristic.

Stop: SIGTERM to the process group, SIGKILL (group and cgroup) after the
grace; the intent is saved first, so the end reads "stopped" even across a
restart, with the reason given: a user's stop ("stopped by request") and the
node's own shutdown ("stopped: node shutting down") must stay apart, since a
scheduler re-places only the second.  When a container's main process ends,
the rest of its group is killed too.

State directory layout::

    <state>/next_id                        at least the next id (ids are never reused; written at
                                           start and before a record is destroyed, the records
                                           themselves carry the highest id otherwise)
    <state>/containers/<id>/container.json the record (daemon; temp + rename)
    <state>/containers/<id>/pids           monitor and container pid + start time (monitor)
    <state>/containers/<id>/log            stdout+stderr, at most log_limit bytes (monitor)
    <state>/containers/<id>/exit           exit code or signal, time, oom (monitor, at its end)

Every file has a single writer and is replaced atomically (temp + rename).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .. import units
from ..environ import env_problem
from ..units import format_size
from . import rt_cgroup
from .rt_monitor import Forker, Spec, atomic_write, proc_start, proc_state

log = logging.getLogger(__name__)

STATES = ("created", "running", "stopped", "exited", "failed")
LOST = "lost while the node was down"
STOPPED = "stopped by request"  # a stop written by a user (or a scheduler)
SHUTDOWN = "stopped: node shutting down"  # the daemon's own clean shutdown
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # (what the ctl parser takes)
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,62}")  # node and container labels alike
MAX_LABELS = 64  # per container
MAX_LABEL_VALUE = 255  # characters
MIN_MEM = 1 << 20  # below this not even a shell starts
REPORT_TIMEOUT = 10.0  # seconds for a monitor to say it started the container


class ContainerError(Exception):
    """A request the runtime refuses; the message is the user-facing text."""


def parse_size(text: str, what: str = "memory limit") -> int:
    """Bytes in "64M" and the like (see fornax_sched.units); ContainerError if unreadable."""
    try:
        return units.parse_size(text, what)
    except units.SizeError as e:
        raise ContainerError(str(e)) from None


@dataclass
class Limits:
    """What a container may use; None is no limit (mutable: the ctl parser fills it in)."""

    mem: int | None = None  # bytes
    cpus: float | None = None  # CPUs (0.5 = half a CPU)


@dataclass
class Container:
    """One container's record, as kept in memory and in container.json."""

    id: str
    name: str
    image: str
    cmd: list[str]
    state: str = "created"  # created|running|stopped|exited|failed ("destroyed" only in the last on_change)
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""  # why failed or stopped
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    limits: Limits = field(default_factory=Limits)
    node: str = ""
    backend: str = ""  # cgroup2 | cgroup1 | rlimit
    note: str = ""  # limits that could not be enforced
    cgroups: list[str] = field(default_factory=list)  # memory group first
    pid_start: int | None = None  # /proc start times: identity against pid reuse
    monitor: int | None = None
    monitor_start: int | None = None
    stopping: float | None = None  # when we asked it to stop (persisted: a restart still knows)
    stop_reason: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    env_keys: list[str] = field(default_factory=list)  # the run's own variables; values are not kept (secrets)

    def status(self) -> str:
        """``key value`` lines; keys without a value are left out (exit_code until it exited).

        New keys go after the old ones (``env``, then one ``label.KEY`` line
        per label), so a reader that knows only the old keys is unaffected.
        """
        rows: list[tuple[str, object]] = [
            ("id", self.id), ("name", self.name), ("image", self.image), ("state", self.state),
            ("pid", self.pid), ("exit_code", self.exit_code), ("signal", self.signal),
            ("created", _t(self.created)), ("started", _t(self.started)), ("finished", _t(self.finished)),
            ("cmd", shlex.join(self.cmd)),
            ("mem", format_size(self.limits.mem) if self.limits.mem is not None else None),
            ("cpus", f"{self.limits.cpus:g}" if self.limits.cpus is not None else None),
            ("reason", self.reason or None), ("note", self.note or None), ("backend", self.backend or None),
            ("env", ",".join(sorted(self.env_keys)) or None),
        ]
        rows += [(f"label.{k}", v) for k, v in sorted(self.labels.items())]
        return "".join(f"{k} {_oneline(str(v))}\n" for k, v in rows if v is not None)

    def to_json(self) -> bytes:
        raw = dict(self.__dict__)  # (not asdict: its deep copy costs a quarter millisecond per run)
        raw["limits"] = {"mem": self.limits.mem, "cpus": self.limits.cpus}
        return json.dumps(raw).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Container:
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        raw["limits"] = Limits(**(raw.get("limits") or {}))
        raw["labels"] = dict(raw.get("labels") or {})  # (records older than labels have none)
        raw["env_keys"] = list(raw.get("env_keys") or [])
        return cls(**raw)


def _t(v: float | None) -> str | None:
    return None if v is None else f"{v:.3f}"


def _oneline(s: str) -> str:
    return s.replace("\n", " ")


@dataclass
class _Watch:
    """The daemon's hold on one live monitor."""

    monitor: int
    pidfd: int
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Runtime:
    """Runs, adopts, stops and forgets containers; see the module docstring."""

    def __init__(self, images: Path, state: Path, *, node: str = "fornax", log_limit: int = 1 << 20,
                 grace: float = 5.0, limits_backend: str = "auto") -> None:
        if limits_backend not in rt_cgroup.BACKENDS:
            raise ContainerError(f"unknown limits backend {limits_backend!r}: "
                                 f"want one of {', '.join(rt_cgroup.BACKENDS)}")
        self._images = Path(images)
        self._state = Path(state)
        self.node = node
        self.log_limit = log_limit
        self.grace = grace
        self.limits_backend = limits_backend
        self.on_change: Callable[[Container], None] | None = None
        # For metrics: how a start ended (running, failed) and the seconds from run() to that; the
        # final state of a container that ended while the node ran (exited, failed, stopped).
        self.on_start: Callable[[str, float], None] | None = None
        self.on_end: Callable[[str], None] | None = None
        self._containers: dict[str, Container] = {}
        self._watches: dict[str, _Watch] = {}
        self._starting: dict[str, asyncio.Event] = {}  # run() awaiting the monitor's report
        self._next = 1
        self._b: rt_cgroup.Backend | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._shutting_down = False  # run() refuses: nothing may start that shutdown() would not stop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._forker = Forker()

    # ------------------------------------------------------------ life
    @property
    def backend(self) -> str:
        """The limits backend in use (after start): cgroup2, cgroup1 or rlimit."""
        return self._b.kind if self._b else ""

    async def start(self) -> builtins.list[str]:
        """Load the records, adopt live containers; one line per container that ended or was lost meanwhile."""
        self._loop = asyncio.get_running_loop()
        (self._state / "containers").mkdir(parents=True, exist_ok=True)
        try:
            self._b = rt_cgroup.detect(rt_cgroup.parent_name(self.node, str(self._state)), self.limits_backend)
        except rt_cgroup.BackendError as e:
            raise ContainerError(f"limits backend {self.limits_backend}: {e}") from None
        log.info("limits: %s", self._b.why)
        try:
            self._next = max(int((self._state / "next_id").read_text().strip()), 1)
        except (OSError, ValueError):
            self._next = 1
        lines = []
        for d in sorted(self._containers_dir().iterdir(), key=lambda p: (len(p.name), p.name)):
            if not d.name.isdigit():
                continue
            self._next = max(self._next, int(d.name) + 1)
            try:
                c = Container.from_json((d / "container.json").read_bytes())
            except (OSError, ValueError, TypeError) as e:
                log.warning("container %s: unreadable record, ignored: %s", d.name, e)
                continue
            self._containers[c.id] = c
            if c.state in ("created", "running"):
                line = self._adopt(c)
                if line:
                    lines.append(line)
        self._save_next()
        rt_cgroup.sweep(self._b, keep=set(self._watches))
        self._forker.start()  # now, while the daemon is small and has no sockets yet
        return lines

    async def shutdown(self) -> None:
        """Stop every running container (TERM, KILL after grace) and stop watching.

        Their reason is SHUTDOWN, not a user's STOPPED: the node going down is
        not someone asking.  Containers still starting are stopped too, and
        run() refuses from now on, so that none is left behind.
        """
        self._shutting_down = True
        ids = sorted(set(self._watches) | set(self._starting), key=int)
        results = await asyncio.gather(*(self.stop(cid, reason=SHUTDOWN) for cid in ids), return_exceptions=True)
        for cid, r in zip(ids, results, strict=True):
            if isinstance(r, BaseException):
                log.warning("container %s: stop at shutdown failed: %s", cid, r)
        await self.detach()
        if self._b is not None:
            rt_cgroup.remove_parents(self._b)

    async def detach(self) -> None:
        """Stop watching and leave every container running (a restarted daemon adopts them)."""
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for w in self._watches.values():
            if self._loop is not None:
                self._loop.remove_reader(w.pidfd)
            os.close(w.pidfd)
        self._watches.clear()
        self._forker.close()

    # ------------------------------------------------------------ queries
    def images(self) -> builtins.list[str]:
        """The images run() would accept (a usable name, a config whose command is found), sorted.

        Checked in full, not just listed: a scheduler refuses a place up front
        when no node has the image, which only helps if "has" means "runs".
        """
        try:
            names = sorted(d.name for d in self._images.iterdir())
        except OSError:
            return []
        out = []
        for name in names:
            if not _IMAGE.fullmatch(name) or not (self._images / name / "config").is_file():
                continue
            try:
                argv, cwd = self._image_cmd(name)
                _resolve(argv[0], cwd, os.environ.get("PATH", os.defpath), name)
            except ContainerError:
                continue
            out.append(name)
        return out

    def get(self, id: str) -> Container:
        c = self._containers.get(id)
        if c is None:
            raise ContainerError(f"unknown container {id}")
        return c

    def list(self) -> builtins.list[Container]:
        return sorted(self._containers.values(), key=lambda c: int(c.id))

    def log(self, id: str) -> bytes:
        """The container's output, the last log_limit bytes at most."""
        self.get(id)
        try:
            data = (self._containers_dir() / id / "log").read_bytes()
        except FileNotFoundError:
            return b""
        return data[-self.log_limit:] if self.log_limit > 0 else b""

    def mem_used(self) -> int:
        """Resident memory of the running containers: their groups' counters, else their process groups' RSS."""
        total = 0
        loose: set[int] = set()
        for c in self._containers.values():
            if c.state != "running":
                continue
            used = rt_cgroup.mem_usage(c.backend, c.cgroups)
            if used is not None:
                total += used
            elif c.pid:
                loose.add(c.pid)
        if loose:
            total += _rss_by_group(loose)
        return total

    # ------------------------------------------------------------ run
    async def run(self, image: str, args: Sequence[str] = (), limits: Limits | None = None,
                  name: str | None = None, labels: Mapping[str, str] | None = None,
                  env: Mapping[str, str] | None = None) -> Container:
        """Start a container; returns once its process exists (state running, pid set).

        Errors in the request (image, limits, name, labels, env, command) raise
        ContainerError before anything is written.  If the command then cannot
        be executed, the container is returned in state "failed" with the reason.
        Names need not be unique (ids are); env values are passed, not kept.
        """
        b = self._ready()
        began = time.perf_counter()
        if self._shutting_down:
            raise ContainerError("the node is shutting down")
        labels = check_labels(labels or {})
        user_env = check_env(env or {})
        limits = replace(limits) if limits is not None else Limits()
        argv, cwd = self._image_cmd(image)
        for a in args:
            if not isinstance(a, str) or "\0" in a:
                raise ContainerError(f"bad argument {a!r}")
        argv += list(args)
        _check_limits(limits)
        if name is not None and not re.fullmatch(r"[^\s/]{1,64}", name):
            raise ContainerError(f"bad container name {name!r}")
        # The image's command is found with the node's PATH: the image is the node's, not the run's.
        exe = _resolve(argv[0], cwd, os.environ.get("PATH", os.defpath), image)

        cid = str(self._next)
        try:
            groups = rt_cgroup.create(b, cid, limits.mem, limits.cpus)
        except OSError as e:
            raise ContainerError(f"cannot set up limits: {e.strerror or e}") from None
        self._next += 1  # persisted by the record itself; next_id only matters once records are destroyed
        # The run's variables come last and win over the daemon's (check_env refused FORNAX_*).
        env = {k: v for k, v in os.environ.items() if k not in user_env}
        env.update(FORNAX_CONTAINER=cid, FORNAX_NODE=self.node, FORNAX_IMAGE=image)
        env.update(user_env)
        c = Container(id=cid, name=name or f"{image}-{cid}", image=image, cmd=argv, created=time.time(),
                      limits=limits, node=self.node, backend=b.kind, note="; ".join(groups.notes),
                      cgroups=groups.dirs, labels=labels, env_keys=list(user_env))
        try:
            (self._containers_dir() / cid).mkdir()
            self._save(c)
        except OSError as e:
            rt_cgroup.remove(groups.dirs)
            raise ContainerError(f"cannot write the record of container {cid}: {e.strerror or e}") from None
        self._containers[cid] = c
        self._starting[cid] = asyncio.Event()
        # Once the record exists the start is seen through even if the caller goes away
        # (a client whose connection drops mid-run): a container never stays "created".
        return await asyncio.shield(asyncio.ensure_future(self._start_settled(c, exe, env, cwd, groups, began)))

    async def _start_settled(self, c: Container, exe: str, env: dict[str, str], cwd: Path,
                             groups: rt_cgroup.Groups, began: float) -> Container:
        try:
            return await self._start(c, exe, env, cwd, groups)
        finally:
            self._starting.pop(c.id).set()
            if self.on_start is not None:
                try:
                    self.on_start("running" if c.state == "running" else "failed", time.perf_counter() - began)
                except Exception:
                    log.exception("on_start failed for container %s", c.id)

    async def _start(self, c: Container, exe: str, env: dict[str, str], cwd: Path,
                     groups: rt_cgroup.Groups) -> Container:
        """Have a monitor start the container whose record is saved; returns it running or failed."""
        b = self._ready()
        cid = c.id
        cdir = self._containers_dir() / cid
        argv = c.cmd
        spec = Spec(cid=cid, path=exe, argv=argv, env=env, cwd=str(cwd), dir=str(cdir), log_limit=self.log_limit,
                    cgroup_kind=b.kind if b.is_cgroup else "", groups=groups.dirs, join=groups.join,
                    rlimit_mem=c.limits.mem if b.kind == "rlimit" else None, notes=groups.notes)

        try:
            sock = self._forker.submit(spec)
        except OSError as e:
            rt_cgroup.remove(groups.dirs)
            self._finish(c, {"error": f"cannot start a monitor: {e.strerror or e}", "time": time.time()})
            return c
        try:
            report, pidfd = await asyncio.wait_for(self._read_report(sock), REPORT_TIMEOUT)
        except TimeoutError:
            report, pidfd = "", None
        finally:
            sock.close()
        words = report.split()
        if pidfd is None or words[:1] not in (["OK"], ["ERR"]):
            # No monitor to watch: whatever it may have started dies with the groups.
            if pidfd is not None:
                os.close(pidfd)
            rt_cgroup.kill_all(groups.dirs)
            rt_cgroup.remove(groups.dirs)
            self._finish(c, {"error": "the monitor did not start the container", "time": time.time()})
            return c
        if words[0] == "OK" and len(words) == 5:
            c.pid, c.pid_start = int(words[1]), _int(words[2])
            c.monitor, c.monitor_start = int(words[3]), _int(words[4])
            self._watch(c, pidfd)
            c.state = "running"
            c.started = time.time()
            # Saved just after we return: until then a restart learns the same
            # from the monitor's pids file.
            assert self._loop is not None
            self._loop.call_soon(self._save_if, c, "running")
            self._notify(c)
            return c
        # "ERR <monitor> <message>": the monitor has written the exit file and is ending.
        c.monitor = _int(words[1]) if len(words) > 1 else None
        self._watch(c, pidfd)
        await self._watches[cid].done.wait()
        return c

    async def _read_report(self, sock: socket.socket) -> tuple[str, int | None]:
        """The monitor's one message ("OK <pid> <pid_start> <monitor> <monitor_start>" or "ERR <message>")
        and the pidfd of the monitor that came with it; ("", None) if it died first."""
        assert self._loop is not None
        fut: asyncio.Future[tuple[str, int | None]] = self._loop.create_future()

        def readable() -> None:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, 4096, 2)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            for extra in fds[1:]:
                os.close(extra)
            if fut.done():
                for f in fds[:1]:
                    os.close(f)
            else:
                fut.set_result((msg.decode(errors="replace").strip(), fds[0] if fds else None))

        self._loop.add_reader(sock.fileno(), readable)
        try:
            return await fut
        finally:
            self._loop.remove_reader(sock.fileno())

    # ------------------------------------------------------------ stop, kill, destroy
    async def stop(self, id: str, grace: float | None = None, reason: str = STOPPED) -> Container:
        """SIGTERM to the container's process group, SIGKILL after grace; ends "stopped".

        ``reason`` is what its status will say; a stop already under way (an
        adopted one, say) keeps the reason it started with.
        """
        c = self.get(id)
        grace = self.grace if grace is None else grace
        w = await self._live(c)
        if w is None:
            return c
        self._mark_stopping(c, reason)
        self._signal(c, signal.SIGTERM)
        try:
            await asyncio.wait_for(w.done.wait(), grace)
        except TimeoutError:
            base = c.stop_reason or reason
            if "(killed after" not in base:
                c.stop_reason = f"{base} (killed after {grace:.3g}s grace)"
                self._save(c)
            await self._kill_and_wait(c, w)
        return c

    async def kill(self, id: str) -> Container:
        """SIGKILL now; ends "stopped"."""
        c = self.get(id)
        w = await self._live(c)
        if w is None:
            return c
        self._mark_stopping(c, "killed by request")
        await self._kill_and_wait(c, w)
        return c

    async def destroy(self, id: str) -> None:
        """Stop it if running, then forget its record, log and groups."""
        c = self.get(id)
        if await self._live(c) is not None:
            await self.stop(id)
        if id in self._watches:
            raise ContainerError(f"container {id} did not stop")
        self._save_next()  # before the record goes: its id must never come back
        shutil.rmtree(self._containers_dir() / id, ignore_errors=True)
        rt_cgroup.remove(c.cgroups, wait=0)
        self._containers.pop(id, None)
        c.state = "destroyed"
        self._notify(c)

    async def _live(self, c: Container) -> _Watch | None:
        """The watch of a container that has not ended (after run() has heard from its monitor)."""
        self._ready()
        starting = self._starting.get(c.id)
        if starting is not None:
            await starting.wait()
        w = self._watches.get(c.id)
        return w if w is not None and not w.done.is_set() else None

    def _mark_stopping(self, c: Container, why: str) -> None:
        """Persist the intent first, so the end reads "stopped" even if we die before it comes."""
        if c.stopping is None or why.startswith("killed"):
            c.stopping = c.stopping or time.time()
            c.stop_reason = why
            self._save(c)

    async def _kill_and_wait(self, c: Container, w: _Watch) -> None:
        self._signal(c, signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(w.done.wait()), REPORT_TIMEOUT)
        except TimeoutError:
            # The monitor is stuck: end it too; its watch then settles the record.
            log.warning("container %s: monitor %s did not finish, killing it", c.id, w.monitor)
            with contextlib.suppress(OSError):
                os.kill(w.monitor, signal.SIGKILL)
            await w.done.wait()

    def _signal(self, c: Container, sig: int) -> None:
        """Signal the container's process group, after checking the pid is still ours."""
        if c.pid and c.pid_start is not None and proc_start(c.pid) == c.pid_start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.pid, sig)
        if sig == signal.SIGKILL:
            rt_cgroup.kill_all(c.cgroups, wait=0)  # also what escaped the process group

    # ------------------------------------------------------------ watching monitors
    def _watch(self, c: Container, pidfd: int) -> None:
        assert self._loop is not None
        self._watches[c.id] = _Watch(c.monitor or 0, pidfd)
        self._loop.add_reader(pidfd, self._monitor_ended, c.id)

    def _monitor_ended(self, cid: str) -> None:
        w = self._watches.pop(cid, None)
        if w is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(w.pidfd)
        os.close(w.pidfd)
        if w.monitor > 0:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.monitor, os.WNOHANG)  # normally the fork server's child, which reaps it
        c = self._containers.get(cid)
        if c is not None:
            info = self._read_exit(c)
            if info is None:
                self._orphaned(c, "its monitor died")
            else:
                self._finish(c, info)
        w.done.set()

    def _adopt(self, c: Container) -> str | None:
        """Take over a container the record says is live; a line for the log if it is not."""
        info = self._read_exit(c)
        if info is None:
            self._load_pids(c)
            pidfd = None
            if c.monitor and c.monitor_start is not None and proc_start(c.monitor) == c.monitor_start \
                    and proc_state(c.monitor) != "Z":  # (a dead monitor init has not reaped yet)
                with contextlib.suppress(OSError):
                    pidfd = os.pidfd_open(c.monitor)
            # Checked again with the pidfd held: it now refers to that very process.
            if pidfd is not None and c.monitor is not None and proc_start(c.monitor) == c.monitor_start:
                if c.state == "created" and c.pid:
                    c.state = "running"
                    c.started = c.started or time.time()
                    self._save(c)
                self._watch(c, pidfd)
                log.info("container %s (%s): adopted, pid %s", c.id, c.name, c.pid)
                if c.stopping is not None:  # a stop was under way when the old daemon died
                    left = max(self.grace - (time.time() - c.stopping), 0.0)
                    self._spawn_task(self.stop(c.id, grace=left))
                return None
            if pidfd is not None:
                os.close(pidfd)
            info = self._read_exit(c)  # the monitor may have finished just now
        if info is not None:
            self._finish(c, info, notify=False)
            how = c.reason or ("exit code 0" if c.exit_code == 0 else "")
            return f"container {c.id} ({c.name}) ended while the node was down: {c.state}, {how}".rstrip(", ")
        self._orphaned(c, LOST, notify=False)
        return f"container {c.id} ({c.name}) {LOST}"

    def _orphaned(self, c: Container, why: str, notify: bool = True) -> None:
        """No exit status will come (the monitor is gone): end whatever is left and mark it failed."""
        if c.pid and c.pid_start is not None and proc_start(c.pid) == c.pid_start:
            with contextlib.suppress(OSError):
                os.killpg(c.pid, signal.SIGKILL)  # nobody captures its output any more
        rt_cgroup.kill_all(c.cgroups)
        rt_cgroup.remove(c.cgroups)
        c.state = "failed"
        c.reason = why
        c.finished = c.finished or time.time()
        self._save(c)
        self._ended(c, notify)

    def _finish(self, c: Container, info: dict[str, Any], notify: bool = True) -> None:
        """Settle the final state from the monitor's exit file."""
        c.exit_code = info.get("code")
        c.signal = info.get("signal")
        c.finished = info.get("time") or time.time()
        if info.get("error"):
            c.state, c.reason = "failed", str(info["error"])
        elif info.get("oom"):
            mem = c.limits.mem
            c.state = "failed"
            c.reason = f"memory limit {format_size(mem)} exceeded" if mem else "out of memory"
        elif c.stopping is not None:
            c.state, c.reason = "stopped", c.stop_reason or STOPPED
        elif c.exit_code == 0:
            c.state, c.reason = "exited", ""
        elif c.exit_code is not None:
            c.state, c.reason = "failed", f"exit code {c.exit_code}"
        else:
            c.state, c.reason = "failed", f"killed by signal {c.signal}"
        self._save(c)
        self._ended(c, notify)

    # ------------------------------------------------------------ files
    def _containers_dir(self) -> Path:
        return self._state / "containers"

    def _save(self, c: Container) -> None:
        atomic_write(str(self._containers_dir() / c.id / "container.json"), c.to_json())

    def _save_if(self, c: Container, state: str) -> None:
        if c.state == state and c.id in self._containers:
            self._save(c)

    def _save_next(self) -> None:
        atomic_write(str(self._state / "next_id"), f"{self._next}\n".encode())

    def _read_exit(self, c: Container) -> dict[str, Any] | None:
        try:
            info = json.loads((self._containers_dir() / c.id / "exit").read_bytes())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _load_pids(self, c: Container) -> None:
        """Fill pids from the monitor's file when the daemon died before recording them."""
        try:
            p = json.loads((self._containers_dir() / c.id / "pids").read_bytes())
        except (OSError, ValueError):
            return
        if c.pid is None or c.monitor is None:
            c.pid, c.pid_start = p.get("pid"), p.get("pid_start")
            c.monitor, c.monitor_start = p.get("monitor"), p.get("monitor_start")
            c.started = c.started or p.get("started")

    # ------------------------------------------------------------ small things
    def _ready(self) -> rt_cgroup.Backend:
        if self._b is None or self._closed:
            raise ContainerError("the container runtime is not running")
        return self._b

    def _image_cmd(self, image: str) -> tuple[builtins.list[str], Path]:
        if not isinstance(image, str) or not _IMAGE.fullmatch(image) or not (self._images / image / "config").is_file():
            have = ", ".join(self.images()) or "none"
            raise ContainerError(f"unknown image {image!r} (images in {self._images}: {have})")
        d = self._images / image
        try:
            text = (d / "config").read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ContainerError(f"image {image!r}: cannot read config: {e}") from None
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        try:
            argv = shlex.split(" ".join(lines))
        except ValueError as e:
            raise ContainerError(f"image {image!r}: bad config: {e}") from None
        if not argv:
            raise ContainerError(f"image {image!r}: config has no command")
        rootfs = d / "rootfs"
        return argv, (rootfs if rootfs.is_dir() else d).resolve()

    def _ended(self, c: Container, notify: bool) -> None:
        """A container reached its final state: counted (while the node runs), and told."""
        if notify and self.on_end is not None:
            try:
                self.on_end(c.state)
            except Exception:
                log.exception("on_end failed for container %s", c.id)
        if notify:
            self._notify(c)

    def _notify(self, c: Container) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(c)
        except Exception:
            log.exception("on_change failed for container %s", c.id)

    def _spawn_task(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A copy of a run's labels; ContainerError if one is malformed or there are too many.

    A value is one word of printable characters, so its ``label.KEY VALUE``
    status line reads back exactly.
    """
    if len(labels) > MAX_LABELS:
        raise ContainerError(f"too many labels: {len(labels)} (at most {MAX_LABELS})")
    for k, v in labels.items():
        if not isinstance(k, str) or not LABEL_KEY.fullmatch(k):
            raise ContainerError(f"bad label key {k!r}: letters, digits, '.', '_', '/' and '-', "
                                 f"at most 63, starting with a letter or digit")
        if not isinstance(v, str) or not 0 < len(v) <= MAX_LABEL_VALUE or not v.isprintable() \
                or any(ch.isspace() for ch in v):
            raise ContainerError(f"bad value {v!r} of label {k}: one word of printable characters, "
                                 f"at most {MAX_LABEL_VALUE}")
    return dict(labels)


def check_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of a run's own environment variables; ContainerError if one cannot be passed
    (the rules: fornax_sched.environ)."""
    why = env_problem(env)
    if why is not None:
        raise ContainerError(why)
    return dict(env)


def _check_limits(limits: Limits) -> None:
    mem, cpus = limits.mem, limits.cpus
    if mem is not None:
        if not isinstance(mem, int) or isinstance(mem, bool) or mem < MIN_MEM:
            shown = format_size(mem) if isinstance(mem, int) else str(mem)
            raise ContainerError(f"bad memory limit {shown!r}: want at least 1M")
    if cpus is not None:
        ok = isinstance(cpus, int | float) and not isinstance(cpus, bool) and math.isfinite(cpus)
        if not ok or not 0.01 <= cpus <= 1024:
            raise ContainerError(f"bad cpu limit {str(cpus)!r}: want a number of CPUs from 0.01, such as 0.5 or 2")


def _resolve(cmd: str, cwd: Path, path: str, image: str) -> str:
    """Absolute path of the command (posix_spawn does no PATH search); ContainerError if none."""
    if "/" in cmd:
        p = os.path.join(cwd, cmd)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    else:
        found = shutil.which(cmd, path=path)
        if found:
            return os.path.abspath(found)
    raise ContainerError(f"image {image!r}: command {cmd!r} not found")


def _int(s: str) -> int | None:
    return int(s) if s.isdigit() else None


def _rss_by_group(pgids: set[int]) -> int:
    """Sum of RSS of every process whose process group is one of pgids (no cgroup to ask)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            rest = data[data.rindex(b")") + 2:].split()
            if int(rest[2]) in pgids:
                total += int(rest[21]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total
