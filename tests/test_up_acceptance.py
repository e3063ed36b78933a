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
