"""What happens in a scheduler, told to whoever counts it: the hook metrics.py plugs into.

The scheduler calls an ``Observer`` where things happen (a ctl command answered, a node looked
at, a commit made); the default one tells nobody, so the scheduler knows nothing of Prometheus
and its tests need none.  Every argument is from a small, fixed set of words (no container or
node names), so whoever counts by them keeps bounded labels.  ``decision`` and ``fallback`` are
called on the decider's thread too.
"""

from __future__ import annotations


class Observer:
    """The events, each with its outcome and, where it has one, the seconds it took."""

    def ctl(self, verb: str, result: str, seconds: float) -> None:
        """A ctl command answered: result ok, refused (bad input or checks), store (nothing changed:
        the store failed), frozen (not in normal mode), error (a bug)."""

    def decision(self, kind: str, seconds: float) -> None:
        """One placement decided by the policy of ``kind`` (rules, lua, yaml, platform)."""

    def fallback(self, reason: str) -> None:
        """A programmable policy did not decide: error, load, timeout, memory, bad, sandbox
        (the platform policy decided), budget (the command's budget was spent), builtin (the
        platform policy could not decide either)."""

    def round(self, result: str, seconds: float) -> None:
        """One look at a node (info, health, listing): ok, or unreachable."""

    def reconcile(self, result: str, seconds: float) -> None:
        """One reconciliation step of a node's listing: acted (stops or starts), unchanged, skipped
        (not planned: the listing and what it is compared with were as when last planned to no
        change; seconds is 0), store (the commit failed), error."""

    def commit(self, result: str, seconds: float) -> None:
        """One store transaction of the commit path: ok, conflict, not_leader, busy, compacted, error."""


NOBODY = Observer()
