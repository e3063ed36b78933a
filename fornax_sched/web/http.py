"""One aiohttp server on the daemon's own event loop, and the ``--http`` option both daemons take.

The server knows nothing of scheduling: a daemon hands it an ``aiohttp.web.Application`` with
its routes.  A default address that is taken is only a warning (the daemon runs on without
HTTP, as with AgentControl's default); an address the user gave must be served or the start fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..fs.server import file_limit
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
                           exposition: Callable[[], Awaitable[bytes]]) -> None:
    """``GET /health`` (JSON, never cached) and ``GET /metrics`` (Prometheus' text format), as
    every daemon serves them; /metrics through ``Renders``."""
    from .metrics import CONTENT_TYPE

    renders = Renders(exposition)

    async def get_health(request: web.Request) -> web.Response:
        return web.json_response(health(), headers={"Cache-Control": "no-store"})

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=await renders(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)


IDLE = 15.0  # seconds a connection may stay open with no request (aiohttp's default: an hour)


def default_max_connections() -> int:
    """HTTP connections at most: a 64th of the file limit, 16 to 256 (the 9P server keeps an eighth
    of the limit for the process's other files, fs/server.py; these come out of it)."""
    return max(16, min(256, file_limit() // 64))


class _Counted(asyncio.Protocol):
    """One HTTP connection, as the server counts it: aiohttp's handler, with the time it last sent."""

    def __init__(self, server: HttpServer, handler: asyncio.Protocol) -> None:
        self.server, self.handler = server, handler
        self.transport: asyncio.BaseTransport | None = None
        self.active = time.monotonic()
        self.streams = 0  # responses streaming on it now (see ``streaming``)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server._opened(self)
        self.handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.pop(self, None)
        self.handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.active = time.monotonic()
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


@contextlib.contextmanager
def streaming(request: web.Request) -> Iterator[None]:
    """While a response streams on ``request``'s connection (the log's server-sent events), which
    sends nothing after its request: another connection is closed first when there are too many."""
    t = request.transport
    conn = t.get_protocol() if t is not None else None
    if isinstance(conn, _Counted):
        conn.streams += 1
    try:
        yield
    finally:
        if isinstance(conn, _Counted):
            conn.streams -= 1


class HttpServer:
    """An application served on one address until ``close``, with at most ``max_connections`` open:
    a connection past them closes the one that sent nothing for longest, a streaming one last (so that whoever holds
    many idle connections cannot keep others out, nor take the files the 9P server needs), and a
    connection with no request for ``IDLE`` seconds is closed."""

    def __init__(self, app: web.Application, max_connections: int | None = None) -> None:
        self.app = app
        self.runner: web.AppRunner | None = None
        self.address: str | None = None  # HOST:PORT bound (the port chosen when 0 was asked)
        self.max_connections = max_connections or default_max_connections()
        self._listener: asyncio.Server | None = None
        self._conns: dict[_Counted, None] = {}  # open connections, oldest first
        self.evicted = 0

    async def start(self, listen: str) -> str:
        """Bind and serve; OSError if the address cannot be had (nothing is left listening then)."""
        host, port = split_hostport(listen)
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=1.0, keepalive_timeout=IDLE)
        await runner.setup()
        handlers = runner.server
        assert handlers is not None
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                lambda: _Counted(self, handlers()), host, port, reuse_address=True,
                # (the loop accepts up to a backlog at once before any is counted)
                backlog=max(16, min(256, 2 * self.max_connections)))
        except BaseException:
            await runner.cleanup()
            raise
        self.runner = runner
        bound = self._listener.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
        self.address = f"{shown}:{bound[1]}"
        return self.address

    def _opened(self, conn: _Counted) -> None:
        self._conns[conn] = None
        while len(self._conns) > self.max_connections:
            quiet = [c for c in self._conns if not c.streams] or list(self._conns)
            oldest = min(quiet, key=lambda c: c.active)
            self._conns.pop(oldest)
            self.evicted += 1
            if oldest.transport is not None:
                oldest.transport.abort()  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await self.runner.cleanup()
            self.runner = None
