"""``fornax-sched up``: the whole system on one machine, on loopback, in the foreground.

The scheduler and each node run as processes of their own (so one can be
killed and restarted like a real machine); this process watches them and
stops them all on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"


def add_parser(sub: Any) -> None:
    up = sub.add_parser("up", help="start the local system in the foreground",
                        description="Start the cluster on this machine, on loopback, and print how to talk to it.")
    up.add_argument("--nodes", type=int, default=3, help="how many fornax-nodes (default %(default)s)")
    up.add_argument("--images", type=Path, default=None, help="images directory (default: examples/images)")
    up.add_argument("--state", type=Path, default=None, help="state directory (default ~/.local/state/fornax-sched/up)")
    up.add_argument("--port", type=int, default=5640,
                    help="the scheduler listens on 9P port PORT, node N on PORT+N (default %(default)s)")
    up.add_argument("--gossip", type=int, default=9710, help="node N gossips on port GOSSIP+N (default %(default)s)")
    up.add_argument("--dead", type=float, default=10.0,
                    help="seconds a node may be unreachable before the scheduler re-places its containers")
    up.add_argument("--restart", type=float, default=20.0,
                    help="seconds before a process that exited is started again (default %(default)s)")
    up.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    return up(a.nodes, a.images, a.state, a.port, a.gossip, a.dead, a.restart)


def default_state() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fornax-sched" / "up"


def node_cmd(i: int, nodes: int, images: Path, state: Path, port: int, gossip: int) -> list[str]:
    peers = ",".join(f"127.0.0.1:{gossip + j}" for j in range(1, nodes + 1) if j != i)
    return [sys.executable, "-m", "fornax_sched.node.cli", "serve", "--name", f"fornax-{i:02d}",
            "--listen", f"tcp!127.0.0.1!{port + i}", "--images", str(images),
            "--state", str(state / f"fornax-{i:02d}"), "--gossip", f"127.0.0.1:{gossip + i}",
            "--peers", peers, "--broadcast", "off"]


def _wait_ready(proc: subprocess.Popen[bytes], pidfile: Path, timeout: float = 15.0) -> None:
    """Wait until a node daemon has written its pid file (it then handles SIGTERM cleanly)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if int(pidfile.read_text()) == proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


def sched_cmd(state: Path, port: int, dead: float) -> list[str]:
    return [sys.executable, "-m", "fornax_sched", "serve", "--listen", f"tcp!127.0.0.1!{port}",
            "--state", str(state / "scheduler"), "--node", f"tcp!127.0.0.1!{port + 1}", "--dead", f"{dead:g}"]


def up(nodes: int = 3, images: Path | None = None, state: Path | None = None,
       port: int = 5640, gossip: int = 9710, dead: float = 10.0, restart: float = 20.0) -> int:
    images = images or REPO_IMAGES
    state = state or default_state()
    if not images.is_dir():
        print(f"fornax-sched up: no images directory at {images} (give --images)", file=sys.stderr)
        return 1
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    commands = {i: node_cmd(i, nodes, images, state, port, gossip) for i in range(1, nodes + 1)}
    commands[0] = sched_cmd(state, port, dead)
    names = {i: f"fornax-{i:02d}" for i in range(1, nodes + 1)} | {0: "the scheduler"}
    for i, cmd in commands.items():
        procs[i] = subprocess.Popen(cmd)
    sched = f"tcp!127.0.0.1!{port}"
    ctl = "/cluster/scheduler/ctl"
    print(f"""
fornax-sched is up: the scheduler and {nodes} fornax-nodes on loopback (state in {state})
  scheduler  {sched}
""" + "".join(f"  fornax-{i:02d}  tcp!127.0.0.1!{port + i}   gossip 127.0.0.1:{gossip + i}\n"
              for i in range(1, nodes + 1)) + f"""
  see the nodes:      fornax-sched 9p ls '{sched}' /cluster/nodes
  place a container:  fornax-sched 9p write -r '{sched}' {ctl} place hello
  see placements:     fornax-sched 9p ls '{sched}' /cluster/scheduler/placements
  read the log:       fornax-sched 9p read '{sched}' /cluster/scheduler/log
  mount it (Linux):   mount -t 9p -o trans=tcp,port={port},version=9p2000.L 127.0.0.1 /mnt/fornax
                      echo place hello > /mnt/fornax{ctl}
  the whole scenario: examples/acceptance.sh
  stop everything:    Ctrl-C
""", flush=True)
    restarts: dict[int, float] = {}  # what exited, and when to start it again
    while not stopping:
        now = time.monotonic()
        for i, p in list(procs.items()):
            if p.poll() is not None:
                print(f"fornax-sched up: {names[i]} exited ({p.returncode}); starting it again in {restart:g}s "
                      f"(as a machine that comes back)", file=sys.stderr, flush=True)
                del procs[i]
                restarts[i] = now + restart
        for i, at in list(restarts.items()):
            if now >= at:
                print(f"fornax-sched up: starting {names[i]} again", file=sys.stderr, flush=True)
                procs[i] = subprocess.Popen(commands[i])
                del restarts[i]
        time.sleep(0.2)
    for i in restarts:  # a node killed and not yet back still has containers: start it to stop them
        if i != 0:
            procs[i] = subprocess.Popen(commands[i])
            _wait_ready(procs[i], state / names[i] / "pid")
    for i in sorted(procs):  # the scheduler first, so it does not see the nodes go as deaths
        procs[i].terminate()
        if i == 0:
            try:
                procs[i].wait(10)
            except subprocess.TimeoutExpired:
                procs[i].kill()
    for p in procs.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    return 0
