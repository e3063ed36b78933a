"""The scheduler's HTTP side through a real ``fornax-sched serve``: /health in every mode, /metrics,
and the --http option's errors (a taken address, a bad one)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fornax_sched import exitcodes

from ..helpers import free_port, run, wait_until
from ..node.cluster import read
from ..sched.harness import SchedProc, ctl


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def health(base: str) -> dict:  # type: ignore[type-arg]
    code, kind, body = get(f"{base}/health")
    assert code == 200 and kind.startswith("application/json")
    return json.loads(body)  # type: ignore[no-any-return]


def test_health_and_metrics_of_a_scheduler(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sched = SchedProc(tmp_path / "s", [], extra=["--sim-nodes", "3", "--http", f"127.0.0.1:{port}"])
    try:
        sched.start()
        h = health(base)
        assert (h["status"], h["mode"], h["reason"], h["leading"]) == ("ok", "normal", "", True)
        assert h["modeChangedAt"].endswith("Z") and h["leader"] is None
        run(ctl(sched.addr, "place hello name=web replicas=2"))
        run(ctl(sched.addr, "place hello name=big cpu>=64"))
        code, kind, text = get(f"{base}/metrics")
        assert code == 200 and kind.startswith("text/plain; version=0.0.4")
        assert 'fornax_sched_mode{mode="normal"} 1.0' in text and 'fornax_sched_mode{mode="degraded"} 0.0' in text
        assert "fornax_sched_leader 1.0" in text
        assert 'fornax_sched_nodes{kind="sim",status="online"} 3.0' in text, text
        assert 'fornax_sched_placements{status="unschedulable"} 1.0' in text
        assert "web-1" not in text and "sim-0001" not in text  # no names in labels
        assert f"HTTP on http://127.0.0.1:{port}/" in run(read(sched.addr, "cluster/scheduler/log"))
    finally:
        sched.stop()


def test_health_says_degraded_while_the_store_fails(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "s" / "sched.db"
    flag = Path(f"{db}.fail")
    sched = SchedProc(tmp_path / "s", [], extra=["--store", f"faulty:{db}", "--sim-nodes", "2",
                                                 "--http", f"127.0.0.1:{port}"], module="tests.store.faulty")
    try:
        sched.start()
        base = f"http://127.0.0.1:{port}"
        time.sleep(1.0)  # quiet by now: the start's lines are written, and nothing else needs writing
        flag.write_text("database or disk is full")
        h = wait_until(lambda: (h := health(base))["mode"] == "degraded" and h, timeout=10)
        assert h["status"] == "degraded" and "disk is full" in h["reason"] and str(db) in h["reason"], h
        assert 'fornax_sched_mode{mode="degraded"} 1.0' in get(f"{base}/metrics")[2]
        flag.unlink()
        back = wait_until(lambda: (h := health(base))["mode"] == "normal" and h, timeout=10)
        assert back["status"] == "ok" and back["modeChangedAt"] > h["modeChangedAt"]
    finally:
        sched.stop()


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fornax_sched", "serve", "--listen", f"tcp!127.0.0.1!{free_port()}",
                           "--state", str(tmp_path / "x"), "--control", "off", *args],
                          capture_output=True, text=True, timeout=60)


def test_http_option_errors(tmp_path: Path) -> None:
    bad = _serve(tmp_path, "--http", "nowhere")
    assert bad.returncode == 2 and "--http: bad address 'nowhere': want HOST:PORT or off" in bad.stdout, bad
    port = free_port()
    holder = SchedProc(tmp_path / "h", [], extra=["--http", f"127.0.0.1:{port}"])
    try:
        holder.start()
        taken = _serve(tmp_path, "--http", f"127.0.0.1:{port}")
        assert taken.returncode == exitcodes.IN_USE, taken
        assert f"fornax-sched serve: --http 127.0.0.1:{port}: " in taken.stdout and "in use" in taken.stdout, taken
    finally:
        holder.stop()


@pytest.mark.parametrize("where", ["--http", "--control"])
def test_idle_connections_to_http_or_agentcontrol_cannot_take_the_files_9p_needs(tmp_path: Path, where: str) -> None:
    """With a file limit of 160, 200 connections that send nothing to the scheduler's HTTP or its
    AgentControl (gRPC): each keeps only its share of them (HTTP 16, closing the one that sent
    nothing for longest; gRPC a 32nd of the limit, refusing the rest), so a 9P client still gets
    in and places.  Before, they took every file and 9P's Tversion timed out."""
    import resource
    import socket

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    port = free_port()
    sched = SchedProc(tmp_path / "s", [], extra=["--sim-nodes", "2", where, f"127.0.0.1:{port}"], preexec=limit)
    socks: list[socket.socket] = []
    try:
        sched.start()
        assert sched.proc is not None
        fds = Path(f"/proc/{sched.proc.pid}/fd")
        for _ in range(200):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:  # refused or timed out: it is full, which is the point
                pass
        wait_until(lambda: len(list(fds.iterdir())) < 80, 10)
        assert "hello-1 node=sim-000" in run(ctl(sched.addr, "place hello")), "9P was kept out"
        if where == "--http":
            assert health(f"http://127.0.0.1:{port}")["status"] == "ok"
    finally:
        for s in socks:
            s.close()
        sched.stop()


def test_past_its_connections_http_closes_the_idlest_and_a_stream_last() -> None:
    """Three connections at most: a fourth closes the one that sent nothing for longest, but not the
    one streaming a response (the log's events), which sent nothing since its request either."""
    import asyncio

    from aiohttp import web

    from fornax_sched.web.http import HttpServer, streaming

    async def stream(request: web.Request) -> web.StreamResponse:
        with streaming(request):
            resp = web.StreamResponse()
            await resp.prepare(request)
            for i in range(50):
                await resp.write(f"tick {i}\n".encode())
                await asyncio.sleep(0.05)
            return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/stream", stream)
        server = HttpServer(app, max_connections=3)
        host, port = (await server.start("127.0.0.1:0")).rsplit(":", 1)
        try:
            r, w = await asyncio.open_connection(host, int(port))
            w.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"tick 0" in await r.readuntil(b"tick 0\n")
            idle = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
            await asyncio.sleep(0.2)
            assert b"tick 5" in await asyncio.wait_for(r.readuntil(b"tick 5\n"), 5)  # the stream goes on
            assert await asyncio.wait_for(idle[0][0].read(), 5) == b""  # the idlest was closed
            assert server.evicted == 2 and len(server._conns) == 3
            for _, iw in idle:
                iw.close()
            w.close()
        finally:
            await server.close()

    run(main())
