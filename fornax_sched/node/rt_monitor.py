"""The per-container monitor, and the small fork server that makes monitors.

Why a monitor and not the daemon itself as the parent of the container: the
daemon may be ``kill -9``ed; a container whose parent dies can no longer be
waited for by anyone who cares, and its output pipe has no reader.  The
monitor is the container's parent and the only reader of its output, in a
session of its own, so it survives the daemon; it writes what the daemon
needs into the container's state directory:

``pids``  monitor and container pid with their /proc start times (identity
          checks against pid reuse), written once the container exists;
``log``   the container's stdout+stderr, kept at most ``log_limit`` bytes (the
          monitor is the only writer, so it trims by rewrite + rename);
``exit``  the exit status (code or signal, time, OOM), written atomically
          just before the monitor exits.

Why monitors are not forked from the daemon directly: a forked monitor
shares the daemon's pages copy-on-write, and a busy Python daemon dirties
its heap constantly, so each monitor soon owns a private copy of the whole
daemon (measured: ~30 MB per monitor), and every daemon write after a fork
pays a page fault.  So the runtime forks, once at start, a *fork server*
(``Forker``): a copy of the daemon that then sits idle, never touching its
heap.  Monitors are forked from it and share its pages for good (measured:
~1.7 MB of its own per monitor), and the daemon itself never forks again.

Server and monitors run straight after ``os.fork()``: no asyncio, no
imports, no return into the interpreter's normal flow (they end with
``os._exit``).  The server's first act is to close every descriptor it
inherited, so the daemon's listening sockets never stay open in it or in
any monitor (the runtime also makes it before the daemon listens).

Wire protocol (private, both ends are this module): the daemon sends one
SOCK_SEQPACKET message per container on its control socket, the Spec as
JSON, with one end of a fresh socketpair as SCM_RIGHTS.  The server keeps a
*spare* monitor, forked and cut loose in advance, blocked reading that
socket, so a request costs no fork; the monitor answers on the socketpair
with "OK <pid> <pid_start> <monitor> <monitor_start>" (or
"ERR <monitor> <message>") and a pidfd of itself, so the daemon can watch it
without a pid-reuse race.  The daemon closing its control socket (or dying)
ends the server; monitors it leaves running are reparented to init.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import json
import os
import resource
import select
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from . import rt_cgroup

_PR_SET_CHILD_SUBREAPER = 36
_MEMORY_WORDS = (b"memoryerror", b"cannot allocate memory", b"out of memory", b"bad_alloc",
                 b"memory exhausted", b"failed to allocate", b"allocation failed")
# Signals the daemon (Python, asyncio) may have ignored or caught: ignored ones
# would stay ignored across exec, so the container gets them back at default.
_SIGDEF = frozenset(s for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGTSTP,
                                signal.SIGTTIN, signal.SIGTTOU, signal.SIGALRM))
_DAEMON_CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                  signal.SIGALRM, signal.SIGCHLD, signal.SIGWINCH)
MAX_SPEC = 1 << 20  # bytes of one request (the environment is most of it)
DRAIN = 0.5  # seconds to collect output still in flight after the container is gone

# Looked up once here, in the daemon: a symbol lookup in every monitor costs ~0.1 ms.
_prctl: Any
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - no libc symbol table
    _prctl = None


@dataclass
class Spec:
    """Everything a monitor needs, computed by the daemon (sent to the fork server as JSON)."""

    cid: str
    path: str  # absolute executable
    argv: list[str]
    env: dict[str, str]
    cwd: str
    dir: str  # <state>/containers/<id>
    log_limit: int
    cgroup_kind: str  # "cgroup1" | "cgroup2" | "" (no groups)
    groups: list[str] = field(default_factory=list)
    join: list[str] = field(default_factory=list)  # cgroup.procs files to put the container in
    rlimit_mem: int | None = None  # RLIMIT_DATA for the rlimit backend
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------ helpers shared with the daemon
def proc_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_state(pid: int) -> str | None:
    """The one-letter state of a process ("Z" for a zombie), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[0].decode()
    except (OSError, ValueError, IndexError):
        return None


