"""A real scheduler process over real node daemons, for the tests."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fornax_sched.fs.client import Client

from ..conftest import spawn_serving
from ..helpers import drain, stop_process
from ..node.cluster import NodeProc, eventually, free_port, read, three_nodes

# Fast enough for tests: a look at each node every 0.2 s, dead after 2 s unreachable.
FAST = ["--interval", "0.2", "--dead", "2", "--control", "off", "--http", "off"]  # (no fixed ports)


@dataclass
class SchedProc:
    state: Path
    seeds: list[str]
    port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    module: str = "fornax_sched"  # what runs `serve` (tests.store.faulty: with a store that fails on purpose)
    preexec: Callable[[], None] | None = None  # run in the child before exec (limits, say)

    @property
    def addr(self) -> str:
        return f"tcp!127.0.0.1!{self.port}"

    def start(self) -> SchedProc:
        cmd = [sys.executable, "-m", self.module, "serve", "--listen", self.addr, "--state", str(self.state),
               *[w for s in self.seeds for w in ("--node", s)], *FAST, *self.extra]
        self.proc, _ = spawn_serving(cmd, "scheduler", preexec_fn=self.preexec)
        drain(self.proc)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        return int(stop_process(self.proc) or 0)


async def ctl(addr: str, command: str, uname: str | None = None) -> str:
    kw = {"uname": uname} if uname else {}
    async with await Client.connect(addr, timeout=20, version="9P2000.u", **kw) as c:
        data = await c.write_file("cluster/scheduler/ctl", command.encode(), read_reply=True)
        return data.decode()


def fields(text: str) -> dict[str, str]:
    """A placement file: ``key=value`` words on the first line, one ``key=value`` a line after."""
    lines = text.splitlines()
    out = dict(w.partition("=")[::2] for w in lines[0].split(" "))
    for line in lines[1:]:
        k, _, v = line.partition("=")
        out[k] = v
    return out


async def placement(addr: str, name: str) -> dict[str, str]:
    return fields(await read(addr, f"cluster/scheduler/placements/{name}"))


async def running_on(node: NodeProc) -> dict[str, str]:
    """What a node itself says it runs: container name -> node's id (running ones only)."""
    out = {}
    for text in (await read(node.addr, "cluster/self/containers")).split("\n\n"):
        kv = dict(line.partition(" ")[::2] for line in text.splitlines())
        if kv.get("state") == "running":
            out[kv["name"]] = kv["id"]
    return out


async def discovered(sched: SchedProc, count: int = 3) -> list[str]:
    async def check() -> list[str] | None:
        names = sorted(e.name for e in await ls(sched.addr, "cluster/nodes"))
        statuses = [(await read(sched.addr, f"cluster/nodes/{n}/status")).strip() for n in names]
        return names if len(names) == count and all(s == "online" for s in statuses) else None

    return await eventually(check, timeout=15)


async def ls(addr: str, path: str) -> list:  # type: ignore[type-arg]
    async with await Client.connect(addr, timeout=5) as c:
        return await c.ls(path)


@contextmanager
def scheduler_over_three(tmp: Path, every_seed: bool = False) -> Iterator[tuple[SchedProc, list[NodeProc]]]:
    """fornax-01..03 and a scheduler seeded with the first (the rest from its peers) or with all three."""
    nodes = three_nodes(tmp)
    sched = None
    try:
        sched = SchedProc(tmp / "sched", [n.addr for n in (nodes if every_seed else nodes[:1])]).start()
        yield sched, nodes
    finally:
        if sched is not None:
            sched.stop()
        for n in nodes:
            n.stop()


async def rounds_pass(sched: SchedProc, node: str, rounds: int = 2) -> None:
    """Return once the scheduler has looked at ``node`` ``rounds`` more times (a reconciliation
    round each): how a test sees that something did not happen, without a fixed wait."""
    import time

    for _ in range(rounds):
        t0 = time.monotonic()

        async def contacted_since(t0: float = t0) -> bool:
            text = await read(sched.addr, f"cluster/nodes/{node}/health")
            ago = float(text.split("last contact ")[1].split("s ago")[0])
            return ago < time.monotonic() - t0

        await eventually(contacted_since, timeout=15, interval=0.05)
