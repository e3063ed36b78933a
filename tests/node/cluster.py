"""Real fornax-node daemons on loopback, for the tests (and nothing else)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fornax_sched.fs.client import Client

from ..conftest import spawn_serving
from ..helpers import drain, eventually, free_port, stop_process

__all__ = ["IMAGES", "NodeProc", "alive", "ctl", "eventually", "free_port", "read", "status", "three_nodes"]

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "examples" / "images"
FAST = ["--interval", "0.2", "--suspect", "1.0", "--dead", "2.0", "--remove", "4.0", "--grace", "1.0"]


@dataclass
class NodeProc:
    name: str
    port: int
    gossip: int
    state: Path
    peers: list[int] = field(default_factory=list)
    images: Path = IMAGES
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    id: str = ""
    crashed: bool = False

    @property
    def addr(self) -> str:
        return f"tcp!127.0.0.1!{self.port}"

    def start(self) -> NodeProc:
        cmd = [sys.executable, "-m", "fornax_sched.node.cli", "serve", "--name", self.name,
               "--listen", self.addr, "--images", str(self.images), "--state", str(self.state),
               "--gossip", f"127.0.0.1:{self.gossip}", "--broadcast", "off",  # loopback only
               "--peers", ",".join(f"127.0.0.1:{p}" for p in self.peers), *FAST, *self.extra]
        self.proc, line = spawn_serving(cmd, self.name)
        drain(self.proc)
        self.crashed = False
        self.id = line.split("(")[1].split(")")[0]
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.crashed = True

    def stop(self) -> int:
        """Clean shutdown (SIGTERM); returns the exit status.

        A daemon killed with -9 and not started again (a test that failed half
        way) is started once more first, so that it adopts its containers and
        stops them: a test run leaves no process behind, pass or fail.
        """
        if self.crashed:
            self.start()
        assert self.proc is not None
        return int(stop_process(self.proc) or 0)


def three_nodes(tmp: Path, images: Path = IMAGES) -> list[NodeProc]:
    """fornax-01..03, each knowing only the next (gossip must fill in the rest)."""
    gossip = [free_port(socket.SOCK_DGRAM) for _ in range(3)]
    nodes = [NodeProc(f"fornax-0{i + 1}", free_port(), gossip[i], tmp / f"state{i + 1}",
                      peers=[gossip[(i + 1) % 3]], images=images) for i in range(3)]
    return [n.start() for n in nodes]


async def read(addr: str, path: str) -> str:
    async with await Client.connect(addr, timeout=5) as c:
        return (await c.read_file(path)).decode()


async def ctl(addr: str, path: str, command: str) -> str:
    async with await Client.connect(addr, timeout=10) as c:
        return (await c.write_file(path, command.encode(), read_reply=True)).decode()


def status(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        out[k] = v
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