def atomic_write(path: str, data: bytes) -> None:
    """Write a whole file so readers see the old or the new content, never a part."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ------------------------------------------------------------ the bounded log
class _Log:
    """Appends output to <dir>/log; past the limit keeps the newest 3/4 of it."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.size = os.fstat(self.fd).st_size
        self.tail = b""  # the last few KiB, for recognising an out-of-memory death

    def append(self, data: bytes) -> None:
        self.tail = (self.tail + data)[-4096:]
        if self.limit <= 0:
            return
        if self.size + len(data) <= self.limit:
            _write_all(self.fd, data)
            self.size += len(data)
            return
        # Trim to 3/4 so the rewrite (cost ~ limit) happens once per limit/4
        # bytes of output, not on every write.
        keep = max(self.limit * 3 // 4, 1)
        if len(data) >= keep:
            out = data[-keep:]
        else:
            need = keep - len(data)
            with open(self.path, "rb") as f:
                f.seek(max(self.size - need, 0))
                out = f.read(need) + data
        nl = out.find(b"\n", 0, len(out) // 8)  # start at a line when one begins near the cut
        if nl >= 0:
            out = out[nl + 1:]
        atomic_write(self.path, out)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.size = len(out)


# ------------------------------------------------------------ the monitor
def _spare() -> NoReturn:
    """A monitor-to-be, forked ahead by the fork server: takes one request off the control socket.

    Runs with fd 3 = control socket, fd 4 = the server's notice pipe.  Why
    ahead of time: forking the server (~1 ms) and cutting loose from it are
    then done before run() asks, not while it waits.
    """
    code = 1
    spec: Spec | None = None
    try:
        os.setsid()
        _subreaper()
        ctl = socket.socket(fileno=3)
        msg, fds, flags, _ = socket.recv_fds(ctl, MAX_SPEC, 4)
        try:
            os.write(4, b"T" if msg or fds else b"E")  # taken (make the next spare) / the daemon is gone
        except OSError:
            pass
        os.close(ctl.detach())
        os.close(4)
        if fds and msg and not flags & socket.MSG_TRUNC:
            spec = Spec(**json.loads(msg))
            os.dup2(fds[0], 3, inheritable=False)  # the report socket
        for fd in fds:
            os.close(fd)
        if spec is not None:
            _monitor(spec)
        code = 0
    except BaseException as e:  # nothing may unwind into the daemon's code
        if spec is not None:
            try:
                with open(spec.dir + "/log", "ab") as f:
                    f.write(f"fornax: monitor error: {e!r}\n".encode())
            except BaseException:
                pass
    finally:
        os._exit(code)


def _detach_from_daemon(keep: list[int]) -> None:
    """Own session, default signals, and no descriptor of the daemon but keep (moved to fds 3, 4, ...)."""
    gc.disable()  # a finalizer of a daemon object could close one of our fds by number
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for s in _DAEMON_CAUGHT:  # Python-level handlers would run daemon code here
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    os.setsid()
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in keep]
    nul = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(nul, fd)
    for i, fd in enumerate(moved):
        os.dup2(fd, 3 + i, inheritable=False)
    os.closerange(3 + len(keep), max(os.sysconf("SC_OPEN_MAX"), 1 << 16))


def _subreaper() -> None:
    if _prctl is not None:
        # Orphans of the container become our children, so we reap them
        # (init may reap lazily, and a zombie still answers kill(pid, 0)).
        _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _report(text: str) -> None:
    """One message to the daemon, with a pidfd of this monitor; then the socket is closed."""
    try:
        sock = socket.socket(fileno=3)
    except OSError:
        return
    me = os.pidfd_open(os.getpid())
    try:
        socket.send_fds(sock, [text.encode()], [me])
    except OSError:  # the daemon is gone: a restarted one reads the pids file instead
        pass
    finally:
        os.close(me)
        sock.close()


def _spawn(spec: Spec, out_w: int) -> int:
    """Start the container in its own session with output to out_w; OSError if it cannot exec."""
    if spec.rlimit_mem is None:
        # vfork+exec inside glibc: ~0.2 ms, and no Python runs in the child.
        return os.posix_spawn(spec.path, spec.argv, spec.env,
                              file_actions=[(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, out_w, 2)],
                              setsid=True, setsigdef=_SIGDEF, setsigmask=())
    # posix_spawn cannot set an rlimit in the child only (lowering ours would
    # fail the spawn's own stack allocation), so fork and exec by hand.
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
            lim = spec.rlimit_mem if hard == resource.RLIM_INFINITY else min(spec.rlimit_mem, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            for s in _SIGDEF:
                signal.signal(s, signal.SIG_DFL)
            os.execve(spec.path, spec.argv, spec.env)
        except BaseException as e:
            try:
                os.write(err_w, str(getattr(e, "errno", 0) or 0).encode())
            finally:
                os._exit(127)
    os.close(err_w)
    err = os.read(err_r, 64)
    os.close(err_r)
    if err:
        os.waitpid(pid, 0)
        n = int(err or b"0")
        raise OSError(n, os.strerror(n) if n else "exec failed", spec.path)
    return pid


def _monitor(spec: Spec) -> None:
    """Start the container, report to the daemon (fd 3), copy its output, record its end."""
    me = os.getpid()
    log = _Log(spec.dir + "/log", spec.log_limit)
    for n in spec.notes:
        log.append(f"fornax: {n}\n".encode())
    out_r, out_w = os.pipe()
    os.chdir(spec.cwd)
    try:
        pid = _spawn(spec, out_w)
    except OSError as e:
        what = e.strerror or str(e)
        msg = f"cannot start {spec.argv[0]}: {what}"
        log.append(f"fornax: {msg}\n".encode())
        rt_cgroup.remove(spec.groups)
        atomic_write(spec.dir + "/exit", json.dumps({"error": msg, "time": time.time()}).encode())
        _report(f"ERR {me} {msg}")
        return
    if spec.join:
        # Frozen right after exec, before it can allocate much, and put in its
        # groups below, after the report: a cgroup migration waits for an RCU
        # grace period (~10 ms after a quiet spell), which run() must not pay.
        os.kill(pid, signal.SIGSTOP)
    os.close(out_w)
    pid_start = proc_start(pid)
    me_start = proc_start(me)
    _report(f"OK {pid} {pid_start} {me} {me_start}")  # first: the daemon's run() is waiting for it
    join_error = None
    if spec.join:
        try:
            for p in spec.join:
                rt_cgroup.write_text(p, str(pid))
        except ProcessLookupError:
            pass  # it is already dead; its exit is what counts
        except OSError as e:
            join_error = f"cannot apply limits: {e.strerror or e}"
            log.append(f"fornax: {join_error}\n".encode())
            os.kill(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGCONT)
    atomic_write(spec.dir + "/pids", json.dumps({"monitor": me, "monitor_start": me_start, "pid": pid,
                                                 "pid_start": pid_start, "started": time.time()}).encode())

    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    out_open = True
    while True:
        events = poller.poll(5000)
        _reap_orphans(pid)
        if not events:
            continue
        if any(fd == pidfd for fd, _ in events):
            break
        data = os.read(out_r, 65536)
        if data:
            log.append(data)
        else:  # the container closed its output but runs on
            poller.unregister(out_r)
            out_open = False

    # The leader is a zombie (not reaped yet), so its pid, which is also the
    # group id, cannot be reused while we kill what is left of its group.
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    rt_cgroup.kill_all(spec.groups)
    _, status = os.waitpid(pid, 0)
    finished = time.time()
    deadline = time.monotonic() + DRAIN
    while out_open:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([out_r], [], [], left)[0]:
            break
        data = os.read(out_r, 65536)
        if not data:
            break
        log.append(data)
    _reap_orphans(None, wait=0.2)  # the group members just killed

    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    if spec.cgroup_kind:
        oom = rt_cgroup.oom_killed(spec.cgroup_kind, spec.groups)
    else:
        # An rlimit makes allocations fail instead of killing: recognise the
        # usual last words of a program that ran out of memory.
        low = log.tail.lower()
        failed = (code is not None and code != 0) or sig in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS)
        oom = spec.rlimit_mem is not None and failed and any(w in low for w in _MEMORY_WORDS)
    rt_cgroup.remove(spec.groups)
    atomic_write(spec.dir + "/exit", json.dumps({"code": code, "signal": sig, "time": finished,
                                                 "oom": oom, "error": join_error}).encode())


def _reap_orphans(leader: int | None, wait: float = 0.0) -> None:
    """Reap exited orphans we adopted as subreaper, but never the leader (that is done on purpose).

    With wait, keep at it that long while children remain (they were just
    SIGKILLed); one that escaped the kill is left to init when we exit.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.002)
            continue
        if info.si_pid == leader:
            return
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            return


# ------------------------------------------------------------ the fork server
class Forker:
    """The daemon's handle on its fork server (see the module docstring)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self._ctl: socket.socket | None = None

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _serve(theirs.fileno())
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.pid, self._ctl = pid, ours

    def submit(self, spec: Spec) -> socket.socket:
        """Ask for a monitor for spec; the returned socket gets its report."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            msg = json.dumps(asdict(spec)).encode()
            if len(msg) >= MAX_SPEC:
                raise OSError(errno.E2BIG, "environment and arguments too large")
            for attempt in (1, 2):
                try:
                    if self._ctl is None:
                        raise BrokenPipeError
                    socket.send_fds(self._ctl, [msg], [theirs.fileno()])
                    break
                except (BrokenPipeError, ConnectionResetError):
                    if attempt == 2:
                        raise
                    self.close()  # the server died (killed by someone?): make a new one
                    self.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours

    def close(self, wait: float = 2.0) -> None:
        """End the server (it reaps its exited monitors first; live ones go on)."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        deadline = time.monotonic() + wait
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.001)


