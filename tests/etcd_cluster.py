"""Real etcd members for tests and benchmarks: one process per member, on free loopback ports.

    cluster = EtcdCluster(tmp_dir, members=3)
    cluster.start()                       # waits until every member answers /health
    spec = cluster.spec("test-17")        # etcd://127.0.0.1:P1,...,127.0.0.1:P3/test-17
    cluster.stop_member(0); cluster.start_member(0)
    cluster.close()                       # stops every process it started

The members run Debian's ``etcd`` (package etcd-server) with etcd's own
heartbeat and election timeout (a leader lost is replaced within about two
seconds; a lease lives at least 2 s).  A missing binary is a test failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .helpers import free_port, stop_process


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise RuntimeError("etcd is not installed (Debian package etcd-server): run ./dev test, which installs it")
    return path


@dataclass
class Member:
    name: str
    client: int
    peer: int
    data: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client}"


class EtcdCluster:
    def __init__(self, root: Path, members: int = 1, *, max_txn_ops: int = 128) -> None:
        self.root = Path(root)
        self.binary = etcd_binary()
        self.max_txn_ops = max_txn_ops
        self.members = [Member(f"m{i}", free_port(), free_port(), self.root / f"m{i}") for i in range(members)]
        self.token = f"fornax-test-{self.members[0].client}"

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def spec(self, prefix: str = "", **options: object) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"etcd://{self.endpoints}" + (f"/{prefix}" if prefix else "") + (f"?{query}" if query else "")

    def _command(self, m: Member) -> list[str]:
        initial = ",".join(f"{x.name}=http://127.0.0.1:{x.peer}" for x in self.members)
        return [
            self.binary, "--name", m.name, "--data-dir", str(m.data),
            "--listen-client-urls", f"http://127.0.0.1:{m.client}",
            "--advertise-client-urls", f"http://127.0.0.1:{m.client}",
            "--listen-peer-urls", f"http://127.0.0.1:{m.peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer}",
            "--initial-cluster", initial, "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "100", "--election-timeout", "1000",  # etcd's own: steady on a loaded machine
            "--max-txn-ops", str(self.max_txn_ops),
            "--logger", "zap", "--log-level", "error",
        ]

    def start(self, timeout: float = 20.0) -> None:
        for i in range(len(self.members)):
            self.start_member(i, wait=False)
        self.wait_healthy(timeout)

    def start_member(self, i: int, wait: bool = True, timeout: float = 20.0) -> None:
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            return
        m.data.mkdir(parents=True, exist_ok=True)
        log = (self.root / f"{m.name}.log").open("ab")
        try:
            m.proc = subprocess.Popen(self._command(m), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        finally:
            log.close()
        if wait:
            self.wait_healthy(timeout, [m])

    def wait_healthy(self, timeout: float = 20.0, members: list[Member] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for m in members or [x for x in self.members if x.proc is not None]:
            last = ""
            while True:
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd member {m.name} exited with {m.proc.returncode}: {self.log(m)}")
                try:
                    with urllib.request.urlopen(f"http://{m.endpoint}/health", timeout=1) as r:
                        if json.loads(r.read()).get("health") == "true":
                            break
                        last = "unhealthy"
                except (OSError, ValueError) as e:
                    last = str(e)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {m.name} is not healthy within {timeout}s ({last}): "
                                       f"{self.log(m)}")
                time.sleep(0.05)

    def log(self, m: Member) -> str:
        try:
            return (self.root / f"{m.name}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def leader(self) -> int:
        """The index of the member that leads now (etcdctl endpoint status)."""
        out = subprocess.run(["etcdctl", "--endpoints", self.endpoints, "--command-timeout", "3s", "endpoint",
                              "status", "-w", "json"], capture_output=True, text=True, timeout=10,
                             env={"ETCDCTL_API": "3", "PATH": os.environ.get("PATH", "")})
        for st in json.loads(out.stdout or "[]"):
            if st["Status"]["leader"] == st["Status"]["header"]["member_id"]:
                return [m.endpoint for m in self.members].index(st["Endpoint"].removeprefix("http://"))
        raise RuntimeError(f"no etcd member leads: {out.stdout} {out.stderr}")

    def stop_member(self, i: int, kill: bool = False) -> None:
        m = self.members[i]
        if m.proc is None:
            return
        if kill:
            m.proc.kill()
            m.proc.wait()
        else:
            stop_process(m.proc, timeout=10)
        m.proc = None

    def close(self) -> None:
        for i in range(len(self.members)):
            self.stop_member(i)
        shutil.rmtree(self.root, ignore_errors=True)
