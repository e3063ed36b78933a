"""``fornax-sched up``: the whole system on one machine, on loopback, in the foreground (up(1)).

The scheduler and each node run as processes of their own (so one can be
killed and restarted like a real machine), each in its own process group,
so that a Ctrl-C reaches this process alone and it stops them in order:
the scheduler first (so it does not see the nodes go as deaths), then the
nodes, which stop their containers.

With ``--store etcd`` it also starts one etcd member (Debian's etcd-server)
and two scheduler replicas on it, one leading; etcd starts first and stops
last.

Before starting anything it makes sure nothing else holds what it needs
(its state, its ports) and names the holder; it prints "is up" only once
the scheduler's own files say every node is online.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import exitcodes as X

REPO_IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
IN_USE = X.IN_USE


def add_parser(sub: Any) -> None:
    up = sub.add_parser("up", help="start the local system in the foreground",
                        description="Start the cluster on this machine, on loopback, and print how to talk to it "
                                    "once every node is online; Ctrl-C stops it all.")
    up.add_argument("--nodes", type=int, default=3, help="how many fornax-nodes (default %(default)s)")
    up.add_argument("--images", type=Path, default=None, help="images directory (default: examples/images)")
    up.add_argument("--state", type=Path, default=None, help="state directory (default ~/.local/state/fornax-sched/up)")
    up.add_argument("--fresh", action="store_true",
                    help="start with empty state: the scheduler's store and the nodes' records are put aside")
    up.add_argument("--port", type=int, default=5640,
                    help="the scheduler listens on 9P port PORT, node N on PORT+N (default %(default)s)")
    up.add_argument("--gossip", type=int, default=9710, help="node N gossips on port GOSSIP+N (default %(default)s)")
    up.add_argument("--dead", type=float, default=10.0,
                    help="seconds a node may be unreachable before the scheduler re-places its containers")
    up.add_argument("--restart", type=float, default=20.0,
                    help="seconds before a process that exited is started again (default %(default)s)")
    up.add_argument("--wait", type=float, default=60.0,
                    help="seconds to wait for every node to be online before giving up (default %(default)s)")
    up.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite",
                    help="sqlite: one scheduler on its embedded store (the default); etcd: a local etcd member "
                         "and two scheduler replicas on it, on PORT and PORT+N+1")
    up.add_argument("--etcd-port", type=int, default=2379,
                    help="with --store etcd: etcd's client port (its peer port is the next; default %(default)s)")
    up.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if not 1 <= a.nodes <= 99:
        return _usage("--nodes: want 1 to 99")
    if not 1 <= a.port <= 65535 - a.nodes or not 1 <= a.gossip <= 65535 - a.nodes:
        return _usage(f"--port and --gossip: want 1 to {65535 - a.nodes} (node N takes PORT+N)")
    if a.dead <= 0 or a.restart < 0 or a.wait <= 0:
        return _usage("--dead and --wait: want seconds above 0; --restart: 0 or more")
    if a.store == "etcd" and not 1 <= a.etcd_port <= 65534:
        return _usage("--etcd-port: want 1 to 65534 (the peer port is the next)")
    if a.store == "etcd" and a.port + a.nodes + 1 > 65535:
        return _usage(f"--port: want at most {65535 - a.nodes - 1} with --store etcd (the second replica's port)")
    return up(a.nodes, a.images, a.state, a.port, a.gossip, a.dead, a.restart, fresh=a.fresh, wait=a.wait,
              store=a.store, etcd_port=a.etcd_port)


def _usage(why: str) -> int:
    print(f"fornax-sched up: {why}", file=sys.stderr)
    return X.USAGE


def say(text: str) -> None:
    print(f"fornax-sched up: {text}", file=sys.stderr, flush=True)


def default_state() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fornax-sched" / "up"


def node_cmd(i: int, nodes: int, images: Path, state: Path, port: int, gossip: int) -> list[str]:
    peers = ",".join(f"127.0.0.1:{gossip + j}" for j in range(1, nodes + 1) if j != i)
    return [sys.executable, "-m", "fornax_sched.node.cli", "serve", "--name", f"fornax-{i:02d}",
            "--listen", f"tcp!127.0.0.1!{port + i}", "--images", str(images),
            "--state", str(state / f"fornax-{i:02d}"), "--gossip", f"127.0.0.1:{gossip + i}",
            "--peers", peers, "--broadcast", "off"]


FIRST_HTTP = "127.0.0.1:8084"  # serve's default HTTP (sched/serve.py), which replica 1 keeps
SECOND_HTTP = 8086  # replica 2's HTTP (and, one up, its AgentControl): replica 1 has serve's 8084 and 8085
TOKENS = "http-tokens"  # in up's state: the web page's token, the same across restarts and replicas


def sched_cmd(state: Path, port: int, dead: float, fresh: bool = False, store: str = "", node: int = 0,
              name: str = "scheduler", http: str = "", control: str = "") -> list[str]:
    """serve's command line; ``http`` and ``control`` (HOST:PORT) replace serve's defaults, which a
    second replica on the same machine cannot also have."""
    web_token(state)  # (made now if need be: the scheduler reads it as it starts)
    return [sys.executable, "-m", "fornax_sched", "serve", "--listen", f"tcp!127.0.0.1!{port}",
            "--state", str(state / name), "--node", f"tcp!127.0.0.1!{node or port + 1}", "--dead", f"{dead:g}",
            "--http-token-file", str(state / TOKENS),
            *(["--http", http] if http else []), *(["--control", control] if control else []),
            *(["--store", store] if store else []), *(["--fresh"] if fresh else [])]


def web_token(state: Path) -> str:
    """The web page's token: made once (0600) in up's state, so that a restart keeps the open pages working."""
    import secrets

    path = state / TOKENS
    try:
        for line in path.read_text().splitlines():
            if line.split("#", 1)[0].strip():
                return line.split()[0]
    except (OSError, UnicodeDecodeError):
        pass
    token = secrets.token_urlsafe(24)
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{token}\n")
    return token


def web_page(addr: str, token: str, timeout: float = 2.0) -> str:
    """Where the scheduler serves its page (what its log says), with the token; or why it does not."""
    from .fs.blocking import BlockingClient
    from .fs.errors import P9Error

    try:
        with BlockingClient.connect(addr, version="9P2000.u", timeout=timeout) as c:
            log = c.read_file("cluster/scheduler/log").decode(errors="replace")
    except (ConnectionError, TimeoutError, P9Error) as e:
        return f"unknown (the scheduler's log cannot be read: {e})"
    for line in reversed(log.splitlines()):
        if " HTTP on http://" in line:
            return line.split(" HTTP on ", 1)[1].split(" ", 1)[0] + f"#token={token}"
        if " HTTP not served: " in line:
            return "not served: " + line.split(" HTTP not served: ", 1)[1]
    return "not served (--http off)"


def etcd_cmd(state: Path, client: int) -> list[str]:
    etcd = shutil.which("etcd") or "etcd"
    peer = f"http://127.0.0.1:{client + 1}"
    return [etcd, "--name", "up", "--data-dir", str(state / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"up={peer}",
            "--logger", "zap", "--log-level", "error"]


# ---------------------------------------------------------------- who holds what

@dataclass
class Daemon:
    name: str  # "the scheduler", "fornax-01"
    cmd: list[str]
    tcp: int  # its 9P port
    udp: int | None = None  # its gossip port
    pidfile: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None  # exited: when to start it again
    runs: int = 0
    role: str = "node"  # "scheduler", "node", "store": schedulers stop first, the store last
    http: str = ""  # a replica's HTTP, as the banner says it (one scheduler: the web page's line says it)

    def __post_init__(self) -> None:
        if self.pidfile is None and self.role == "node":
            self.role = "scheduler"


def _socket_inodes(port: int, proto: str) -> set[str]:
    """Inodes of the sockets bound to ``port`` (TCP: listening), from /proc/net."""
    inodes = set()
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and int(f[1].rpartition(":")[2], 16) == port and (proto == "udp" or f[3] == "0A"):
                inodes.add(f[9])
    return inodes


def holders(port: int, proto: str = "tcp") -> list[str]:
    """``pid N (command line)`` of each process holding ``port``, as far as /proc shows them."""
    inodes = _socket_inodes(port, proto)
    if not inodes:
        return []
    links = {f"socket:[{i}]" for i in inodes}
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in links for fd in (d / "fd").iterdir()):
                found.append(_who(int(d.name)))
        except OSError:  # another user's process, or gone
            continue
    return found


def _who(pid: int) -> str:
    """``pid N (command)``, and the fornax-sched up it belongs to, if one started it."""
    text = f"pid {pid} ({describe(pid)})"
    try:
        ppid = int((Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return text
    parent = describe(ppid, width=200)
    if " up" in parent and "fornax" in parent:
        text += f", started by fornax-sched up pid {ppid}"
    return text


def describe(pid: int, width: int = 70) -> str:
    """A process's command line, shortened: the interpreter by its name, at most ``width`` characters."""
    try:
        words = (Path("/proc") / str(pid) / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    args = [w.decode(errors="replace") for w in words]
    if args:
        args[0] = Path(args[0]).name
    text = " ".join(args)
    return text if len(text) <= width else text[: width - 3] + "..."


def port_taken(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:  # as the daemons bind: a port in TIME_WAIT is not taken
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _http_of(addr: str, taken: bool) -> str:
    """What the banner says of a replica's HTTP at ``addr`` (HOST:PORT): its URL, or that it is taken."""
    return f"not served ({addr} is taken)" if taken else f"http://{addr}/"


def _taken(addr: str) -> bool:
    return port_taken(int(addr.rsplit(":", 1)[1]), socket.SOCK_STREAM)


def held_ports(daemons: list[Daemon]) -> list[str]:
    """One line per port a daemon needs that something holds, naming the holder."""
    out = []
    for d in daemons:
        for port, kind, proto, what in ((d.tcp, socket.SOCK_STREAM, "tcp", "9P"),
                                        (d.udp, socket.SOCK_DGRAM, "udp", "gossip")):
            if port is not None and port_taken(port, kind):
                who = holders(port, proto)
                out.append(f"{proto} port {port} ({what} of {d.name}) is held by "
                           + (", ".join(who) if who else "a process this user cannot see"))
    return out


class StateLock:
    """An flock on STATE/up.lock, naming the up that holds it; the kernel drops it however we end."""

    def __init__(self, state: Path) -> None:
        self.path = state / "up.lock"
        self.file: IO[str] | None = None

    def take(self, about: str) -> str | None:
        """None once held; else who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held for the life of up
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another fornax-sched up"
            f.close()
            return holder
        f.seek(0)
        f.truncate()
        f.write(f"fornax-sched up, pid {os.getpid()}, {about}\n")
        f.flush()
        self.file = f
        return None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ---------------------------------------------------------------- fresh state

def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def recorded_containers(state: Path) -> list[tuple[str, str, int]]:
    """(node, container name, pid) of every container the nodes' records say runs and whose process does."""
    import json

    out = []
    for rec in sorted(state.glob("fornax-*/containers/*/container.json")):
        try:
            c = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        pid = c.get("pid")
        if isinstance(pid, int) and pid > 0 and alive(pid) and _is_container(pid, str(c.get("id", ""))):
            out.append((rec.parents[2].name, str(c.get("name") or c.get("id")), pid))
    return out


def _is_container(pid: int, cid: str) -> bool:
    """Whether ``pid`` is still that container (not a stranger that reuses the number)."""
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return True  # cannot tell: assume it is
    return f"FORNAX_CONTAINER={cid}".encode() in env


def put_aside(state: Path, nodes: list[str]) -> Path | None:
    """Move the nodes' state directories to STATE/replaced-TIME/ (the scheduler's store is put aside by serve)."""
    present = [state / n for n in nodes if (state / n).exists()]
    if not present:
        return None
    stamp = time.strftime("replaced-%Y%m%d-%H%M%S")
    aside, n = state / stamp, 1
    while aside.exists():
        n += 1
        aside = state / f"{stamp}-{n}"
    aside.mkdir(parents=True)
    for p in present:
        p.rename(aside / p.name)
    return aside


# ---------------------------------------------------------------- readiness

def not_online(addr: str, names: list[str], timeout: float = 2.0) -> dict[str, str]:
    """Each node of ``names`` that the scheduler's /cluster/nodes does not show online, with what it shows."""
    from .fs.blocking import BlockingClient
    from .fs.errors import P9Error

    try:
        with BlockingClient.connect(addr, version="9P2000.u", timeout=timeout) as c:
            listed = {e.name for e in c.ls("cluster/nodes")}
            out = {}
            for n in names:
                if n not in listed:
                    out[n] = "not listed"
                    continue
                status = c.read_file(f"cluster/nodes/{n}/status").decode().strip()
                if status.split()[:1] != ["online"]:
                    out[n] = status or "no status"
            return out
    except (ConnectionError, TimeoutError, P9Error) as e:
        return dict.fromkeys(names, f"the scheduler does not answer yet ({e})")


# ---------------------------------------------------------------- up

@dataclass
class Up:
    daemons: list[Daemon]
    state: Path
    stopping: bool = False
    signals: list[str] = field(default_factory=list)

    def start(self, d: Daemon) -> None:
        d.proc = subprocess.Popen(d.cmd, process_group=0)  # Ctrl-C reaches up alone; up stops them in order
        d.runs += 1
        d.restart_at = None

    def exited(self) -> list[Daemon]:
        return [d for d in self.daemons if d.proc is not None and d.proc.poll() is not None]

    def stop_all(self) -> list[str]:
        """Stop every daemon, the scheduler first; say what is stopped; return what is left running."""
        for d in self.daemons:  # a node killed and not yet back still has containers: start it to stop them
            if d.proc is None and d.restart_at is not None and d.pidfile is not None:
                say(f"starting {d.name} again so that it stops its containers")
                self.start(d)
                _wait_pidfile(d)
        order = {"scheduler": 0, "node": 1, "store": 2}
        running = sorted((d for d in self.daemons if d.proc is not None and d.proc.poll() is None),
                         key=lambda d: order[d.role])
        for d in running:
            assert d.proc is not None
            if d.role == "store":  # the store last: the nodes are gone first
                for n in running:
                    if n.role == "node" and n.proc is not None:
                        _wait(n.proc, 30)
            if d.pidfile is not None:  # a node still starting ends cleanly on SIGTERM only once it is ready
                _wait_pidfile(d)
            say(f"stopping {d.name} (pid {d.proc.pid})")
            d.proc.terminate()
            if d.role != "node":  # a scheduler: let it go before the nodes do (the store: at the end)
                _wait(d.proc, 10)
        for d in running:
            assert d.proc is not None
            _wait(d.proc, 30)
        left = [f"{d.name} (pid {d.proc.pid})" for d in self.daemons if d.proc is not None and d.proc.poll() is None]
        left += [f"container {name} of {node} (pid {pid})" for node, name, pid in recorded_containers(self.state)]
        return left


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        say(f"pid {proc.pid} did not stop within {timeout:g}s: killing it")
        proc.kill()
        proc.wait()


def _wait_pidfile(d: Daemon, timeout: float = 15.0) -> None:
    """Wait until a node daemon has written its pid file (it then handles SIGTERM cleanly)."""
    deadline = time.monotonic() + timeout
    while d.proc is not None and time.monotonic() < deadline and d.proc.poll() is None:
        try:
            if d.pidfile is not None and int(d.pidfile.read_text()) == d.proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


def up(nodes: int = 3, images: Path | None = None, state: Path | None = None, port: int = 5640,
       gossip: int = 9710, dead: float = 10.0, restart: float = 20.0, *, fresh: bool = False,
       wait: float = 60.0, store: str = "sqlite", etcd_port: int = 2379) -> int:
    images = images or REPO_IMAGES
    state = state or default_state()
    if not images.is_dir():
        return _usage(f"no images directory at {images} (give --images)")
    sched = f"tcp!127.0.0.1!{port}"
    names = [f"fornax-{i:02d}" for i in range(1, nodes + 1)]
    if store == "etcd":
        if shutil.which("etcd") is None:
            say("--store etcd needs etcd (the Debian package etcd-server: apt-get install etcd-server)")
            return X.REFUSED
        url = f"etcd://127.0.0.1:{etcd_port}/fornax-up?timeout=10"  # (etcd starts beside the replicas)
        second = port + nodes + 1
        # Replica 2 cannot have serve's defaults, which replica 1 takes: it gets the two ports after them,
        # or none if they are taken (a default address that is taken is only a warning, as serve's own).
        web2, control2 = (f"127.0.0.1:{p}" for p in (SECOND_HTTP, SECOND_HTTP + 1))
        taken2 = _taken(web2)
        daemons = [Daemon("scheduler replica 1", sched_cmd(state, port, dead, store=url, node=port + 1,
                                                           name="scheduler-1"), port,
                          http=_http_of(FIRST_HTTP, _taken(FIRST_HTTP))),
                   Daemon("scheduler replica 2", sched_cmd(
                       state, second, dead, store=url, node=port + 1, name="scheduler-2",
                       http="off" if taken2 else web2, control="off" if _taken(control2) else control2),
                          second, http=_http_of(web2, taken2))]
    else:
        daemons = [Daemon("the scheduler", sched_cmd(state, port, dead, fresh), port)]
    daemons += [Daemon(n, node_cmd(i, nodes, images, state, port, gossip), port + i, gossip + i, state / n / "pid")
                for i, n in enumerate(names, 1)]
    if store == "etcd":
        daemons.append(Daemon("etcd", etcd_cmd(state, etcd_port), etcd_port, role="store"))

    lock = StateLock(state)
    holder = lock.take(f"scheduler {sched}")
    if holder is not None:
        say(f"state {state} is in use by {holder}: stop that one first (Ctrl-C in its terminal), "
            "or give another --state")
        return IN_USE
    try:
        held = held_ports(daemons)
        if held:
            for line in held:
                say(line)
            say("nothing started: stop whatever holds them (another fornax-sched up?), "
                "or choose other ports with --port and --gossip")
            return IN_USE
        if fresh:
            still = recorded_containers(state)
            if still:
                say("--fresh would forget containers that still run: " + ", ".join(
                    f"{name} of {node} (pid {pid})" for node, name, pid in still)
                    + "; stop them first, or start without --fresh to adopt them")
                return X.REFUSED
            aside = put_aside(state, names + (["etcd"] if store == "etcd" else []))
            say("starting afresh" + (f": the nodes' old state is in {aside}" if aside else "")
                + ("" if store == "etcd" else
                   "; the scheduler keeps its old store beside the new one (sched.db.replaced-TIME)"))
        return _run(Up(daemons, state), sched, names, state, restart, wait)
    finally:
        lock.release()


def _run(u: Up, sched: str, names: list[str], state: Path, restart: float, wait: float) -> int:
    def stop(signum: int, _frame: object) -> None:
        u.stopping = True
        u.signals.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = _supervise(u, sched, names, state, restart, wait)
        if u.signals:
            say(f"{u.signals[0]}: stopping everything")
        left = u.stop_all()
        if left:
            say("still running: " + ", ".join(left))
            return X.REFUSED
        scheds = [d for d in u.daemons if d.role == "scheduler"]
        say(("stopped the scheduler" if len(scheds) == 1 else f"stopped {len(scheds)} scheduler replicas")
            + (", etcd" if any(d.role == "store" for d in u.daemons) else "")
            + " and " + (f"{len(names)} nodes" if len(names) > 1 else "the node") + "; nothing left running")
        return status
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _supervise(u: Up, sched: str, names: list[str], state: Path, restart: float, wait: float) -> int:
    """Start the daemons, print the banner once all nodes are online, restart what exits; until a signal."""
    token = web_token(state)  # (sched_cmd made it, before the schedulers start)
    for d in sorted(u.daemons, key=lambda d: d.role != "store"):  # the store first
        u.start(d)
    deadline = time.monotonic() + wait
    missing: dict[str, str] = {}
    while not u.stopping:
        if (failed := _failed(u, starting=True)) is not None:
            return failed
        missing = {}
        for d in [d for d in u.daemons if d.role == "scheduler"]:  # (replicas: the leader says)
            missing = not_online(f"tcp!127.0.0.1!{d.tcp}", names)
            if not missing:
                break
        if not missing:
            break
        if time.monotonic() >= deadline:
            say(f"not every node is online after {wait:g}s: "
                + "; ".join(f"{n}: {why}" for n, why in sorted(missing.items())))
            return X.REFUSED
        time.sleep(0.2)
    else:
        return X.INTERRUPTED
    first = next(d for d in u.daemons if d.role == "scheduler")
    print(banner(u.daemons, state, web_page(f"tcp!127.0.0.1!{first.tcp}", token)), flush=True)
    while not u.stopping:
        if (failed := _failed(u, starting=False)) is not None:
            return failed
        now = time.monotonic()
        for d in u.exited():
            assert d.proc is not None
            say(f"{d.name} exited ({_status(d.proc.returncode)}); starting it again in {restart:g}s "
                f"(as a machine that comes back)")
            d.proc, d.restart_at = None, now + restart
        for d in u.daemons:
            if d.restart_at is not None and now >= d.restart_at:
                say(f"starting {d.name} again")
                u.start(d)
        time.sleep(0.2)
    return X.OK


def _failed(u: Up, starting: bool) -> int | None:
    """The exit status for up when a daemon ended in a way that restarting cannot mend, else None.

    A daemon that cannot listen because its port is taken (it exits with
    IN_USE) would fail again: up says who holds the port and stops.  So
    does one that ends while starting, before every node was online.
    """
    for d in u.exited():
        assert d.proc is not None
        code = d.proc.returncode
        if code == IN_USE:
            who = holders(d.tcp) + (holders(d.udp, "udp") if d.udp is not None else [])
            say(f"{d.name} cannot listen: its address is taken" + (f" (by {', '.join(who)})" if who else "")
                + "; not starting it again, stopping everything")
            return IN_USE
        if starting:
            say(f"{d.name} exited while starting ({_status(code)}; its message is above): stopping everything")
            return X.REFUSED
    return None


def _status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"status {code}"


def banner(daemons: list[Daemon], state: Path, web: str = "") -> str:
    scheds = [d for d in daemons if d.role == "scheduler"]
    nodes = [d for d in daemons if d.role == "node"]
    stores = [d for d in daemons if d.role == "store"]
    sched = scheds[0]
    addr = f"tcp!127.0.0.1!{sched.tcp}"
    ctl = "/cluster/scheduler/ctl"
    who = "the scheduler" if len(scheds) == 1 else f"{len(scheds)} scheduler replicas on etcd"
    return (f"""
fornax-sched is up: {who} and {len(nodes)} fornax-nodes on loopback, all online (state in {state})
""" + "".join(f"  {'scheduler' if len(scheds) == 1 else f'replica {i}'}  tcp!127.0.0.1!{d.tcp}   "
              f"pid {d.proc.pid if d.proc else '-'}"
              + (f"   HTTP {d.http}" if len(scheds) > 1 and d.http else "") + "\n"
              for i, d in enumerate(scheds, 1))
      + "".join(f"  etcd       http://127.0.0.1:{d.tcp}   pid {d.proc.pid if d.proc else '-'}\n" for d in stores)
      + "".join(f"  {d.name}  tcp!127.0.0.1!{d.tcp}   gossip 127.0.0.1:{d.udp}   pid {d.proc.pid if d.proc else '-'}\n"
              for d in nodes) + f"""
  the web page:       {web or "-"}
  see the nodes:      fornax-sched 9p ls '{addr}' /cluster/nodes
  place a container:  fornax-sched 9p write -r '{addr}' {ctl} place hello
  see placements:     fornax-sched 9p ls '{addr}' /cluster/scheduler/placements
  read the log:       fornax-sched 9p read '{addr}' /cluster/scheduler/log
  mount it (Linux):   mount -t 9p -o trans=tcp,port={sched.tcp},version=9p2000.L 127.0.0.1 /mnt/fornax
                      echo place hello > /mnt/fornax{ctl}
  the whole scenario: examples/acceptance.sh
  stop everything:    Ctrl-C
""")