def _serve(ctl_fd: int) -> None:
    """The fork server's loop: keep one spare monitor waiting on the control socket, reap monitors.

    The server never reads the control socket itself (the spare does), but
    holds it open so the daemon can queue requests while the next spare is
    being forked.  A spare that reads EOF (the daemon closed it, or died)
    says so, and the server ends; live monitors then belong to init.
    """
    note_r, note_w = os.pipe()
    _detach_from_daemon([ctl_fd, note_w, note_r])  # -> 3, 4, 5
    gc.freeze()  # (gc is off; keep our heap untouched so monitors share its pages)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:  # one pidfd per live monitor
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    poller = select.poll()
    poller.register(5, select.POLLIN)
    spare: tuple[int, int] | None = None  # (pid, pidfd) of the monitor-to-be
    while True:
        if spare is None:
            pid = os.fork()
            if pid == 0:
                os.closerange(5, max(os.sysconf("SC_OPEN_MAX"), 1 << 16))  # our pipe end and pidfds
                _spare()
            pfd = os.pidfd_open(pid)
            poller.register(pfd, select.POLLIN)
            spare = (pid, pfd)
        for fd, _ in poller.poll(5000):  # (the timeout reaps a monitor whose pidfd could not be had)
            if fd == 5:
                note = os.read(5, 64)
                if b"E" in note or not note:
                    if spare is not None:
                        try:
                            os.waitpid(spare[0], 0)  # it is ending too
                        except ChildProcessError:
                            pass
                    _reap_all()
                    return
                spare = None  # taken: it is a monitor now
            else:
                poller.unregister(fd)
                os.close(fd)
                if spare is not None and fd == spare[1]:
                    spare = None  # died before taking anything (killed?): make another
        _reap_all()


def _reap_all() -> None:
    """Reap every exited child, without waiting."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
