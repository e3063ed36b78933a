"""A real Prometheus scrapes a real scheduler and a real fornax-node; promtool lints both expositions.

Prometheus (Debian's package) runs on loopback with a 1 s scrape interval; the test asks its HTTP API
what it gathered, so the names, types and labels are checked by the program operators will use.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ..conftest import need_binary
from ..helpers import drain, free_port, run, stop_process, wait_until
from ..node.cluster import IMAGES, NodeProc
from ..sched.harness import SchedProc, ctl
from .test_http import get


def query(api: str, promql: str) -> list[dict[str, Any]]:
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def by(results: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in results}


def start_prometheus(tmp: Path, targets: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    binary = need_binary("prometheus")
    port = free_port()
    jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
                   for job, target in targets.items())
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{jobs}")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    drain(proc)
    api = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{api}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None  # (ended: the assert below says so)

    wait_until(ready, timeout=60)
    assert proc.poll() is None, "prometheus ended at start"
    return proc, api


def promtool_accepts(exposition: str) -> None:
    tool = need_binary("promtool")
    done = subprocess.run([tool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
        f"promtool check metrics: {done.returncode}\n{done.stdout}{done.stderr}"


def test_prometheus_scrapes_a_scheduler_and_a_node(tmp_path: Path) -> None:
    sched_http, node_http = free_port(), free_port()
    node = NodeProc("pnode", free_port(), free_port(), tmp_path / "node", extra=["--http", f"127.0.0.1:{node_http}"])
    sched = SchedProc(tmp_path / "sched", [], extra=["--http", f"127.0.0.1:{sched_http}"])
    prom: subprocess.Popen[str] | None = None
    try:
        node.start()
        sched.seeds = [node.addr]
        sched.start()
        prom, api = start_prometheus(tmp_path / "prom", {"sched": f"127.0.0.1:{sched_http}",
                                                         "node": f"127.0.0.1:{node_http}"})
        run(ctl(sched.addr, "place hello name=web replicas=2"))
        run(ctl(sched.addr, "place hello name=one"))
        run(ctl(sched.addr, "place hello name=big cpu>=64"))  # no node has 64 CPUs: unschedulable
        try:
            run(ctl(sched.addr, "cordon no-such-node"))
        except Exception:  # refused, and counted as such
            pass

        def placements() -> dict[str, float] | None:
            got = by(query(api, "fornax_sched_placements"), "status")
            return got if got.get("running") == 3 and got.get("unschedulable") == 1 else None

        assert wait_until(placements, timeout=60, interval=0.5)
        assert wait_until(lambda: by(query(api, "up"), "job") == {"sched": 1.0, "node": 1.0}, timeout=30, interval=0.5)
        assert wait_until(lambda: by(query(api, 'fornax_node_containers{state="running"}'), "state")
                          == {"running": 3.0}, timeout=30, interval=0.5)
        code, _, body = get(f"http://127.0.0.1:{node_http}/health")
        assert code == 200 and json.loads(body)["node"] == "pnode" and json.loads(body)["running"] == 3
        assert wait_until(lambda: by(query(api, "fornax_node_container_starts_total"), "result") == {"running": 3.0},
                          timeout=30, interval=0.5)
        nodes = query(api, "fornax_sched_nodes")
        assert [(r["metric"]["kind"], r["metric"]["status"], r["value"][1]) for r in nodes] == \
            [("fornax", "online", "1")], nodes
        ctl_counts = {(r["metric"]["verb"], r["metric"]["result"]): float(r["value"][1])
                      for r in query(api, "fornax_sched_ctl_commands_total")}
        assert ctl_counts.get(("place", "ok")) == 3 and ctl_counts.get(("cordon", "refused")) == 1, ctl_counts
        assert by(query(api, "fornax_sched_mode"), "mode")["normal"] == 1
        # A histogram Prometheus can take quantiles of: the 9P requests the ctl writes made.
        assert query(api, 'histogram_quantile(0.99, sum by (le) (fornax_sched_ninep_request_duration_seconds_bucket'
                          '{op="write"}))')
        commits = by(query(api, "fornax_sched_store_commits_total"), "result")
        assert commits.get("ok", 0) >= 3, commits

        for url in (f"http://127.0.0.1:{sched_http}/metrics", f"http://127.0.0.1:{node_http}/metrics"):
            code, kind, text = get(url)
            assert code == 200 and kind.startswith("text/plain; version=0.0.4")
            promtool_accepts(text)
            assert "web-1" not in text and "pnode" not in text  # no names in labels
    finally:
        if prom is not None:
            stop_process(prom)
        if sched.proc is not None:
            sched.stop()
        node.stop()


def test_node_http_refuses_a_bad_address(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "fornax_sched.node.cli", "serve", "--name", "bad", "--images", str(IMAGES),
            "--state", str(tmp_path / "b"), "--listen", f"tcp!127.0.0.1!{free_port()}", "--broadcast", "off",
            "--gossip", f"127.0.0.1:{free_port()}"]
    for bad in ("nowhere", "127.0.0.1:99999", "127.0.0.1:"):
        done = subprocess.run([*base, "--http", bad], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "--http" in done.stderr, (bad, done.returncode, done.stderr)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())  # nothing made
