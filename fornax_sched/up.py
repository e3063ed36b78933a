"""``fornax-sched up``: the whole system on one machine, on loopback, in the foreground.

Each node runs as its own process (so one can be killed and restarted like a
real machine); this process watches them and stops them all on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"


def default_state() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fornax-sched" / "up"


def node_cmd(i: int, nodes: int, images: Path, state: Path, port: int, gossip: int) -> list[str]:
    peers = ",".join(f"127.0.0.1:{gossip + j}" for j in range(1, nodes + 1) if j != i)
    return [sys.executable, "-m", "fornax_sched.node.cli", "serve", "--name", f"fornax-{i:02d}",
            "--listen", f"tcp!127.0.0.1!{port + i}", "--images", str(images),
            "--state", str(state / f"fornax-{i:02d}"), "--gossip", f"127.0.0.1:{gossip + i}",
            "--peers", peers, "--broadcast", "off"]


def up(nodes: int = 3, images: Path | None = None, state: Path | None = None,
       port: int = 5640, gossip: int = 9710) -> int:
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
    for i in range(1, nodes + 1):
        procs[i] = subprocess.Popen(node_cmd(i, nodes, images, state, port, gossip))
    first = f"tcp!127.0.0.1!{port + 1}"
    print(f"""
fornax-sched is up: {nodes} fornax-nodes on loopback (state in {state})
""" + "".join(f"  fornax-{i:02d}  tcp!127.0.0.1!{port + i}   gossip 127.0.0.1:{gossip + i}\n"
              for i in range(1, nodes + 1)) + f"""
  see the cluster:    fornax-sched 9p ls '{first}' /cluster/nodes
  run a container:    fornax-sched 9p write -r '{first}' /cluster/ctl run hello
  read its status:    fornax-sched 9p read '{first}' /cluster/containers/1/status
  mount it (Linux):   mount -t 9p -o trans=tcp,port={port + 1},version=9p2000.L 127.0.0.1 /mnt
  stop everything:    Ctrl-C
""", flush=True)
    while not stopping:
        for i, p in list(procs.items()):
            if p.poll() is not None:
                print(f"fornax-sched up: fornax-{i:02d} exited ({p.returncode}); "
                      f"restart it with: {' '.join(node_cmd(i, nodes, images, state, port, gossip))}",
                      file=sys.stderr, flush=True)
                del procs[i]
        time.sleep(0.2)
    for p in procs.values():
        p.terminate()
    for p in procs.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    return 0
