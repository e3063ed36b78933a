"""One aiohttp server on the daemon's own event loop, and the ``--http`` option both daemons take.

The server knows nothing of scheduling: a daemon hands it an ``aiohttp.web.Application`` with
its routes.  A default address that is taken is only a warning (the daemon runs on without
HTTP, as with AgentControl's default); an address the user gave must be served or the start fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..persys.node import split_hostport

OFF = "off"


@dataclass(frozen=True)
class HttpConfig:
    listen: str | None  # HOST:PORT, None: off
    given: bool = False  # written on the command line: a taken address is then an error


def config_of(value: str | None, default: str | None) -> HttpConfig:
    """``--http HOST:PORT|off`` (None: not given, the default) checked; ValueError names the option."""
    text = default if value is None else value
    if text is None or text == OFF:
        return HttpConfig(None, value is not None)
    try:
        split_hostport(text)
    except ValueError as e:
        raise ValueError(f"--http: {e} or off") from None
    return HttpConfig(text, value is not None)


class Renders:
    """Renderings of /metrics, shared and paced, so that a flood of scrapes cannot take the daemon.

    A request gets the first rendering that starts after it came: every request that comes while
    one waits to start shares it (fresh for each of them: nothing rendered before a request came is
    given to it).  Renderings start at once while there are tokens, ``burst`` at first and ``rate``
    more a second, and otherwise when the next token comes.  A scraper every few seconds never
    waits; 50 clients pipelining 1,000 scrapes each, without reading, kept a scheduler's loop busy
    rendering for ever (100 % of a core, /health 130-160 ms); now they get ``rate`` renderings a
    second between them.  ``clock`` is monotonic seconds."""

    def __init__(self, render: Callable[[], Awaitable[bytes]], rate: float = 10.0, burst: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.render, self.rate, self.burst, self.clock = render, rate, burst, clock
        self.tokens, self._at = burst, clock()
        self._next: asyncio.Future[bytes] | None = None  # what requests that come now will get
        self._task: asyncio.Task[None] | None = None
        self.made = 0  # renderings started
        self.shared = 0  # requests answered with a rendering another request also got

    async def __call__(self) -> bytes:
        fut = self._next
        if fut is None:
            fut = self._next = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieved)
            self._task = asyncio.get_running_loop().create_task(self._make(fut), name="metrics-render")
        else:
            self.shared += 1
        return await asyncio.shield(fut)

    async def _make(self, fut: asyncio.Future[bytes]) -> None:
        try:
            while True:
                now = self.clock()
                self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
                self._at = now
                if self.tokens >= 1:
                    break
                await asyncio.sleep((1 - self.tokens) / self.rate)
            self.tokens -= 1
            if self._next is fut:
                self._next = None  # from here on a request waits for the next one: this one may be older
            self.made += 1
            body = await self.render()
        except BaseException as e:
            if self._next is fut:  # (stopped while it waited for a token)
                self._next = None
            if not fut.done():
                fut.set_exception(e if isinstance(e, Exception) else RuntimeError("the rendering was stopped"))
            if not isinstance(e, Exception):
                raise
        else:
            if not fut.done():
                fut.set_result(body)


def _retrieved(fut: asyncio.Future[bytes]) -> None:
    if not fut.cancelled():
        fut.exception()  # (every waiter may be gone: not an unretrieved exception then)


def add_health_and_metrics(app: web.Application, health: Callable[[], dict[str, Any]],
                           exposition: Callable[[], Awaitable[bytes]]) -> Renders:
    """``GET /health`` (JSON, never cached) and ``GET /metrics`` (Prometheus' text format), as
    every daemon serves them; /metrics through ``Renders``, which is returned."""
    from .metrics import CONTENT_TYPE

    renders = Renders(exposition)

    async def get_health(request: web.Request) -> web.Response:
        return web.json_response(health(), headers={"Cache-Control": "no-store"})

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=await renders(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)
    return renders


class HttpServer:
    """An application served on one address until ``close``."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner: web.AppRunner | None = None
        self.address: str | None = None  # HOST:PORT bound (the port chosen when 0 was asked)

    async def start(self, listen: str) -> str:
        """Bind and serve; OSError if the address cannot be had (nothing is left listening then)."""
        host, port = split_hostport(listen)
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True, backlog=256)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.runner = runner
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
        self.address = f"{shown}:{bound[1]}"
        return self.address

    async def close(self) -> None:
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await self.runner.cleanup()
            self.runner = None

