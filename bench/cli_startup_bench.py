#!/usr/bin/env python3
"""How long one `fornax-sched 9p read` takes, start-up included, against peers in the same run.

    .venv/bin/python bench/cli_startup_bench.py [--runs N]

Starts a real scheduler (`fornax-sched serve --sim-nodes 3`) and diod
(Debian package `diod`, a 9P server in C) exporting a temp dir, then runs
each command N times (default 20), round robin so that they share the
machine's noise, and prints one JSON document:

- floor: `python -c pass` with the same interpreter: no program starts faster;
- ours: `fornax-sched 9p read ADDR /cluster/scheduler/ctl` (the console script);
- ours_asyncio: the same read as a one-shot script over the asyncio Client
  (what the command used before the blocking client);
- ours_on_diod: `fornax-sched 9p -V 9P2000.L read` of a file diod serves;
- diodcat: diod's own C client reading the same file from diod.

Each is measured with Python's bytecode cache (as an installed package
runs) and without it (PYTHONDONTWRITEBYTECODE=1, which this machine's
environment sets: every module is compiled at every start), as wall time
and as the CPU time the command used (user + system, from getrusage of
the reaped child: much less disturbed than wall time when the machine is
busy).  The machine's load average is in the report.  It also
reports `python -X importtime` of one read.  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGET_MS = 100.0


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(cmd: list[str], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(cmd, capture_output=True, timeout=timeout).returncode == 0:
            return True
        time.sleep(0.1)
    return False


def summary(times: list[float], cpu: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    return {"median_ms": round(statistics.median(ms), 1), "min_ms": round(ms[0], 1),
            "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1),
            "cpu_median_ms": round(statistics.median(cpu) * 1000, 1)}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(cmds: dict[str, list[str]], runs: int, env: dict[str, str]) -> dict[str, Any]:
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    for k, c in cmds.items():  # one untimed run each: caches (and bytecode, where allowed) are warm
        r = subprocess.run(c, capture_output=True, env=env, timeout=60)
        if r.returncode != 0:
            raise SystemExit(f"{k} failed: {r.stderr.decode(errors='replace')}")
    for _ in range(runs):
        for k, c in cmds.items():
            t, c0 = time.perf_counter(), children_cpu()
            subprocess.run(c, stdout=subprocess.DEVNULL, env=env, timeout=60, check=True)
            times[k].append(time.perf_counter() - t)
            cpu[k].append(children_cpu() - c0)
    return {k: summary(v, cpu[k]) for k, v in times.items()}


def importtime(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """The import times of one read: the total, ours and the five dearest modules (own time)."""
    r = subprocess.run([sys.executable, "-X", "importtime", *cmd], capture_output=True, text=True, env=env,
                       timeout=60)
    rows = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self" not in line:
            own, _cum, name = line[len("import time:"):].split("|")
            rows.append((int(own), name.strip()))
    total = sum(t for t, _ in rows)
    ours = sum(t for t, n in rows if n.startswith("fornax_sched"))
    return {"modules": len(rows), "total_ms": round(total / 1000, 1), "fornax_sched_ms": round(ours / 1000, 1),
            "dearest": [{"module": n, "own_ms": round(t / 1000, 1)} for t, n in sorted(rows, reverse=True)[:5]],
            "heavy_loaded": sorted({n for _, n in rows} & {"asyncio", "yaml", "lupa", "sqlite3", "logging",
                                                          "dataclasses", "typing", "fornax_sched.sched"})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="runs of each command (default 20)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cli-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        addr = f"tcp!127.0.0.1!{free_port()}"
        procs.append(subprocess.Popen([sys.executable, "-m", "fornax_sched", "serve", "--listen", addr, "--state",
                                       str(tmp / "sched"), "--sim-nodes", "3"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, cwd=ROOT))
        read = [str(BIN / "fornax-sched"), "9p", "read", addr, "/cluster/scheduler/ctl"]
        if not wait_serving(read):
            raise SystemExit("the scheduler did not start")
        probe = ("import asyncio\nfrom fornax_sched.fs.client import Client\n"
                 "async def main():\n"
                 f"    async with await Client.connect({addr!r}, version=('9P2000.u', '9P2000.L')) as c:\n"
                 "        return await c.read_file('/cluster/scheduler/ctl')\n"
                 "import sys; sys.stdout.buffer.write(asyncio.run(main()))\n")
        cmds = {"floor": [sys.executable, "-c", "pass"], "ours": read,
                "ours_asyncio": [sys.executable, "-c", probe]}
        diod = shutil.which("diod")
        export = tmp / "export"
        export.mkdir()
        (export / "ctl").write_bytes(subprocess.run(read, capture_output=True, check=True).stdout)
        if diod and shutil.which("diodcat"):
            dport = free_port()
            procs.append(subprocess.Popen([diod, "-f", "-n", "-S", "-U", "root", "-c", "/dev/null", "-l",
                                           f"127.0.0.1:{dport}", "-e", str(export)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            cmds["ours_on_diod"] = [str(BIN / "fornax-sched"), "9p", "-V", "9P2000.L", "-a", str(export), "read",
                                    f"tcp!127.0.0.1!{dport}", "/ctl"]
            cmds["diodcat"] = [str(shutil.which("diodcat")), "-s", f"127.0.0.1:{dport}", "-a", str(export), "ctl"]
            if not wait_serving(cmds["diodcat"]):
                raise SystemExit("diod did not start")
        else:
            log("diod or diodcat is not installed (Debian package diod): measuring without them")
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        uncached = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        log(f"{args.runs} runs of {len(cmds)} commands, with the bytecode cache ...")
        with_cache = measure(cmds, args.runs, cached)
        log("... and without it")
        without_cache = measure(cmds, args.runs, uncached)
        imports = importtime(["-m", "fornax_sched", *read[1:]], cached)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    ours, floor = with_cache["ours"]["median_ms"], with_cache["floor"]["median_ms"]
    report = {
        "bench": "cli_startup",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "runs": args.runs,
        "command": " ".join(["fornax-sched", *read[1:]]),
        "with_bytecode_cache": with_cache,
        "without_bytecode_cache": without_cache,
        "importtime_with_cache": imports,
        "ours_over_floor_ms": round(ours - floor, 1),
        "target_ms": TARGET_MS,
        "ours_under_target": ours < TARGET_MS,
    }
    if "diodcat" in with_cache:
        report["ours_over_diodcat_ms"] = round(with_cache["ours_on_diod"]["median_ms"]
                                               - with_cache["diodcat"]["median_ms"], 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
