#!/usr/bin/env python3
"""How long a listing of every placement takes: `fornax-sched status` against a loop of
`fornax-sched 9p read` over the placement files, in one run.

    .venv/bin/python bench/status_bench.py [--placements N] [--runs R] [--quick]

Starts a real scheduler with three simulated nodes (`serve --sim-nodes 3`),
places N containers (default 1,000), then times, as a shell user would run
them (the console scripts, start-up included):

- ours: `fornax-sched status ADDR` (one read of /cluster/scheduler/status), R times (default 5);
- ours_json: `fornax-sched status --json ADDR` (status.json), R times;
- peer: `fornax-sched 9p read ADDR /cluster/scheduler/placements/NAME` for every placement, one
  process after the other (the loop an operator wrote before: 8.6 s for 25 placements);
  `--quick` reads 100 of them and gives the loop's time for N from that.

Prints one JSON document; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.sched.harness import SchedProc, ctl  # noqa: E402

BIN = Path(sys.executable).parent / "fornax-sched"


def timed(cmd: list[str]) -> tuple[float, bytes]:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=120).stdout
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--placements", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="the 9p read loop over 100 placements, scaled up")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fornax-status-bench-") as tmp:
        sched = SchedProc(Path(tmp) / "sched", [], extra=["--sim-nodes", "3"]).start()
        try:
            async def place() -> list[str]:
                names: list[str] = []
                while len(names) < args.placements:
                    n = min(200, args.placements - len(names))
                    reply = await ctl(sched.addr, f"place hello name=g{len(names)} replicas={n}")
                    names += [line.split()[0] for line in reply.splitlines() if "status=running" in line]
                return names

            t = time.perf_counter()
            names = asyncio.run(place())
            print(f"placed {len(names)} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            ours = [timed([str(BIN), "status", sched.addr]) for _ in range(args.runs)]
            ours_json = [timed([str(BIN), "status", "--json", sched.addr]) for _ in range(args.runs)]
            rows = len(ours[-1][1].decode().split("\n\n", 1)[0].splitlines()) - 1
            listed = len(json.loads(ours_json[-1][1])["placements"])
            loop = names[:100] if args.quick else names
            t = time.perf_counter()
            for name in loop:
                timed([str(BIN), "9p", "read", sched.addr, f"/cluster/scheduler/placements/{name}"])
            loop_s = time.perf_counter() - t
            print(f"status {statistics.median(x for x, _ in ours):.3f}s; 9p read loop over {len(loop)} "
                  f"{loop_s:.1f}s", file=sys.stderr)
        finally:
            sched.stop()
    per_file = loop_s / len(loop)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()[0]},
        "placements": len(names),
        "ours_status_s": {"median": round(statistics.median(x for x, _ in ours), 3),
                          "min": round(min(x for x, _ in ours), 3), "rows": rows,
                          "bytes": len(ours[-1][1])},
        "ours_status_json_s": {"median": round(statistics.median(x for x, _ in ours_json), 3),
                               "placements": listed, "bytes": len(ours_json[-1][1])},
        "peer_9p_read_loop_s": {"files_read": len(loop), "seconds": round(loop_s, 2),
                                "per_file_ms": round(per_file * 1e3, 1),
                                "for_all_placements_s": round(per_file * len(names), 1)},
    }
    result["speedup"] = round(result["peer_9p_read_loop_s"]["for_all_placements_s"]
                              / result["ours_status_s"]["median"], 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
