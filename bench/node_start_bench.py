"""Container start latency on one fornax-node, against a bare subprocess start.

For each start: write `run IMAGE` to /cluster/ctl (reading the id back on
the same fid), then read /cluster/containers/<id>/status until it says
`running`; the time from the write to that read is the start latency.  The
peer in the same run starts the image's command with a bare
asyncio.create_subprocess_exec (the time until the process exists).  Prints
JSON: p50/p99/mean of both, starts per second, and our overhead at p50.

    .venv/bin/python bench/node_start_bench.py [--starts N] [--image hello]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fornax_sched.fs.client import Client  # noqa: E402
from tests.node.cluster import IMAGES, NodeProc, free_port  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(xs, 50) * 1e3, 3), "p99_ms": round(pct(xs, 99) * 1e3, 3),
            "mean_ms": round(statistics.fmean(xs) * 1e3, 3)}


async def ours(node: NodeProc, image: str, n: int, batch: int) -> tuple[list[float], float]:
    lat: list[float] = []
    async with await Client.connect(node.addr, timeout=30) as c:
        t_all = time.perf_counter()
        busy = 0.0
        for start in range(0, n, batch):
            ids = []
            t_batch = time.perf_counter()
            for _ in range(min(batch, n - start)):
                t0 = time.perf_counter()
                cid = (await c.write_file("cluster/ctl", f"run {image}".encode(), read_reply=True)).decode().strip()
                while b"state running" not in await c.read_file(f"cluster/containers/{cid}/status"):
                    await asyncio.sleep(0)
                lat.append(time.perf_counter() - t0)
                ids.append(cid)
            busy += time.perf_counter() - t_batch
            for cid in ids:  # not timed: keep the machine from filling with processes
                await c.write_file("cluster/ctl", f"destroy {cid}".encode())
        del t_all
    return lat, n / busy


async def bare(cmd: list[str], cwd: Path, n: int, batch: int) -> tuple[list[float], float]:
    lat: list[float] = []
    busy = 0.0
    for start in range(0, n, batch):
        procs = []
        t_batch = time.perf_counter()
        for _ in range(min(batch, n - start)):
            t0 = time.perf_counter()
            p = await asyncio.create_subprocess_exec(*cmd, cwd=cwd, stdin=subprocess.DEVNULL,
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                     start_new_session=True)
            lat.append(time.perf_counter() - t0)
            procs.append(p)
        busy += time.perf_counter() - t_batch
        for p in procs:
            p.kill()
            await p.wait()
    return lat, n / busy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=300)
    ap.add_argument("--batch", type=int, default=25, help="containers alive at once before cleanup")
    ap.add_argument("--image", default="hello")
    args = ap.parse_args()
    cmd = shlex.split((IMAGES / args.image / "config").read_text().split("\n#")[0].strip(), comments=True)
    with tempfile.TemporaryDirectory() as tmp:
        node = NodeProc("bench-01", free_port(), free_port(socket.SOCK_DGRAM), Path(tmp) / "state").start()
        try:
            asyncio.run(ours(node, args.image, 20, 10))  # warm up
            asyncio.run(bare(cmd, IMAGES / args.image, 20, 10))
            our_lat, our_rate = asyncio.run(ours(node, args.image, args.starts, args.batch))
            bare_lat, bare_rate = asyncio.run(bare(cmd, IMAGES / args.image, args.starts, args.batch))
        finally:
            node.stop()
    o, b = summary(our_lat), summary(bare_lat)
    overhead = round(o["p50_ms"] - b["p50_ms"], 3)
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "image": args.image, "command": cmd, "starts": args.starts,
        "ours": {**o, "starts_per_s": round(our_rate, 1),
                 "what": "ctl write 'run' over 9P until status reads running"},
        "bare_subprocess": {**b, "starts_per_s": round(bare_rate, 1),
                            "what": "asyncio.create_subprocess_exec until the process exists"},
        "overhead_p50_ms": overhead,
        "target": {"overhead_p50_ms<5": overhead < 5},
    }, indent=2))


if __name__ == "__main__":
    main()
