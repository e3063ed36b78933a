"""The page's API through a real ``fornax-sched serve`` (no browser): who may change what, and how a
bad request is refused with a JSON error that changes nothing (docs/web.8.md)."""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fornax_sched.web.auth import Auth, AuthError, loopback, parse_tokens

from ..helpers import free_port, run, wait_until
from ..node.cluster import read
from ..sched.harness import SchedProc, ctl, ls
from .webapi import call

OWNER = getpass.getuser()
OWN = "owner-token-0123456789abcdef"
MALLORY = "mallory-token-0123456789abcdef"
YAML = """scheduler:
  name: api-test
  rules:
    - name: pack-all
      condition: always
      action:
        dispatch: most-loaded
"""


@pytest.fixture(scope="module")
def sched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SchedProc, str]]:
    """A scheduler over 3 simulated nodes; its tokens: the owner's, and mallory's (not a writer)."""
    tmp = tmp_path_factory.mktemp("api")
    tokens = tmp / "tokens"
    tokens.write_text(f"# the owner's (no user given), then one for a user who is no writer\n{OWN}\n"
                      f"{MALLORY} mallory\n")
    port = free_port()
    s = SchedProc(tmp / "s", [], extra=["--sim-nodes", "3", "--http", f"127.0.0.1:{port}",
                                        "--http-token-file", str(tokens)])
    s.start()
    try:
        wait_until(lambda: len(call(f"http://127.0.0.1:{port}", "/api/state")[1]["nodes"]) == 3, timeout=20)
        yield s, f"http://127.0.0.1:{port}"
    finally:
        s.stop()


def placements(s: SchedProc) -> list[str]:
    return sorted(e.name for e in run(ls(s.addr, "cluster/scheduler/placements")))


def test_a_change_needs_the_token(sched: tuple[SchedProc, str]) -> None:
    s, base = sched
    before = placements(s)
    code, out = call(base, "/api/ctl", {"command": "place hello name=tokenless"})
    assert code == 401 and "needs the scheduler's token in the X-Fornax-Token header" in out["error"], out
    code, out = call(base, "/api/ctl", {"command": "place hello name=tokenless"}, token="not-" + OWN)
    assert code == 401 and "not one of this scheduler's" in out["error"], out
    code, out = call(base, "/api/ctl", {"command": "place hello name=tokenless"},
                     headers={"Cookie": f"token={OWN}"})  # a cookie is no token
    assert code == 401, out
    assert placements(s) == before
    code, out = call(base, "/api/ctl", {"command": "place hello name=tokened"}, token=OWN)
    assert code == 200 and out["ok"] and "tokened node=sim-" in out["answer"], out
    assert "tokened" in placements(s)
    code, out = call(base, "/api/ctl", {"command": "stop tokened"}, headers={"Authorization": f"Bearer {OWN}"})
    assert code == 200 and "tokened" in out["answer"], out
    log = run(read(s.addr, "cluster/scheduler/log"))
    assert re.search(rf"stop tokened on sim-\d+ \(by {OWNER}\)", log), log[-2000:]  # the token's user, as ctl


