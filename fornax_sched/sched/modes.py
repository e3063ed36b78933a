"""The scheduler's operating mode: what it will do, and why.

``normal``: commands change state and nodes are reconciled.  ``degraded``
(the store cannot be read or written) and ``recovery`` (the store is
reachable but empty where state was expected) freeze change; the reason
says what the scheduler saw, ``since`` when (the scheduler's clock).

The mode is decided here, as a function of what the scheduler last saw of
its store (``Seen``) and the time, with no I/O: the service probes the store,
records what it saw and asks ``decide``; it reacts to the answer (refusing
commands, pausing reconciliation, logging the change).
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

    def refusal(self, stamp: str) -> str:
        """Why a change is refused in this mode (the reason first: it names the store and the cause)."""
        what = ("until the store is back" if self.name == DEGRADED
                else "until the operator restores the state (ctl: recover, or fornax-sched store import)")
        return f"{self.reason} (the scheduler is {self.name} since {stamp}: changes are refused {what})"


@dataclass(frozen=True)
class Seen:
    """What the scheduler last saw of its store.

    ``read_error``: the last look at the store failed (why); ``write_error``: the last
    write failed and none has succeeded since (why); ``identity``: the cluster identity
    the store holds (None: none, the store is empty), ``expected`` the one this
    scheduler's state belongs to.
    """

    read_error: str = ""
    write_error: str = ""
    identity: str | None = ""
    expected: str = ""
    where: str = ""  # the store, as messages name it


def decide(mode: Mode, seen: Seen, now: float) -> Mode:
    """The mode after ``seen``: the same object while the mode's name holds (its first reason and
    ``since`` are kept), else a new one since ``now``.

    Recovery is left only for normal: a store that fails while empty stays in recovery (it is
    still empty as far as anyone knows), and an empty store is never called normal again until
    it holds the state (the operator's ``recover`` or an import).
    """
    if seen.read_error or seen.write_error:
        if mode.name == RECOVERY:
            return mode
        name, reason = DEGRADED, seen.read_error or seen.write_error
    elif seen.identity is None:
        name = RECOVERY
        reason = (f"the store {seen.where} is reachable but holds no state (no identity) where "
                  f"the state of cluster {seen.expected} was expected")
    elif seen.expected and seen.identity and seen.identity != seen.expected:
        name = RECOVERY
        reason = (f"the store {seen.where} holds the state of cluster {seen.identity}, "
                  f"not of cluster {seen.expected}")
    else:
        name, reason = NORMAL, ""
    if name == mode.name:
        return mode
    return Mode(name, reason, now)
