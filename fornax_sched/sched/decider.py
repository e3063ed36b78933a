"""Decisions off the event loop: a thread of their own, with their own copy of the state.

A policy may take its whole deadline per decision, and a Lua policy can
stall in one C call until its sandbox is killed: nothing of that may hold
the event loop, which serves every 9P client.  So every planner that
decides runs here, on one thread, against ``Decider.state``: a copy kept
the same as the service's by applying the same committed rows in the same
order (``apply`` queues them behind whatever is running).  A plan runs
inside a draft of the copy's cluster, undone when it returns, so the copy
only ever holds committed state between jobs.

A command's decisions share one budget: once it is spent, a programmable
policy hands the rest of the command's decisions to the platform policy
(``budget_left`` lets a planner stop early instead, as the pending pass
does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .state import Change, State

log = logging.getLogger("fornax_sched.sched.decider")
T = TypeVar("T")


class Decider:
    def __init__(self, *, budget: float = 1.0, monotonic: Callable[[], float] = time.monotonic,
                 state: State | None = None) -> None:
        self.state = state or State()
        self.budget = budget
        self.monotonic = monotonic
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fornax-decide")
        self._closed = False

    async def plan(self, fn: Callable[[State, Callable[[], bool]], T],
                   budget: float | None = None) -> tuple[T, str]:
        """Run ``fn(state, budget_left)`` on the decider's thread, in a draft of the state undone
        afterwards; returns what it returned and, if a programmable policy spent the budget of
        ``budget`` seconds its decisions share, the line that says so ("" if not)."""
        seconds = self.budget if budget is None else budget

        def job() -> tuple[T, str]:
            end = self.monotonic() + seconds
            program = self.state.cluster.program
            limit = getattr(program, "budget", None)
            with self.state.draft(), (limit(seconds) if callable(limit) else contextlib.nullcontext()) as b:
                out = fn(self.state, lambda: self.monotonic() < end)
            return out, (b.line() if b is not None and hasattr(b, "line") else "")

        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    async def call(self, fn: Callable[[State], T]) -> T:
        """Run ``fn(state)`` on the decider's thread (no draft: it may change the copy, e.g. the policy)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, self.state)

    def apply(self, changes: Iterable[Change], statuses: Iterable[tuple[str, str]] = (),
              foreign: dict[str, set[str]] | None = None) -> None:
        """Queue committed rows (and observed node statuses) for the copy, in commit order."""
        changes, statuses, foreign = list(changes), list(statuses), dict(foreign or {})
        if not (changes or statuses or foreign) or self._closed:
            return

        def job() -> None:
            self.state.apply(changes)
            for node, status in statuses:
                self.state.set_status(node, status)
            for node, names in foreign.items():
                self.state.observe_foreign(node, names)

        self._pool.submit(job).add_done_callback(_report)

    async def barrier(self) -> None:
        """Return once everything queued so far has been applied."""
        await asyncio.get_running_loop().run_in_executor(self._pool, lambda: None)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=False)


def _report(fut: Future[Any]) -> None:
    exc = fut.exception()
    if exc is not None:  # the copy no longer matches: say so loudly
        log.error("the decider's copy of the state failed to apply a change", exc_info=exc)
