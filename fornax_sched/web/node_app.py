"""A node's HTTP routes: ``/health`` and ``/metrics`` (docs/fornax-node.8.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from .http import add_health_and_metrics

if TYPE_CHECKING:
    from ..node.daemon import NodeDaemon
    from ..node.metrics import NodeMetrics


def health(node: NodeDaemon) -> dict[str, Any]:
    """From memory: the node's name, id, whether it takes containers, and how many run."""
    return {"status": "ok", "node": node.name, "id": node.id, "joined": node.joined,
            "running": len(node.running()), "addr": node.addr}


def build(node: NodeDaemon, metrics: NodeMetrics) -> web.Application:
    app = web.Application(client_max_size=1 << 16)
    add_health_and_metrics(app, lambda: health(node), metrics.render)
    return app
