"""Commits per second of the store with 1 and 8 concurrent writers: SQLite, etcd (1 member), etcd (3 members).

    .venv/bin/python bench/store_bench.py [--seconds 3] [--kinds sqlite,etcd1,etcd3] [--writers 1,8]

Each writer commits, one after another, a batch like a placement's (a row
and a log line).  Commits of concurrent writers are grouped by the store
(kv.KVStore), so 8 writers should not pay 8 round trips: the report gives
commits/s and the store transactions each commit took (``txns_per_commit``,
1.0 means no grouping).  The etcd members are real processes on free loopback
ports, started and stopped by this script.  JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fornax_sched.sched.store import Batch, open_store  # noqa: E402
from tests.etcd_cluster import EtcdCluster  # noqa: E402


async def measure(spec: str, writers: int, seconds: float) -> dict[str, Any]:
    s = await open_store(spec)
    try:
        txns = 0
        real = s.kv.txn

        async def counting(*a: Any, **kw: Any) -> Any:
            nonlocal txns
            txns += 1
            return await real(*a, **kw)

        s.kv.txn = counting  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        commits = 0
        latencies: list[float] = []

        async def writer(w: int, until: float) -> None:
            nonlocal commits
            n = 0
            while loop.time() < until:
                t0 = loop.time()
                await s.apply(Batch().put("placements", f"w{w}-{n}", {"node": "fornax-01", "cpu": 0.5, "n": n})
                              .note(f"placed w{w}-{n} on fornax-01"))
                latencies.append(loop.time() - t0)
                commits += 1
                n += 1

        await asyncio.gather(*(writer(w, loop.time() + 0.3) for w in range(writers)))  # warm up
        commits, txns, latencies = 0, 0, []
        t0 = loop.time()
        await asyncio.gather(*(writer(w, t0 + seconds) for w in range(writers)))
        took = loop.time() - t0
        latencies.sort()
        return {"writers": writers, "commits": commits, "commits_per_s": round(commits / took, 1),
                "txns_per_commit": round(txns / max(commits, 1), 3),
                "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
                "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2)}
    finally:
        await s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--kinds", default="sqlite,etcd1,etcd3")
    ap.add_argument("--writers", default="1,8")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    writers = [int(w) for w in args.writers.split(",") if w]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        for kind in kinds:
            cluster = None
            try:
                if kind == "sqlite":
                    spec_of = lambda n: str(Path(tmp) / f"sqlite-{n}.db")  # noqa: E731
                elif kind in ("etcd1", "etcd3"):
                    cluster = EtcdCluster(Path(tmp) / kind, members=int(kind[-1]))
                    cluster.start()
                    spec_of = lambda n, c=cluster: c.spec(f"bench-{n}")  # noqa: E731
                else:
                    print(f"store_bench: unknown kind {kind!r}", file=sys.stderr)
                    return 2
                for w in writers:
                    r = asyncio.run(measure(spec_of(w), w, args.seconds))
                    print(f"{kind} writers={w}: {r['commits_per_s']} commits/s, "
                          f"{r['txns_per_commit']} txns/commit", file=sys.stderr)
                    results.setdefault(kind, []).append(r)
            finally:
                if cluster is not None:
                    cluster.close()
    report: dict[str, Any] = {"bench": "store", "seconds": args.seconds, "results": results,
                              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "sqlite" in results:
        base = {r["writers"]: r["commits_per_s"] for r in results["sqlite"]}
        report["vs_sqlite"] = {k: {str(r["writers"]): round(r["commits_per_s"] / base[r["writers"]], 2)
                                   for r in rs if base.get(r["writers"])}
                               for k, rs in results.items() if k != "sqlite"}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