def test_cross_site_requests_and_rebinding_are_refused(sched: tuple[SchedProc, str]) -> None:
    s, base = sched
    before = placements(s)
    host = base.removeprefix("http://")
    cmd = {"command": "place hello name=forged"}
    code, out = call(base, "/api/ctl", cmd, token=OWN, headers={"Origin": "http://evil.example"})
    assert code == 403 and "cross-site request forgery" in out["error"], out
    code, out = call(base, "/api/ctl", cmd, token=OWN, headers={"Origin": "null"})
    assert code == 403, out
    code, out = call(base, "/api/ctl", cmd, token=OWN, headers={"Host": f"evil.example:{host.split(':')[1]}"})
    assert code == 403 and "DNS rebinding" in out["error"], out
    code, out = call(base, "/api/state", headers={"Host": "rebound.example"})  # reads too
    assert code == 403 and "DNS rebinding" in out["error"], out
    # A form post (what another site can send without asking first) is not JSON, and is refused.
    code, out = call(base, "/api/ctl", raw=b"command=place+hello", token=OWN,
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 415 and "JSON" in out["error"], out
    assert placements(s) == before
    code, out = call(base, "/api/ctl", {"command": "cordon sim-0003"}, token=OWN, headers={"Origin": base})
    assert code == 200, out  # the page's own origin is fine
    call(base, "/api/ctl", {"command": "uncordon sim-0003"}, token=OWN)


def test_bad_bodies_and_unknown_commands(sched: tuple[SchedProc, str]) -> None:
    s, base = sched
    before = placements(s)
    for raw, why in ((b'{"command": ', "not JSON"), (b'["place hello"]', "JSON object"),
                     (b'{"command": 7}', "'command'"), (b"\xff\xfe", "not JSON")):
        code, out = call(base, "/api/ctl", raw=raw, token=OWN)
        assert code == 400 and why in out["error"], (raw, out)
    code, out = call(base, "/api/ctl", {"command": "frobnicate everything"}, token=OWN)
    assert code == 422 and out["error"].startswith("unknown command 'frobnicate'") and "commands:" in out["error"], out
    code, out = call(base, "/api/ctl", {"command": "place hello cpu>=lots"}, token=OWN)
    assert code == 422 and "cpu" in out["error"], out
    code, out = call(base, "/api/ctl", {"command": "place a\nplace b"}, token=OWN)
    assert code == 400 and "one command" in out["error"], out
    code, out = call(base, "/api/policy", {"text": "-- " + "x" * (300 << 10)}, token=OWN)
    assert code == 413 and "larger than 256K" in out["error"], out
    code, out = call(base, "/api/ctl", {"command": "x" * (2 << 20)}, token=OWN)
    assert code == 413 and "larger than" in out["error"], out
    code, out = call(base, "/api/nothing/here")
    assert code == 404 and "no such API path" in out["error"], out
    code, out = call(base, "/api/placements/nobody")
    assert code == 404 and "no placement 'nobody'" in out["error"], out
    assert placements(s) == before
    assert "refused 'frobnicate everything': unknown command" in run(read(s.addr, "cluster/scheduler/log"))


def test_a_user_who_is_no_writer_is_refused(sched: tuple[SchedProc, str]) -> None:
    s, base = sched
    before = placements(s)
    code, out = call(base, "/api/ctl", {"command": "place hello name=mallorys"}, token=MALLORY)
    assert code == 403 and out["error"].startswith(f"permission denied: mallory may not write ctl; the writers are "
                                                   f"{OWNER}"), out
    code, out = call(base, "/api/policy", {"text": "pack\n"}, token=MALLORY)
    assert code == 403 and "mallory may not write policy" in out["error"], out
    code, out = call(base, "/api/state", token=MALLORY)  # reading is free
    assert code == 200 and out["you"] == "mallory" and out["writers"] == [OWNER], out
    assert placements(s) == before
    assert run(read(s.addr, "cluster/scheduler/policy.status")).startswith("version 0\n")


def test_policy_compile_check_simulate_deploy_restore(sched: tuple[SchedProc, str]) -> None:
    s, base = sched
    code, out = call(base, "/api/policy/compile", {"text": YAML.replace("most-loaded", "most-crowded")})
    assert code == 200 and not out["ok"] and out["line"] == 7 and out["in"] == "source", out
    assert "unknown selection 'most-crowded'" in out["error"]
    code, out = call(base, "/api/policy/compile", {"text": YAML})
    assert out["ok"] and out["kind"] == "yaml" and "-- pack-all: priority 0 (line 4)" in out["lua"], out
    code, out = call(base, "/api/policy/check", {"text": "function decide(ctx)\n  return 1 +\nend\n"})
    assert code == 200 and not out["ok"] and out["line"] == 3 and "policy refused" in out["error"], out
    code, out = call(base, "/api/policy/check", {"text": YAML})
    assert out["ok"] and "dry run on the live cluster (3 nodes" in out["answer"], out
    code, out = call(base, "/api/policy/simulate", {"text": YAML, "place": "place hello replicas=2"})
    assert code == 200 and "(policy draft yaml api-test): nothing changed" in out["answer"], out
    assert out["answer"].count("(rule pack-all)") == 2, out
    # A draft of text rules (reindexing the cluster by its affinity) decides the simulation alone:
    # afterwards the policy in force decides as before.
    before = call(base, "/api/policy/simulate", {"place": "place hello replicas=3"})[1]["answer"]
    code, out = call(base, "/api/policy/simulate", {"text": "affinity cpu>=4\npack\n", "place": "place hello"})
    assert code == 200 and "(policy draft rules): nothing changed" in out["answer"] and "pack" in out["answer"], out
    assert call(base, "/api/policy/simulate", {"place": "place hello replicas=3"})[1]["answer"] == before
    code, out = call(base, "/api/policy/simulate", {"text": YAML, "place": "place"})
    assert code == 422 and "usage" in out["error"], out
    v0 = int(run(read(s.addr, "cluster/scheduler/policy.status")).split()[1])
    code, out = call(base, "/api/policy", {"text": "function decide(ctx)\n  return 1 +\nend\n"}, token=OWN)
    assert code == 422 and out["line"] == 3 and "the old one stays" in out["error"], out
    code, out = call(base, "/api/policy", {"text": YAML}, token=OWN)
    assert code == 200 and out["version"] == v0 + 1, out
    status = run(read(s.addr, "cluster/scheduler/policy.status"))
    assert status.startswith(f"version {v0 + 1}\nkind yaml\n") and f"by {OWNER}" in status, status
    assert run(read(s.addr, "cluster/scheduler/policy")) == YAML
    code, out = call(base, "/api/policy")
    assert out["version"] == v0 + 1 and out["history"][0]["active"] and "pack-all" in out["lua"], out
    code, out = call(base, "/api/policy", {"text": "pack\n"}, token=OWN)
    assert out["version"] == v0 + 2, out
    code, out = call(base, "/api/policy/restore", {"version": v0 + 1}, token=OWN)
    assert code == 200 and f"policy v{v0 + 3} active" in out["answer"], out
    assert run(read(s.addr, "cluster/scheduler/policy")) == YAML
    code, out = call(base, "/api/policy/restore", {"version": 999}, token=OWN)
    assert code == 422 and "no policy version 999" in out["error"], out
    code, out = call(base, "/api/policy/restore", {"version": "1"}, token=OWN)
    assert code == 400, out
    code, out = call(base, "/api/policy/history/999")
    assert code == 404, out
    code, out = call(base, "/api/templates")
    names = [t["name"] for t in out["templates"]]
    assert names[:3] == ["spread", "pack", "platform.lua"] and "web-first.yaml" in names, names
    assert all(call(base, "/api/policy/compile", {"text": t["source"]})[1]["ok"] for t in out["templates"])


def test_the_log_streams_new_lines(sched: tuple[SchedProc, str]) -> None:
    s, base = sched
    with urllib.request.urlopen(base + "/api/log/stream", timeout=30) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        line = r.readline()
        while not line.startswith(b"id: "):  # the lines kept, then where they end
            line = r.readline()
        t0 = time.monotonic()
        run(ctl(s.addr, "place hello name=streamed"))
        seen = b""
        while b"streamed" not in seen:
            seen = r.readline()
        took = time.monotonic() - t0
    assert b"data: " in seen and took < 30, (seen, took)


def test_serve_refuses_a_bad_token_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokens"
    bad.write_text("short\n")
    p = subprocess.run([sys.executable, "-m", "fornax_sched", "serve", "--listen", f"tcp!127.0.0.1!{free_port()}",
                        "--state", str(tmp_path / "x"), "--control", "off", "--http-token-file", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and f"--http-token-file {bad}:1: a token is at least 16" in p.stdout, p
    p = subprocess.run([sys.executable, "-m", "fornax_sched", "serve", "--listen", f"tcp!127.0.0.1!{free_port()}",
                        "--state", str(tmp_path / "x"), "--control", "off", "--http-token-file",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "cannot read" in p.stdout, p


def test_a_token_made_at_start_is_printed_and_kept(tmp_path: Path) -> None:
    port = free_port()
    s = SchedProc(tmp_path / "s", [], extra=["--sim-nodes", "1", "--http", f"127.0.0.1:{port}"])
    s.start()
    try:
        kept = (tmp_path / "s" / "http.token")
        token = kept.read_text().strip()
        assert len(token) >= 16 and kept.stat().st_mode & 0o777 == 0o600
        assert token not in run(read(s.addr, "cluster/scheduler/log"))  # never in the log
        code, out = call(f"http://127.0.0.1:{port}", "/api/ctl", {"command": "place hello"}, token=token)
        assert code == 200, out
    finally:
        s.stop()


def test_auth_units() -> None:
    assert parse_tokens(f"# c\n{OWN}\n{MALLORY} mallory # no writer\n", "me", "f") == {OWN: "me", MALLORY: "mallory"}
    for text, why in (("", "no token"), (f"{OWN} a b", "want TOKEN [USER]"), (f"{OWN}\n{OWN}", "the same token twice")):
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_tokens(text, "me", "f")
    a = Auth({OWN: "me"}, "me", frozenset({"me"}))
    a.check_host("127.0.0.1:8084", None)
    a.check_host("[::1]:8084", "http://[::1]:8084")
    a.check_host("localhost:8084", "http://localhost:8084")
    for host, origin in (("evil.example:8084", None), ("127.0.0.1:8084", "http://127.0.0.1:9999"), ("", None)):
        with pytest.raises(AuthError):
            a.check_host(host, origin)
    assert loopback("127.0.0.1") and loopback("::1") and not loopback("10.1.2.3") and not loopback(None)


def _outside_address() -> str | None:
    """One of this machine's addresses that is not loopback (what another machine would reach), if any."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # (no packet is sent: this only picks the outgoing address)
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if loopback(addr) or addr == "0.0.0.0" else str(addr)


def test_reads_from_off_loopback_need_the_token(tmp_path: Path) -> None:
    outside = _outside_address()
    if outside is None:
        if os.environ.get("CI") == "true":  # in CI a missing part fails, never skips
            raise RuntimeError("this machine has no address but loopback: the off-loopback rules cannot be tried")
        pytest.skip("this machine has no address but loopback")
    port = free_port()
    s = SchedProc(tmp_path / "s", [], extra=["--sim-nodes", "1", "--http", f"0.0.0.0:{port}"])
    s.start()
    try:
        token = (tmp_path / "s" / "http.token").read_text().strip()
        far, near = f"http://{outside}:{port}", f"http://127.0.0.1:{port}"
        code, out = call(far, "/api/state")
        assert code == 401 and "reads from off this machine need the scheduler's token" in out["error"], out
        code, out = call(far, "/api/state", token=token)
        assert code == 200 and out["you"] == OWNER, out
        assert call(near, "/api/state")[0] == 200  # on loopback, reading is free
        with urllib.request.urlopen(f"{far}/", timeout=10) as r:  # the page loads, to be given the token
            assert b"fornax-sched" in r.read()
    finally:
        s.stop()
