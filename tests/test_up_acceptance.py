"""The first README command and the acceptance script, as a user runs them.

`fornax-sched up` starts the scheduler and three nodes and says it is up
only once the scheduler shows them all online; a second `up` says what
holds its state and ports and starts nothing; examples/acceptance.sh plays
the scenario against it from another "terminal"; Ctrl-C says what it
stops and leaves no process behind; `up --fresh` starts with empty state.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from fornax_sched import exitcodes as X
from fornax_sched import up as up_mod
from fornax_sched.fs.blocking import BlockingClient

from .helpers import stop_process, wait_until
from .node.cluster import alive, free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def free_run(n: int, kind: int) -> int:
    """A base port with ``n`` free ports after it (up uses BASE..BASE+n)."""
    for _ in range(50):
        base = free_port(kind)
        socks = []
        try:
            for i in range(n + 1):
                s = socket.socket(socket.AF_INET, kind)
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


class Up:
    """`fornax-sched up` in a process of its own, its output collected line by line."""

    def __init__(self, port: int, gossip: int, state: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fornax_sched", "up", "--port", str(port), "--gossip", str(gossip),
             "--state", str(state), "--dead", "2", "--restart", "3", "--wait", "60", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self.addr = f"tcp!127.0.0.1!{port}"
        self.reader = threading.Thread(target=self._read, daemon=True)  # never let its pipe fill
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def banner(self, timeout: float = 90) -> str:
        wait_until(lambda: "stop everything" in self.out or self.proc.poll() is not None, timeout, 0.05)
        assert "stop everything" in self.out, f"up ended early: {self.out}"
        return self.out

    def interrupt(self) -> str:
        """Ctrl-C; what up said while stopping."""
        before = len(self.lines)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.reader.join(10)  # it ends at EOF
        return "".join(self.lines[before:])


def ctl_text(addr: str) -> str:
    with BlockingClient.connect(addr, version="9P2000.u", timeout=10) as c:
        return c.read_file("cluster/scheduler/ctl").decode()


def running_under(state: Path) -> list[str]:
    """Every process whose command line or environment mentions ``state``: a daemon or container left behind."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if (str(state).encode() in cmd or str(state).encode() in env) and alive(int(d.name)):
            found.append(d.name + ": " + cmd.replace(b"\0", b" ").decode(errors="replace"))
    return found


