"""The scheduler's HTTP routes: ``/health`` and ``/metrics`` (docs/http.8.md), the page (docs/web.8.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..sched.metrics import SchedMetrics
from ..sched.modes import NORMAL
from ..sched.state import stamp
from . import page
from .auth import Auth
from .http import add_health_and_metrics

if TYPE_CHECKING:
    from ..sched.service import Scheduler


def health(sched: Scheduler) -> dict[str, Any]:
    """The Persys shape (status, mode, reason, modeChangedAt), and who leads.

    Made from memory alone, so it is answered while the store is down.
    """
    mode = sched.mode
    return {"status": "ok" if mode.name == NORMAL else mode.name, "mode": mode.name, "reason": mode.reason,
            "modeChangedAt": stamp(mode.since), "leading": sched.leading,
            "leader": sched.leader if sched.replicated else None, "replicated": sched.replicated}


def build(sched: Scheduler, metrics: SchedMetrics | None = None, auth: Auth | None = None) -> web.Application:
    if metrics is None:
        metrics = SchedMetrics()
        metrics.watch(sched)
    app = web.Application(client_max_size=1 << 20)
    add_health_and_metrics(app, lambda: health(sched), metrics.render)
    app["sched"] = sched
    app["metrics"] = metrics
    page.add_routes(app, sched, auth)  # the web page and its API (docs/web.8.md)
    return app
