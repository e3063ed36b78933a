"""Limit backends for the container runtime: cgroup v2, cgroup v1 or rlimits.

Why a module of its own: the same few file operations run in two places, the
daemon (create a group, read usage) and the per-container monitor (sweep the
group, read the OOM counter, remove the group), and the monitor is a forked
process that must not touch asyncio.  Everything here is plain blocking file
I/O on cgroupfs, which costs tens of microseconds.

Where groups live: under the cgroup the daemon itself runs in, in a per-node
parent ``fornax-<node>-<hash of the state dir>`` with one child ``<id>`` per
container.  Nesting under our own cgroup (not the hierarchy root) keeps the
containers inside whatever the daemon was given (a systemd delegation, a
sandbox's limits).  cgroup v2 needs memory (and cpu) enabled for our
children, which the "no internal processes" rule allows only when the daemon
sits in the root group; in a delegated non-root group the daemon would first
have to move itself to a leaf, which it does not do (then: v1, else rlimits).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from dataclasses import dataclass, field

PERIOD_US = 100_000  # the CFS period we give every container with a cpu limit

BACKENDS = ("auto", "cgroup2", "cgroup1", "rlimit")


class BackendError(Exception):
    """A requested backend cannot be used here; the message says why."""


@dataclass
class Backend:
    """Where and how this node limits containers."""

    kind: str  # "cgroup2" | "cgroup1" | "rlimit"
    mem_parent: str | None = None  # the fornax-<node> group of the memory controller
    cpu_parent: str | None = None  # None: cpu rate cannot be limited
    why: str = ""  # why this backend was chosen, for the log

    @property
    def is_cgroup(self) -> bool:
        return self.kind in ("cgroup1", "cgroup2")


@dataclass
class Groups:
    """The groups made for one container, and how the monitor enters them."""

    dirs: list[str] = field(default_factory=list)  # memory group first
    join: list[str] = field(default_factory=list)  # cgroup.procs files the container is written to
    notes: list[str] = field(default_factory=list)  # limits that could not be applied


# ------------------------------------------------------------ small file helpers
def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    # One write() call: cgroupfs acts on each write separately.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _keyed(path: str) -> dict[str, int]:
    """A 'key value' counter file (memory.events, memory.oom_control, memory.stat)."""
    out: dict[str, int] = {}
    try:
        for line in read_text(path).splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


# ------------------------------------------------------------ detection
def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of every cgroup mount."""
    out: list[tuple[str, str, str, set[str]]] = []
    try:
        lines = read_text("/proc/self/mountinfo").splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 5 or len(r) < 3 or r[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((r[0], _unescape(f[3]), _unescape(f[4]), set(r[2].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    try:
        lines = read_text("/proc/self/cgroup").splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            out[""] = parts[2]
        for c in parts[1].split(","):
            if c:
                out[c] = parts[2]
    return out


def _join_path(mountpoint: str, mount_root: str, cg: str) -> str:
    rel = cg
    if mount_root != "/" and (cg == mount_root or cg.startswith(mount_root + "/")):
        rel = cg[len(mount_root):]
    return os.path.normpath(mountpoint + "/" + rel.lstrip("/"))


def parent_name(node: str, state: str) -> str:
    """The per-node parent group: fornax-<node>-<hash of the state dir>.

    The hash keeps two daemons with the same node name on one machine (two
    test runs, say) apart: a daemon sweeps stale groups under its parent at
    start, and must never sweep another's live containers.
    """
    tag = hashlib.sha1(os.path.realpath(state).encode()).hexdigest()[:8]
    return f"fornax-{re.sub(r'[^A-Za-z0-9_.-]', '_', node) or 'node'}-{tag}"


def _try_v2(name: str) -> Backend:
    mnt = next(((root, mp) for t, root, mp, _ in _mounts() if t == "cgroup2"), None)
    own = _own_paths().get("")
    if mnt is None or own is None:
        raise BackendError("no cgroup2 mount")
    home = _join_path(mnt[1], mnt[0], own)
    try:
        controllers = set(read_text(home + "/cgroup.controllers").split())
    except OSError as e:
        raise BackendError(f"cannot read {home}/cgroup.controllers: {e.strerror}") from None
    if "memory" not in controllers:
        raise BackendError(f"the memory controller is not enabled in {home}")
    want = ["memory"] + (["cpu"] if "cpu" in controllers else [])
    parent = home + "/" + name
    try:
        enabled = set(read_text(home + "/cgroup.subtree_control").split())
        for c in want:
            if c not in enabled:
                # Fails (EBUSY) in a non-root group that holds processes: the
                # "no internal processes" rule; then cgroup2 is not for us.
                write_text(home + "/cgroup.subtree_control", "+" + c)
        os.makedirs(parent, exist_ok=True)
        write_text(parent + "/cgroup.subtree_control", " ".join("+" + c for c in want))
    except OSError as e:
        raise BackendError(f"cannot delegate {' '.join(want)} under {home}: {e.strerror}") from None
    cpu = parent if "cpu" in want else None
    return Backend("cgroup2", parent, cpu, f"cgroup2 under {parent}")


def _try_v1(name: str) -> Backend:
    own = _own_paths()
    found: dict[str, str] = {}  # controller -> parent
    errors = []
    for t, root, mp, opts in _mounts():
        if t != "cgroup":
            continue
        for ctrl in ("memory", "cpu"):
            if ctrl in opts and ctrl not in found and ctrl in own:
                home = _join_path(mp, root, own[ctrl])
                parent = home + "/" + name
                try:
                    os.makedirs(parent, exist_ok=True)
                    if not os.access(parent + "/cgroup.procs", os.W_OK):
                        raise PermissionError(13, "Permission denied")
                    found[ctrl] = parent
                except OSError as e:
                    errors.append(f"{ctrl}: cannot create {parent}: {e.strerror}")
    if "memory" not in found:
        raise BackendError("; ".join(errors) or "no cgroup v1 memory controller mounted")
    return Backend("cgroup1", found["memory"], found.get("cpu"), f"cgroup1 under {found['memory']}")


def detect(name: str, want: str = "auto") -> Backend:
    """The backend to use: the wanted one (BackendError if unusable) or, for auto, the best usable.

    name is the per-node parent group (parent_name); it is created if missing.
    """
    if want not in BACKENDS:
        raise BackendError(f"unknown limits backend {want!r}: want one of {', '.join(BACKENDS)}")
    if want == "rlimit":
        return Backend("rlimit", why="rlimit backend requested")
    tries = {"cgroup2": _try_v2, "cgroup1": _try_v1}
    if want != "auto":
        return tries[want](name)
    reasons = []
    for kind, fn in tries.items():
        try:
            return fn(name)
        except BackendError as e:
            reasons.append(f"{kind}: {e}")
    return Backend("rlimit", why="no writable cgroup (" + "; ".join(reasons) + "), using rlimits")


# ------------------------------------------------------------ per-container groups
def create(b: Backend, cid: str, mem: int | None, cpus: float | None) -> Groups:
    """Make the container's groups and write its limits; undo everything on error (OSError).

    The daemon does this before the monitor exists (~0.1 ms), so a limit the
    kernel refuses is an error of run() and nothing is left behind.
    """
    g = Groups()
    if not b.is_cgroup:
        if cpus is not None:
            g.notes.append(f"cpu limit {cpus:g} not enforced: the rlimit backend cannot limit cpu rate")
        return g
    assert b.mem_parent is not None
    try:
        d = _mkgroup(b.mem_parent + "/" + cid)
        g.dirs.append(d)
        g.join.append(d + "/cgroup.procs")
        if b.kind == "cgroup1":
            if mem is not None:
                write_text(d + "/memory.limit_in_bytes", str(mem))
                _optional(d + "/memory.memsw.limit_in_bytes", str(mem))  # no swapping past the limit
            if cpus is not None and b.cpu_parent is not None:
                c = _mkgroup(b.cpu_parent + "/" + cid)
                g.dirs.append(c)
                g.join.append(c + "/cgroup.procs")
                write_text(c + "/cpu.cfs_period_us", str(PERIOD_US))
                write_text(c + "/cpu.cfs_quota_us", str(max(int(cpus * PERIOD_US), 1000)))
        else:
            if mem is not None:
                write_text(d + "/memory.max", str(mem))
                _optional(d + "/memory.swap.max", "0")
            _optional(d + "/memory.oom.group", "1")  # an OOM kill takes the whole container
            if cpus is not None and b.cpu_parent is not None:
                write_text(d + "/cpu.max", f"{max(int(cpus * PERIOD_US), 1000)} {PERIOD_US}")
        if cpus is not None and b.cpu_parent is None:
            g.notes.append(f"cpu limit {cpus:g} not enforced: no writable cpu controller")
    except OSError:
        remove(g.dirs, wait=0)
        raise
    return g


def _mkgroup(path: str) -> str:
    try:
        os.mkdir(path)
    except FileExistsError:
        # A stale group of a container that was lost with its monitor.
        kill_all([path])
        remove([path])
        os.mkdir(path)
    return path


def _optional(path: str, value: str) -> None:
    try:
        write_text(path, value)
    except OSError:
        pass


def procs(d: str) -> list[int]:
    try:
        return [int(x) for x in read_text(d + "/cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def kill_all(dirs: list[str], wait: float = 0.5) -> None:
    """SIGKILL every process in the groups (they may have left the process group)."""
    for d in dirs:
        if os.path.exists(d + "/cgroup.kill"):
            _optional(d + "/cgroup.kill", "1")
        deadline = time.monotonic() + wait
        while True:
            pids = procs(d)
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.002)


def remove(dirs: list[str], wait: float = 0.5) -> None:
    """rmdir the groups; a just-killed task can keep one busy for a moment."""
    deadline = time.monotonic() + wait
    for d in reversed(dirs):
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)


def oom_killed(kind: str, dirs: list[str]) -> bool:
    """Did the kernel OOM-kill a process of this container (its memory group is dirs[0])?"""
    if not dirs:
        return False
    d = dirs[0]
    if kind == "cgroup2":
        ev = _keyed(d + "/memory.events")
        return ev.get("oom_kill", 0) > 0 or ev.get("oom_group_kill", 0) > 0
    ctl = _keyed(d + "/memory.oom_control")
    if "oom_kill" in ctl:
        return ctl["oom_kill"] > 0
    return _keyed_single(d + "/memory.failcnt") > 0  # kernels before 4.13 have no oom_kill counter


def _keyed_single(path: str) -> int:
    try:
        return int(read_text(path).strip())
    except (OSError, ValueError):
        return 0


def mem_usage(kind: str, dirs: list[str]) -> int | None:
    """Memory charged to the container's group (page cache included), None if it has no group.

    The charge counter, not memory.stat: the kernel refreshes those
    statistics lazily (every ~2 s), the counter is exact.
    """
    if not dirs:
        return None
    return _keyed_single(dirs[0] + ("/memory.current" if kind == "cgroup2" else "/memory.usage_in_bytes"))


def sweep(b: Backend, keep: set[str]) -> None:
    """Remove groups of this node whose container is not running (left by lost monitors)."""
    for parent in {b.mem_parent, b.cpu_parent}:
        if not parent:
            continue
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for n in names:
            d = parent + "/" + n
            if n.isdigit() and n not in keep and os.path.isdir(d):
                kill_all([d])
                remove([d])


def remove_parents(b: Backend) -> None:
    """On clean shutdown: drop the empty fornax-<node> groups."""
    for parent in {b.mem_parent, b.cpu_parent}:
        if parent:
            try:
                os.rmdir(parent)
            except OSError:
                pass
