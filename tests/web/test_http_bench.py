"""bench/http_bench.py end to end at a small size: it runs, and its JSON holds what bench/README.md
reads from it (the figures themselves are the benchmark's, not a test's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_http_bench_smoke() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "http_bench.py"), "--nodes", "100", "--placements",
                           "1000", "--scrapes", "5", "--window", "1", "--windows", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout)
    assert (r["nodes"], r["placements"], r["scrape_ms"]["n"]) == (100, 1000, 5)
    assert r["scrape_ms"]["bytes"] > 1000 and r["scrape_ms"]["render_mean_ms"] > 0
    reads = r["ninep_read_ms"]
    assert reads["peer_without_scrapes"]["n"] > 0 and reads["ours_with_a_scrape_a_second"]["n"] > 0
    assert reads["ours_with_a_scrape_a_second"]["scrapes"] >= 1 and reads["p99_ratio"] > 0
