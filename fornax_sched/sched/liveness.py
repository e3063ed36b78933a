"""Whether each node is online, suspect or dead, from the times of its last answers.

A pure table in the manner of ``node.gossip.PeerTable``: the service tells
it when a node answered (``ok``) or failed (``failed``) and what its peers'
gossip says (``peers_say``), and asks ``tick(now)`` what changed.  Time is
only what the caller passes in.  Nothing here waits for a node: a node
whose calls hang (a SIGSTOPped daemon) stops answering, and the table
declares it suspect, then dead, from the clock alone.

- ``unknown``: known from the store, not yet reached since the start;
- ``online``: answered within ``suspect_after``;
- ``suspect``: a call failed, or no answer for ``suspect_after``;
- ``dead``: no answer for ``dead_after`` (counted from the start for a node
  never reached), or never reached since the start while its peers say it
  is dead; or declared dead from outside (``expire``: a Persys agent's
  lease ran out), until ``release``.  Its containers are placed again elsewhere.

Looks are paced by the cluster's size, the way Nomad scales its heartbeat
TTLs: ``look_every`` gives the seconds between looks at each node so that
the scheduler makes at most ``max_looks`` a second in all, never more
often than the configured interval; the table's times then scale by the
same factor (``pace``), so a node gets as many looks to answer as at the
configured interval, however large the cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def look_every(interval: float, nodes: int, max_looks: float) -> float:
    """Seconds between looks at each of ``nodes`` so that all of them take at most ``max_looks`` a
    second: ``interval`` while that holds, else the next whole multiple of ``interval`` that keeps
    it (whole steps, so the pace changes a few times as a cluster grows, not with every node)."""
    if max_looks <= 0 or nodes <= max_looks * interval:
        return interval
    return interval * math.ceil(nodes / (max_looks * interval) - 1e-9)


@dataclass(frozen=True, slots=True)
class Transition:
    node: str
    was: str
    now: str
    why: str


@dataclass(slots=True)
class _Seen:
    status: str = "unknown"
    last_ok: float | None = None  # None: not reached since the start
    last_error: str = ""
    peers_dead: bool = False
    added: float = 0.0
    held: bool = False  # declared dead from outside (an agent's lease ran out): answers do not revive it


class Liveness:
    def __init__(self, *, suspect_after: float, dead_after: float) -> None:
        if not 0 < suspect_after <= dead_after:
            raise ValueError("want 0 < suspect_after <= dead_after")
        self.suspect_after = self.base_suspect = suspect_after
        self.dead_after = self.base_dead = dead_after
        self.factor = 1.0
        self._nodes: dict[str, _Seen] = {}

    def pace(self, factor: float) -> bool:
        """Scale the suspect and dead times by ``factor`` (>= 1: looks came further apart); whether
        they changed."""
        factor = max(factor, 1.0)
        if factor == self.factor:
            return False
        self.factor = factor
        self.suspect_after, self.dead_after = self.base_suspect * factor, self.base_dead * factor
        return True

    def add(self, node: str, now: float) -> None:
        self._nodes.setdefault(node, _Seen(added=now))

    def forget(self, node: str) -> None:
        self._nodes.pop(node, None)

    def status(self, node: str) -> str:
        s = self._nodes.get(node)
        return s.status if s is not None else "unknown"

    def last_ok(self, node: str) -> float | None:
        s = self._nodes.get(node)
        return s.last_ok if s is not None else None

    def silent_since(self, node: str) -> float | None:
        """Since when the node has not answered: its last answer, or when it was added if none came."""
        s = self._nodes.get(node)
        if s is None:
            return None
        return s.last_ok if s.last_ok is not None else s.added

    def last_error(self, node: str) -> str:
        s = self._nodes.get(node)
        return s.last_error if s is not None else ""

    # ------------------------------------------------------------ what happened
    def ok(self, node: str, now: float) -> list[Transition]:
        s = self._nodes.setdefault(node, _Seen(added=now))
        if s.held:
            return []
        s.last_ok = now if s.last_ok is None else max(s.last_ok, now)
        s.last_error = ""
        s.peers_dead = False
        return self._move(node, s, "online", "answering")

    def failed(self, node: str, now: float, error: str) -> list[Transition]:
        s = self._nodes.setdefault(node, _Seen(added=now))
        s.last_error = error
        out = []
        if s.status in ("online", "unknown"):
            out = self._move(node, s, "suspect", error)
        return out + self.tick(now, only=node)

    def expire(self, node: str, why: str) -> list[Transition]:
        """The node is dead whatever its calls do (an agent's lease ran out), until ``release``."""
        s = self._nodes.get(node)
        if s is None:
            return []
        s.held, s.last_error = True, why
        return self._move(node, s, "dead", why)

    def release(self, node: str) -> None:
        """An expired node is heard from again (it registered, or heartbeats): its answers count again."""
        s = self._nodes.get(node)
        if s is not None:
            s.held = False

    def peers_say(self, node: str, status: str, now: float) -> list[Transition]:
        s = self._nodes.get(node)
        if s is None:
            return []
        s.peers_dead = status == "dead"
        return self.tick(now, only=node)

    def tick(self, now: float, only: str | None = None) -> list[Transition]:
        """What the passing of time means: nodes that fell silent become suspect, then dead."""
        out: list[Transition] = []
        # (items() as it is: _move changes a node's record, never the table, and a list of 10,000
        # pairs made every second outlived young collections and brought on full ones)
        items = [(only, self._nodes[only])] if only is not None and only in self._nodes else self._nodes.items()
        for node, s in items:
            if s.status == "dead":
                continue
            since = s.last_ok if s.last_ok is not None else s.added
            silent = now - since
            if silent >= self.dead_after:
                out += self._move(node, s, "dead", f"unreachable for {silent:.1f}s: {_why(s, silent)}")
            elif s.last_ok is None and s.peers_dead:
                out += self._move(node, s, "dead", f"never reached, and its peers say it is dead: {_why(s, silent)}")
            elif s.status == "online" and silent >= self.suspect_after:
                out += self._move(node, s, "suspect", _why(s, silent))
        return out

    @staticmethod
    def _move(node: str, s: _Seen, status: str, why: str) -> list[Transition]:
        if s.status == status:
            return []
        was, s.status = s.status, status
        return [Transition(node, was, status, why)]


def _why(s: _Seen, silent: float) -> str:
    """(made only for a node that moves: a tick looks at every node, every second)"""
    return s.last_error or f"no answer for {silent:.1f}s"
