"""One aiohttp server on the daemon's own event loop, and the ``--http`` option both daemons take.

The server knows nothing of scheduling: a daemon hands it an ``aiohttp.web.Application`` with
its routes.  A default address that is taken is only a warning (the daemon runs on without
HTTP, as with AgentControl's default); an address the user gave must be served or the start fails.
"""

from __future__ import annotations

import contextlib
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


def add_health_and_metrics(app: web.Application, health: Callable[[], dict[str, Any]],
                           exposition: Callable[[], Awaitable[bytes]]) -> None:
    """``GET /health`` (JSON, never cached) and ``GET /metrics`` (Prometheus' text format), as
    every daemon serves them."""
    from .metrics import CONTENT_TYPE

    async def get_health(request: web.Request) -> web.Response:
        return web.json_response(health(), headers={"Cache-Control": "no-store"})

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=await exposition(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)


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

