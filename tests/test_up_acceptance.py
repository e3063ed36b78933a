"""The first README command and the acceptance script, as a user runs them.

`fornax-sched up` starts the scheduler and three nodes; examples/acceptance.sh
plays the scenario against it from another "terminal"; Ctrl-C stops
everything and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

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


def test_up_then_the_acceptance_script(tmp_path: Path) -> None:
    port, gossip = free_run(3, socket.SOCK_STREAM), free_run(3, socket.SOCK_DGRAM)
    state = tmp_path / "up"
    up = subprocess.Popen([sys.executable, "-m", "fornax_sched", "up", "--port", str(port), "--gossip", str(gossip),
                           "--state", str(state), "--dead", "2", "--restart", "3"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        assert up.stdout is not None
        banner = ""
        while "stop everything" not in banner:
            line = up.stdout.readline()
            assert line, f"up ended early: {banner}"
            banner += line
        assert f"scheduler  tcp!127.0.0.1!{port}" in banner and "examples/acceptance.sh" in banner
        env = {**os.environ, "FORNAX_SCHED_ADDR": f"tcp!127.0.0.1!{port}", "FORNAX_STATE": str(state),
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
        up.send_signal(signal.SIGINT)  # at once: the node killed with -9 may not be back yet
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert up.returncode == 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in node_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in node_pids)
    containers = [json.loads(f.read_text()) for f in state.glob("fornax-0*/containers/*/container.json")]
    assert len(containers) >= 4  # the check below must look at something
    assert not [c for c in containers if c.get("pid") and alive(c["pid"])], "a container outlived up"


def _start_up(port: int, gossip: int, state: Path) -> subprocess.Popen[str]:
    up = subprocess.Popen([sys.executable, "-m", "fornax_sched", "up", "--port", str(port), "--gossip", str(gossip),
                           "--state", str(state), "--dead", "2", "--restart", "3"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    assert up.stdout is not None
    banner = ""
    while "stop everything" not in banner:
        line = up.stdout.readline()
        assert line, f"up ended early: {banner}"
        banner += line
    threading.Thread(target=up.stdout.read, daemon=True).start()  # never let its pipe fill
    return up


def _stop_up(up: subprocess.Popen[str]) -> None:
    up.send_signal(signal.SIGINT)
    try:
        up.wait(60)
    except subprocess.TimeoutExpired:
        up.kill()
        raise


def test_a_restart_of_up_brings_back_what_should_run(tmp_path: Path) -> None:
    """Ctrl-C of `up` stops the nodes, whose shutdown stops the containers; that is not the user's
    stop: started again, everything meant to run runs again (it came back "stopped by request")."""
    from fornax_sched.fs.client import Client

    from .helpers import eventually, run

    port, gossip = free_run(3, socket.SOCK_STREAM), free_run(3, socket.SOCK_DGRAM)
    state = tmp_path / "up"
    addr = f"tcp!127.0.0.1!{port}"

    async def ctl(command: str) -> str:
        async with await Client.connect(addr, version="9P2000.u", timeout=20) as c:
            return (await c.write_file("cluster/scheduler/ctl", command.encode(), read_reply=True)).decode()

    async def statuses() -> dict[str, str]:
        async with await Client.connect(addr, timeout=10) as c:
            names = [e.name for e in await c.ls("cluster/scheduler/placements")]
            return {n: (await c.read_file(f"cluster/scheduler/placements/{n}")).decode().split("status=")[1].split()[0]
                    for n in names}

    async def nodes_online() -> bool:
        async with await Client.connect(addr, timeout=10) as c:
            return (await c.read_file("cluster/scheduler/ctl")).decode().startswith("nodes 3 online 3")

    async def all_running() -> dict[str, str] | None:
        st = await statuses()
        return st if len(st) == 6 and set(st.values()) == {"running"} else None

    up = _start_up(port, gossip, state)
    try:
        run(eventually(nodes_online, 30))
        run(ctl("place hello name=web replicas=4"))
        run(ctl("place hello name=db"))
        run(ctl("place hello name=idle"))
        run(ctl("stop idle"))  # the user's stop: it stays stopped
        run(ctl("start idle"))
        run(eventually(all_running, 20))
        run(ctl("stop idle"))
    finally:
        _stop_up(up)
    up = _start_up(port, gossip, state)
    try:
        async def back() -> dict[str, str] | None:
            st = await statuses()
            want = {**{f"web-{i}": "running" for i in range(1, 5)}, "db": "running", "idle": "stopped"}
            return st if st == want else None

        run(eventually(back, 40))
    finally:
        _stop_up(up)
