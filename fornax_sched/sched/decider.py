"""Decisions off the event loop: a thread of their own, with their own copy of the state.

A policy may take its whole deadline per decision, and a Lua policy can
stall in one C call until its sandbox is killed: nothing of that may hold
the event loop, which serves every 9P client.  So every planner that
decides runs here, on one thread, against ``Decider.state``: a copy kept
the same as the service's by applying the same committed rows in the same
order (``apply`` keeps them in a backlog that the thread applies before its
next job, or once the backlog is long: a commit costs no thread wake-up).  A plan runs
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
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .state import Change, State

log = logging.getLogger("fornax_sched.sched.decider")
T = TypeVar("T")
BACKLOG = 64  # committed batches kept for the copy before the thread is woken to apply them


class Decider:
    def __init__(self, *, budget: float = 1.0, monotonic: Callable[[], float] = time.monotonic,
                 state: State | None = None) -> None:
        self.state = state or State()
        self.budget = budget
        self.monotonic = monotonic
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fornax-decide")
        self._closed = False
        self._lock = threading.Lock()  # guards the backlog, which the loop fills and the thread empties
        self._backlog: list[Callable[[], None]] = []
        self._draining = False  # a job to empty the backlog is queued

    async def plan(self, fn: Callable[[State, Callable[[], bool]], T],
                   budget: float | None = None) -> tuple[T, str]:
        """Run ``fn(state, budget_left)`` on the decider's thread, in a draft of the state undone
        afterwards; returns what it returned and, if a programmable policy spent the budget of
        ``budget`` seconds its decisions share, the line that says so ("" if not)."""
        seconds = self.budget if budget is None else budget

        def job() -> tuple[T, str]:
            self._drain()
            end = self.monotonic() + seconds
            program = self.state.cluster.program
            limit = getattr(program, "budget", None)
            with self.state.draft(), (limit(seconds) if callable(limit) else contextlib.nullcontext()) as b:
                out = fn(self.state, lambda: self.monotonic() < end)
            return out, (b.line() if b is not None and hasattr(b, "line") else "")

        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    async def call(self, fn: Callable[[State], T]) -> T:
        """Run ``fn(state)`` on the decider's thread (no draft: it may change the copy, e.g. the policy)."""
        def job() -> T:
            self._drain()
            return fn(self.state)

        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

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

        with self._lock:
            self._backlog.append(job)
            wake = len(self._backlog) >= BACKLOG and not self._draining
            self._draining |= wake
        if wake:
            self._pool.submit(self._drain).add_done_callback(_report)

    def _drain(self) -> None:
        """On the thread: apply the backlog, in commit order."""
        with self._lock:
            jobs, self._backlog, self._draining = self._backlog, [], False
        for job in jobs:
            try:
                job()
            except Exception:  # the copy no longer matches: say so loudly, and go on with the rest
                log.exception("the decider's copy of the state failed to apply a change")

    async def barrier(self) -> None:
        """Return once everything queued so far has been applied."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._drain)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=False)


def _report(fut: Future[Any]) -> None:
    exc = fut.exception()
    if exc is not None:  # the copy no longer matches: say so loudly
        log.error("the decider's copy of the state failed to apply a change", exc_info=exc)
