"""The scheduler's operating mode: what it will do, and why.

``normal``: commands change state and nodes are reconciled.  ``degraded``
(the store cannot be read or written) and ``recovery`` (the store is
reachable but empty where state was expected) freeze change; the reason
says what the scheduler saw, ``since`` when (the scheduler's clock).
"""

from __future__ import annotations

from dataclasses import dataclass

NORMAL, DEGRADED, RECOVERY = "normal", "degraded", "recovery"


@dataclass(frozen=True)
class Mode:
    name: str = NORMAL
    reason: str = ""
    since: float = 0.0

    def line(self, stamp: str) -> str:
        """As ctl and /cluster/scheduler/mode show it: ``mode NAME since STAMP[: REASON]``."""
        return f"mode {self.name} since {stamp}" + (f": {self.reason}" if self.reason else "")
