"""The page's API on a follower replica (two `serve` on one real etcd): a change made there goes to
the leader as a 9P write to the follower does, and the follower's state names the leader."""

from __future__ import annotations

import getpass
from pathlib import Path

from ..etcd_cluster import EtcdCluster
from ..helpers import free_port, run, wait_until
from ..node.cluster import read
from ..sched.harness import SchedProc
from ..sched.test_replicas import TTL, leader_of, stop_all
from .webapi import call

TOKEN = "replica-token-0123456789abcdef"


def test_a_change_on_a_followers_page_is_the_leaders(etcd: EtcdCluster, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")  # one file for both: an operator's token works on either replica
    ports = [free_port(), free_port()]
    procs = [SchedProc(tmp_path / f"sched{i}", [], extra=[
        "--store", etcd.spec("web", timeout=5), "--lease-ttl", str(TTL), "--dead", "10", "--sim-nodes", "3",
        "--http", f"127.0.0.1:{ports[i]}", "--http-token-file", str(tokens)]).start() for i in range(2)]
    try:
        lead = run(leader_of(procs))
        i = next(i for i, p in enumerate(procs) if p is not lead)
        follower, base = procs[i], f"http://127.0.0.1:{ports[i]}"
        st = wait_until(lambda: (s := call(base, "/api/state")[1])["leader"] == lead.addr and s, timeout=20)
        assert st["replicated"] and not st["leading"], st
        code, out = call(base, "/api/ctl", {"command": "place hello name=via-follower"}, token=TOKEN)
        assert code == 200 and out["answer"].startswith("via-follower node=sim-"), out
        code, out = call(base, "/api/ctl", {"command": "place hello name=via-follower"}, token=TOKEN)
        assert code == 422 and "container 'via-follower' exists" in out["error"], out  # the leader's words
        log = run(read(lead.addr, "cluster/scheduler/log"))
        assert log.count("place via-follower (place hello name=via-follower)") == 1, log
        code, out = call(base, "/api/policy", {"text": "pack\n"}, token=TOKEN)
        assert code == 200 and "sent to the leader" in out["answer"], out
        wait_until(lambda: run(read(lead.addr, "cluster/scheduler/policy")).strip() == "pack", timeout=10)
        status = run(read(lead.addr, "cluster/scheduler/policy.status"))
        assert f" by {getpass.getuser()}\n" in status, status  # the token's user, through the forward
        assert follower.proc is not None and follower.proc.poll() is None
    finally:
        stop_all(procs)
