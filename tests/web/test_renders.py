"""/metrics renderings, shared and paced (web/http.py ``Renders``): a flood of scrapes gets a
bounded number of renderings, and every answer is rendered after its request came."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from fornax_sched.web.http import Renders

from ..helpers import free_port, run, wait_until
from ..sched.harness import SchedProc


class Slow:
    """A renderer whose renderings are numbered, each held until ``go`` is set (when ``hold``)."""

    def __init__(self, hold: bool = False) -> None:
        self.count = 0
        self.hold = hold
        self.go = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self) -> bytes:
        self.count += 1
        n = self.count
        self.started.set()
        if self.hold:
            await self.go.wait()
        return str(n).encode()


def test_requests_that_come_together_share_one_rendering() -> None:
    async def main() -> None:
        slow = Slow()
        renders = Renders(slow)
        got = await asyncio.gather(*(renders() for _ in range(20)))
        assert got == [b"1"] * 20 and slow.count == 1 and renders.shared == 19

    run(main())


def test_a_request_never_gets_a_rendering_that_began_before_it_came() -> None:
    async def main() -> None:
        slow = Slow(hold=True)
        renders = Renders(slow)
        first = asyncio.ensure_future(renders())
        await slow.started.wait()  # rendering 1 has begun
        second = asyncio.ensure_future(renders())  # so this one waits for rendering 2
        await asyncio.sleep(0.01)
        slow.go.set()
        assert (await first, await second) == (b"1", b"2")
        assert await renders() == b"3"  # and one after both: fresh again

    run(main())


def test_past_the_burst_renderings_start_at_the_rate() -> None:
    async def main() -> None:
        slow = Slow()
        renders = Renders(slow, rate=50.0, burst=2.0)
        began = time.monotonic()
        for _ in range(12):
            await renders()
        took = time.monotonic() - began
        assert slow.count == 12 and renders.made == 12
        assert took >= (12 - 2) / 50 * 0.9, took  # ten renderings waited for a token each

    run(main())


def test_a_rendering_that_fails_fails_its_requests_and_the_next_one_renders_again() -> None:
    async def main() -> None:
        calls = [0]

        async def flaky() -> bytes:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("collector broke")
            return b"ok"

        renders = Renders(flaky)
        results = await asyncio.gather(renders(), renders(), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results), results
        assert await renders() == b"ok"

    run(main())


def _renderings(text: str) -> float:
    m = re.search(r"^fornax_sched_metrics_render_seconds_count (\S+)$", text, re.M)
    assert m, text[:400]
    return float(m.group(1))


@pytest.mark.timeout(120)
def test_a_flood_of_pipelined_scrapes_that_nobody_reads_gets_few_renderings(tmp_path: Path) -> None:
    """30 connections each send 200 GET /metrics at once and never read: the scheduler renders
    at most its burst and then 10 a second, and /health is still answered."""
    port = free_port()
    sched = SchedProc(tmp_path / "s", [], extra=["--sim-nodes", "3", "--http", f"127.0.0.1:{port}"])
    socks: list[socket.socket] = []
    try:
        sched.start()
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: urllib.request.urlopen(url + "/health", timeout=5).status == 200, 30)
        began = time.monotonic()
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            try:
                s.send(request)
            except BlockingIOError:
                pass
            socks.append(s)
        time.sleep(2.0)
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            made = _renderings(r.read().decode())
        elapsed = time.monotonic() - began
        # 6,000 scrapes asked for; the burst (300) and 10 a second since, and a few of the test's own
        assert made <= 300 + 10 * elapsed + 5, (made, elapsed)
    finally:
        for s in socks:
            s.close()
        sched.stop()