def test_up_then_the_acceptance_script(tmp_path: Path) -> None:
    port, gossip = free_run(3, socket.SOCK_STREAM), free_run(3, socket.SOCK_DGRAM)
    state = tmp_path / "up"
    up = Up(port, gossip, state)
    try:
        banner = up.banner()
        # The banner comes only once the scheduler's own files show every node online.
        assert ctl_text(up.addr).startswith("nodes 3 online 3"), ctl_text(up.addr)
        assert f"scheduler  tcp!127.0.0.1!{port}" in banner and "examples/acceptance.sh" in banner
        assert "all online" in banner
        pids = {line.split()[0]: int(line.rsplit("pid ", 1)[1]) for line in banner.splitlines()
                if line.startswith(("  scheduler", "  fornax-0"))}
        assert len(pids) == 4
        # The web page's address with its token (kept in up's state, 0600); or why it is not served
        # (another process may hold the default 127.0.0.1:8084 on a shared machine).
        web = next(line for line in banner.splitlines() if line.startswith("  the web page:")).split(":", 1)[1].strip()
        token = (state / "http-tokens").read_text().split()[0]
        assert (state / "http-tokens").stat().st_mode & 0o777 == 0o600
        if web.startswith("http://"):
            assert web.endswith(f"/#token={token}"), web
            with urllib.request.urlopen(web.split("#")[0] + "health", timeout=10) as r:
                assert json.loads(r.read())["status"] == "ok"
        else:
            assert web.startswith("not served: 127.0.0.1:8084: "), web

        # A second up on the same state: it says which up holds it, and starts nothing.
        again = subprocess.run([sys.executable, "-m", "fornax_sched", "up", "--port", str(port), "--gossip",
                                str(gossip), "--state", str(state)], capture_output=True, text=True, timeout=30,
                               cwd=ROOT)
        assert again.returncode == X.IN_USE, again.stderr
        assert f"state {state} is in use by fornax-sched up, pid {up.proc.pid}" in again.stderr
        # Another state, the same ports: it names the processes that hold them, and their up.
        other = subprocess.run([sys.executable, "-m", "fornax_sched", "up", "--port", str(port), "--gossip",
                                str(gossip), "--state", str(tmp_path / "other")], capture_output=True, text=True,
                               timeout=30, cwd=ROOT)
        assert other.returncode == X.IN_USE, other.stderr
        assert (f"tcp port {port} (9P of the scheduler) is held by pid {pids['scheduler']} (python"
                in other.stderr), other.stderr
        assert f"udp port {gossip + 2} (gossip of fornax-02) is held by pid {pids['fornax-02']}" in other.stderr
        assert f"started by fornax-sched up pid {up.proc.pid}" in other.stderr
        assert "nothing started" in other.stderr
        assert not (tmp_path / "other" / "scheduler").exists()
        assert up.proc.poll() is None and ctl_text(up.addr).startswith("nodes 3 online 3")  # undisturbed

        env = {**os.environ, "FORNAX_SCHED_ADDR": up.addr, "FORNAX_STATE": str(state),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        run = subprocess.run([str(ROOT / "examples" / "acceptance.sh")], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        out = run.stdout
        assert "fornax-01 online\nfornax-02 online\nfornax-03 online" in "\n".join(
            " ".join(line.split()[:2]) for line in out.splitlines())
        assert "hello-1 node=" in out and "re-place hello-1" in out
        assert "fornax-02: online cordoned, no containers" in out
        assert "the scenario passed" in out
        node_pids = [int((state / f"fornax-0{i}" / "pid").read_text()) for i in (1, 2, 3)
                     if (state / f"fornax-0{i}" / "pid").exists()]
        said = up.interrupt()  # at once: the node killed with -9 may not be back yet
    finally:
        stop_process(up.proc)
    assert up.proc.returncode == 0, up.out[-2000:]
    assert f"stopping the scheduler (pid {pids['scheduler']})" in said, said
    for name in ("fornax-01", "fornax-03"):  # (fornax-0N killed by the script comes back with a new pid)
        assert f"stopping {name} (pid " in said
    assert "nothing left running" in said
    assert not any(alive(p) for p in node_pids)
    containers = [json.loads(f.read_text()) for f in state.glob("fornax-0*/containers/*/container.json")]
    assert len(containers) >= 4  # the check below must look at something
    assert not [c for c in containers if c.get("pid") and alive(c["pid"])], "a container outlived up"
    assert running_under(state) == []


def test_a_restart_of_up_brings_back_what_should_run_and_fresh_forgets_it(tmp_path: Path) -> None:
    """Ctrl-C of `up` stops the nodes, whose shutdown stops the containers; that is not the user's
    stop: started again, everything meant to run runs again (it came back "stopped by request").
    `up --fresh` then starts with nothing."""
    port, gossip = free_run(3, socket.SOCK_STREAM), free_run(3, socket.SOCK_DGRAM)
    state = tmp_path / "up"

    def ctl(addr: str, command: str) -> str:
        with BlockingClient.connect(addr, version="9P2000.u", timeout=20) as c:
            return c.write_file("cluster/scheduler/ctl", command.encode(), read_reply=True).decode()

    def statuses(addr: str) -> dict[str, str]:
        with BlockingClient.connect(addr, version="9P2000.u", timeout=10) as c:
            names = [e.name for e in c.ls("cluster/scheduler/placements")]
            return {n: c.read_file(f"cluster/scheduler/placements/{n}").decode().split("status=")[1].split()[0]
                    for n in names}

    up = Up(port, gossip, state)
    try:
        up.banner()
        ctl(up.addr, "place hello name=web replicas=4")
        ctl(up.addr, "place hello name=db")
        ctl(up.addr, "place hello name=idle")
        ctl(up.addr, "stop idle")  # the user's stop: it stays stopped
        ctl(up.addr, "start idle")
        wait_until(lambda: (st := statuses(up.addr)) and len(st) == 6 and set(st.values()) == {"running"}, 20)
        ctl(up.addr, "stop idle")
        up.interrupt()
    finally:
        stop_process(up.proc)
    up = Up(port, gossip, state)
    try:
        up.banner()
        want = {**{f"web-{i}": "running" for i in range(1, 5)}, "db": "running", "idle": "stopped"}
        wait_until(lambda: statuses(up.addr) == want, 40)
        up.interrupt()
    finally:
        stop_process(up.proc)
    assert up.proc.returncode == 0
    old_records = sorted(p.name for p in state.glob("fornax-0*/containers/*"))
    assert len(old_records) >= 6

    up = Up(port, gossip, state, "--fresh")
    try:
        banner = up.banner()
        assert "starting afresh: the nodes' old state is in" in banner
        assert statuses(up.addr) == {}
        assert ctl_text(up.addr).startswith("nodes 3 online 3")
        up.interrupt()
    finally:
        stop_process(up.proc)
    assert up.proc.returncode == 0
    aside = list(state.glob("replaced-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].glob("fornax-0*/containers/*")) == old_records
    assert list((state / "scheduler").glob("sched.db.replaced-*"))  # serve --fresh kept the old store aside
    assert running_under(state) == []


def test_a_daemon_whose_address_is_taken_is_not_started_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    """A node or scheduler that cannot listen exits 4, and up stops instead of restarting it for ever."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        gport = taken.getsockname()[1]
        nport = free_port()
        node = up_mod.Daemon("fornax-01", up_mod.node_cmd(1, 1, up_mod.REPO_IMAGES, tmp_path, nport - 1, gport - 1),
                             tcp=nport, udp=gport)
        with socket.socket() as held:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.bind(("127.0.0.1", 0))
            held.listen()
            sport = held.getsockname()[1]
            sched = up_mod.Daemon("the scheduler", up_mod.sched_cmd(tmp_path, sport, 2), tcp=sport)
            u = up_mod.Up([sched, node], tmp_path)
            for d in (sched, node):
                u.start(d)
            try:
                for d in (sched, node):
                    assert d.proc is not None
                    assert d.proc.wait(30) == X.IN_USE
                    assert up_mod._failed(up_mod.Up([d], tmp_path), starting=False) == X.IN_USE
            finally:
                for d in (sched, node):
                    stop_process(d.proc)
    err = capsys.readouterr().err
    me = f"pid {os.getpid()}"
    assert f"the scheduler cannot listen: its address is taken (by {me} (" in err, err
    assert f"fornax-01 cannot listen: its address is taken (by {me} (" in err
    assert "not starting it again, stopping everything" in err


def test_fresh_refuses_to_forget_a_container_that_still_runs(tmp_path: Path) -> None:
    """A node killed with -9 leaves its containers running; --fresh would lose them, so it says so."""
    port, gossip = free_run(1, socket.SOCK_STREAM), free_run(1, socket.SOCK_DGRAM)
    state = tmp_path / "up"
    rec = state / "fornax-01" / "containers" / "c1"
    rec.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"], env={**os.environ, "FORNAX_CONTAINER": "c1"})
    try:
        rec.joinpath("container.json").write_text(json.dumps({"id": "c1", "name": "web-1", "pid": sleeper.pid}))
        r = subprocess.run([sys.executable, "-m", "fornax_sched", "up", "--nodes", "1", "--port", str(port),
                            "--gossip", str(gossip), "--state", str(state), "--fresh"], capture_output=True,
                           text=True, timeout=30, cwd=ROOT)
        assert r.returncode == X.REFUSED
        assert (f"--fresh would forget containers that still run: web-1 of fornax-01 (pid {sleeper.pid})"
                in r.stderr), r.stderr
        assert rec.exists() and not (state / "scheduler").exists()  # nothing moved, nothing started
    finally:
        stop_process(sleeper)


def test_up_gives_up_naming_the_nodes_not_online(tmp_path: Path) -> None:
    """No banner before every node is online: past --wait, up names those that are not, and stops all."""
    port, gossip = free_run(2, socket.SOCK_STREAM), free_run(2, socket.SOCK_DGRAM)
    state = tmp_path / "up"
    r = subprocess.run([sys.executable, "-m", "fornax_sched", "up", "--nodes", "2", "--port", str(port), "--gossip",
                        str(gossip), "--state", str(state), "--wait", "0.1"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == X.REFUSED, r.stdout + r.stderr
    assert "is up" not in r.stdout
    assert "not every node is online after 0.1s: fornax-01: " in r.stderr and "; fornax-02: " in r.stderr
    assert "stopping the scheduler (pid " in r.stderr and "nothing left running" in r.stderr
    assert running_under(state) == []


def test_up_on_etcd_starts_etcd_and_two_replicas_one_leading(tmp_path: Path) -> None:
    """`up --store etcd`: a local etcd and two scheduler replicas beside the nodes; a place written to
    either replica is answered; Ctrl-C stops everything, etcd last, and leaves nothing running."""
    port, gossip = free_run(5, socket.SOCK_STREAM), free_run(4, socket.SOCK_DGRAM)
    etcd = free_run(2, socket.SOCK_STREAM)
    state = tmp_path / "up"
    u = Up(port, gossip, state, "--store", "etcd", "--etcd-port", str(etcd))
    try:
        out = u.banner()
        assert "2 scheduler replicas on etcd and 3 fornax-nodes" in out, out
        second = f"tcp!127.0.0.1!{port + 4}"
        assert f"replica 2  {second}" in out and f"etcd       http://127.0.0.1:{etcd}" in out, out
        texts = [ctl_text(u.addr), ctl_text(second)]
        assert sum("(this replica)" in t for t in texts) == 1, texts  # one leads
        # Each replica has its own HTTP (replica 2 beside serve's defaults, which replica 1 has), unless
        # the port was taken, which the banner says.
        urls = []
        for line in (ln for ln in out.splitlines() if ln.startswith("  replica ")):
            http = line.split("   HTTP ", 1)[1]
            served = ("http://127.0.0.1:8084/", "http://127.0.0.1:8086/")
            assert http.startswith((*served, "not served (127.0.0.1:808")), line
            if http.startswith("http://"):
                urls.append(http)
        leading = []
        for url in urls:
            with urllib.request.urlopen(url + "health", timeout=10) as r:
                leading.append(json.load(r)["leading"])
        assert len(urls) < 2 or sorted(leading) == [False, True], (urls, leading)
        assert all(f"store etcd etcd://127.0.0.1:{etcd}/fornax-up" in t for t in texts), texts
        for addr, name in ((u.addr, "one"), (second, "two")):
            with BlockingClient.connect(addr, version="9P2000.u", timeout=10) as c:
                answer = c.write_file("cluster/scheduler/ctl", f"place hello name={name}".encode(), read_reply=True)
            assert answer.decode().startswith(f"{name} node=fornax-0"), answer
    finally:
        said = u.interrupt()
    assert "stopped 2 scheduler replicas, etcd and 3 nodes; nothing left running" in said, said
    assert said.index("stopping etcd") > said.index("stopping fornax-03"), said
    assert running_under(state) == []
