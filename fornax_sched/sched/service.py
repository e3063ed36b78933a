"""The scheduler service: planners, the store and the nodes, driven.

Every change follows one path, ``_submit``: a planner (plans.py,
reconcile.py) computes a Plan from the state and ``now``; plans submitted
together are planned one on top of the other and their rows and log lines
committed to the store in one batch (``_execute``); only then are they
applied to memory (this state, and the decider's copy) and only then does
``_act`` touch nodes.  A failed commit changes nothing anywhere, and a
command answers with the store's reason.  Planners that decide run on the
decider's thread (decider.py), so no policy ever holds the event loop.
One lock orders planning and committing; acting on nodes happens outside
it, concurrently.

Three kinds of loop keep the world moving toward the state: one per node
(list its containers, plan what the listing means, act: reconcile.py), a
liveness ticker (online, suspect, dead from the times of the last answers:
liveness.py; a dead node's containers are decided again), housekeeping
(pending placements when capacity may have appeared) and the persister
(observed statuses and log lines not yet stored).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..policy import Limits, Loaded, PolicyError
from ..units import format_size, human_size
from . import drift, lang, plans, reconcile
from .backends import (
    CLUSTER_LABEL,
    Backend,
    BackendError,
    ContainerInfo,
    Discovery,
    Health,
    Logs,
    NodeInfo,
    NodeRefused,
    NodeUnreachable,
    NoSuchContainer,
    Spec,
    connect,
)
from .core import simple
from .decider import Decider
from .liveness import Liveness, Transition, look_every
from .logbook import LogBook, capped
from .model import Policy, Request
from .modes import NORMAL, RECOVERY, Mode, Seen, decide
from .observe import NOBODY, Observer
from .plans import CommandError, Plan, Stop
from .policies import Policies
from .state import WAITING, State, replica_order, stamp
from .store import Batch, Compacted, Conflict, NotLeader, Store, StoreBusy, StoreError
from .store.api import LogLine

log = logging.getLogger("fornax_sched.sched")
T = TypeVar("T")

LOG_LINES = 10_000  # log lines kept in memory for the log file (the store keeps more)
SMALL = 16  # decisions a command may make on the event loop under the built-in policy (see _run_group)
GROUP = 64  # plans planned and committed together at most
# Small plans planned together on the event loop at most; a bigger group goes to the decider's
# thread, where the loop takes turns with it (64 reconcile plans on the loop held it 50-90 ms at
# 10,000 nodes, and every 9P and HTTP request waited that long).
LOOP_GROUP = 8
MAX_LEARNING = 64  # peers' addresses (learnt from nodes' gossip) reached at once, at most
PEER_TRIES = 10  # tries, an interval apart, at a learnt address that does not answer; then as long a rest
MAX_JOINING = 1000  # seeds and joins not reached yet, at most: 2,000 of them dialled every second took half a core
JOIN_BACKOFF = 10  # intervals, at most, between two tries at a seed or a join that does not answer
QUOTE = 120  # characters of a refused command quoted in the log
_TICK = 0.05  # seconds between the ticks that see whether the loop stood still during a look at the store
# Looks at nodes a second at most, all nodes together: 500 nodes are looked at every interval, 10,000
# every 20 (Nomad's 50 heartbeats a second give 10,000 nodes a TTL of 200 s).  At 10,000 simulated
# nodes holding 100,000 placements, 500 looks a second took 7-9 % of a core (most of them quiet:
# see _quiet); 10,000 a second (every node every second) saturated the loop.
MAX_LOOKS = 500.0
WRITE_EVERY = 2.0  # seconds without a commit after which a look at the store writes too (an idle disk may be full)
QUIET_LOOKS = 10  # a node's looks in a row left unplanned when nothing changed; the next is planned anyway
LOOK_TRIES = 4  # tries of one look at the store, while the scheduler's own loop made each one late (_look)

__all__ = ["CommandError", "Frozen", "Scheduler"]


class Frozen(StoreError):
    """A change refused because the scheduler is not in normal mode: the message says why (modes.py)."""


@dataclass
class Link:
    """The scheduler's connection to one node."""

    backend: Backend
    addr: str
    task: asyncio.Task[None] | None = None
    rounds: int = 0
    # the newest listing not yet reconciled: (containers, when listed, its listing_key, the node's version)
    listing: tuple[list[ContainerInfo], float, int, int] | None = None
    quiet: tuple[int, int] | None = None  # (listing_key, version) last planned to no change (see _quiet)
    skipped: int = 0  # looks in a row not planned because nothing had changed
    reconciler: asyncio.Task[None] | None = None  # planning and acting on the listings, one at a time
    health: Health | None = None  # what the node last said of its load and memory (every few rounds)


@dataclass
class Outcome:
    """What acting on a plan's nodes gave: the refusals of starts, by name."""

    refused: dict[str, str] = field(default_factory=dict)


@dataclass
class Group:
    """What the planners of one group share: the time their decisions may take, and the placements
    being acted on (those of earlier plans of the group included)."""

    left: Callable[[], bool]
    busy: set[str]
    acted: dict[str, float]


Planner = Callable[[State, Group], Plan]


@dataclass
class _Job:
    planner: Planner
    small: bool  # may be planned on the event loop (see _run_group)
    future: asyncio.Future[Plan]


class Scheduler:
    """One scheduler: its state, its store, its nodes."""

    def __init__(self, store: Store, *, seeds: Iterable[str] = (), interval: float = 1.0,
                 dead_after: float = 10.0, node_timeout: float = 5.0,
                 connect: Callable[[str], Backend] | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, limits: Limits | None = None,
                 budget: float = 1.0, probe_timeout: float = 1.2, max_looks: float = MAX_LOOKS,
                 forget_dead: float = 0.0) -> None:
        self.store = store
        self.state = State()  # committed: what the file tree reads
        # The decider's copy shares the one copy of each request and repeated string with it.
        self.decider = Decider(budget=budget, monotonic=monotonic,
                               state=State(_requests=self.state._requests, _text=self.state._text))
        self.policies = Policies(self.decider.state.cluster, self._note_from_thread, limits=limits)
        self.book = LogBook(LOG_LINES)
        self.liveness = Liveness(suspect_after=min(dead_after, max(node_timeout + interval, 3 * interval)),
                                 dead_after=dead_after)
        self.links: dict[str, Link] = {}  # by node name
        self.seeds = list(seeds)
        self.interval = interval
        self.max_looks = max_looks  # looks at nodes a second, all nodes together (0: no cap): see _pace
        self.look_every = interval  # seconds between looks at each node, as paced now
        self.node_timeout = node_timeout
        # The longest one call to a node may take (the slowest backend followed): an action's claim on
        # its names outlives three of them (a migrate's stop, destroy and start) before it lapses.
        self._call_bound = node_timeout
        self.forget_dead = forget_dead  # seconds a node may stay dead before it is forgotten (0: never)
        self._forgot_at = -math.inf  # when dead nodes were last looked over for it
        self.connect = connect or (lambda addr: _connect(addr, node_timeout))
        self.clock = clock
        self.monotonic = monotonic
        self._mutate = asyncio.Lock()  # one plan-and-commit at a time
        self._jobs: list[_Job] = []  # plans waiting to be planned (see _submit)
        self._grouping = False  # a caller or a task is planning groups
        self._grouper: asyncio.Task[None] | None = None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fornax-policy-load")
        self._unsaved: list[LogLine] = []  # log lines (with their times) not yet in the store
        self._dirty: set[str] = set()  # placements whose observed status is newer in memory than in the store
        # Placements being acted on (name -> [actions under way, since when]), and when each
        # was last acted on: a listing that began before cannot show what was done.
        self._busy: dict[str, list[float]] = {}
        self._acted: dict[str, float] = {}
        self._pruned = 0.0  # when _acted was last pruned
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []  # the scheduler's own (the store's watch)
        self._lead_tasks: list[asyncio.Task[None]] = []  # those only a leader runs: nodes, liveness, pending work
        self.leading = False  # deciding and acting on nodes (one scheduler alone always does)
        # Set on a follower (replicas.py): a ctl or policy write goes to the leader, and its answer back.
        self.forward: Callable[[str, str, str], Awaitable[str]] | None = None
        self._addrs: set[str] = set()
        self._learning: set[str] = set()  # peers' addresses (learnt from nodes) being reached now
        self._joining: dict[str, asyncio.Task[None]] = {}  # seeds' and joins' addresses being reached now
        self._peer_retry: dict[str, tuple[float, int]] = {}  # a learnt address given up on: (not before, times)
        self._store_error = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.started = clock()
        self.mode = Mode(NORMAL, "", self.started)  # see modes.py
        self._seen = Seen(identity=store.cluster, expected=store.cluster, where=store.where)
        self.probe_every = min(interval, 0.25)  # seconds between looks at the store
        self.probe_timeout = probe_timeout  # seconds a look may take before the store counts as away (_look)
        self.store_slow_looks = 0  # looks late while the loop stood still (asked again at once)
        self._wrote_at = monotonic()  # when the store last took a write (a commit, a look that wrote)
        self._probing: asyncio.Task[None] | None = None  # a look at the store after a failed commit
        self._held: set[str] = set()  # nodes whose liveness moved while the mode froze change
        self._led_at = 0.0  # when this scheduler began leading (see _settle)
        self.leader: str | None = None  # the leading replica's address, when several share a store
        self.drift = drift.DriftBook()  # what /cluster/scheduler/drift lists (see _drift_step)
        self.drift_interval = 30.0  # seconds between a node's drift comparisons (0: none)
        self._drift_at: dict[str, float] = {}  # node -> when last compared (monotonic)
        self._drift_now: set[str] = set()  # nodes to compare at their next listing (they came back)
        self._revisions: dict[Request, str] = {}
        self.replicated = False  # one of several replicas on one store (replicas.py)
        self.relead: Callable[[], Awaitable[None]] | None = None  # a replica's: lead again before recover
        self._early: dict[str, tuple[str, asyncio.Task[str]]] = {}  # starts under way before their commit
        self._undoing: set[asyncio.Task[None]] = set()  # stopping starts whose commit failed
        self.observer: Observer = NOBODY  # told what happens (metrics.py); see observed_by

    def observed_by(self, observer: Observer) -> None:
        """Tell ``observer`` what happens from now on: commands, looks at nodes, commits, and the
        decisions of both copies of the state (the decider's, on its thread, and this one's)."""
        self.observer = observer
        for cluster in (self.state.cluster, self.decider.state.cluster):
            cluster.observe_decisions(observer.decision, time.perf_counter)
        self.policies.on_fallback = observer.fallback

    # ================================================================ life
    async def start(self, lead: bool = True) -> None:
        """Load the state; lead at once (one scheduler alone), or wait to be made leader (replicas.py)."""
        self._loop = asyncio.get_running_loop()
        self.replicated = self.replicated or not lead
        await self._load()
        self._tasks.append(asyncio.create_task(self._store_watch(), name="sched-store-watch"))
        if lead:
            self.begin_leading()

    def begin_leading(self) -> None:
        """Decide and act: follow the nodes the state names and the seeds, run liveness and pending work."""
        if self.leading or self._closing:
            return
        self.leading = True
        self.forward = None
        now = self.monotonic()
        for name, meta in self.state.nodes.items():
            self.liveness.add(name, now)
            if meta.addr and name not in self.links:
                with contextlib.suppress(ValueError):  # an address no backend serves: noted, left dead
                    self._link(name, meta.addr)
        for addr in self.seeds:
            self._try_addr(addr)
        self._led_at = self.monotonic()
        self._lead_tasks.append(asyncio.create_task(self._housekeeping(), name="sched-housekeeping"))
        self._lead_tasks.append(asyncio.create_task(self._ticker(), name="sched-liveness"))
        self._lead_tasks.append(asyncio.create_task(self._persister(), name="sched-persist"))

    async def end_leading(self) -> None:
        """Step down: stop acting on nodes (what is under way ends; its commits are refused by the store)."""
        if not self.leading:
            return
        self.leading = False
        tasks: list[asyncio.Task[Any]] = [*self._lead_tasks, *(t for lk in self.links.values()
                                                               for t in (lk.task, lk.reconciler) if t is not None)]
        self._lead_tasks = []
        tasks += [t for _, t in self._early.values()] + list(self._undoing)
        self._early.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        links, self.links = self.links, {}
        self._addrs.clear()
        self._learning.clear()
        self._joining.clear()
        self._peer_retry.clear()
        self._busy.clear()
        self._dirty.clear()
        self._unsaved = []
        self._held.clear()
        for lk in links.values():
            with contextlib.suppress(Exception):
                await lk.backend.close()

    async def close(self) -> None:
        self._closing = True
        tasks: list[asyncio.Task[Any]] = [*self._tasks, *self._lead_tasks, *(
            t for lk in self.links.values() for t in (lk.task, lk.reconciler) if t is not None)]
        if self._probing is not None:
            tasks.append(self._probing)
        tasks += [t for _, t in self._early.values()] + list(self._undoing)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.leading:
            with contextlib.suppress(StoreError):
                await self._flush_log()
        for lk in self.links.values():
            with contextlib.suppress(Exception):
                await lk.backend.close()
        await self.decider.call(lambda st: self.policies.close())
        self.decider.close()
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def _load(self) -> None:
        """Read the store into both copies of the state, a few thousand rows at a time."""
        for table in ("nodes", "meta", "policies", "placements"):
            async for items in self.store.scan(table):
                rows = [(table, it.key, it.value) for it in items]
                if table == "meta":
                    self.drift.load({it.key: it.value for it in items})
                self.state.apply(rows)
                self.decider.apply(rows)
        self.state.sort_pending()
        await self.decider.call(lambda st: st.sort_pending())
        for at, line in sorted(await self.store.log_tail(LOG_LINES), key=lambda t: t[0]):  # (stable)
            self.book.add(f"{stamp(at)} {line}")
        # The policy last: its sandbox starts with the cluster's placements known.
        await self.decider.call(lambda st: self.policies.load(dict(st.policies), self.clock()))
        self._same_rules()
        self.note(f"scheduler started: {len(self.state.cluster.nodes)} nodes, {len(self.state.records)} placements "
                  f"from the store, policy {self.policies.label()}")

    # ================================================================ the log
    def note(self, line: str) -> None:
        """A log line outside a plan: in memory now, in the store with the next commit."""
        line, at = capped(line), self.clock()
        self.book.add(f"{stamp(at)} {line}")
        if self.leading or not self.replicated:  # (a follower's own lines are its own: the log is the leader's)
            self._unsaved.append((at, line))
        log.info("%s", line)

    def _note_from_thread(self, line: str) -> None:
        """What the policy says, from the decider's thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.note, line)

    async def _flush_log(self) -> None:
        """Write what is only in memory: log lines noted outside a plan, and observed statuses
        (in normal mode only: a degraded or recovering store is left as it is)."""
        if (self._unsaved or self._dirty) and self.mode.name == NORMAL:
            async with self._mutate:
                plan = Plan(self.clock())
                dirty, self._dirty = self._dirty, set()
                for name in dirty:
                    if name in self.state.records:
                        plan.put("placements", name, self.state.placement_row(name))
                try:
                    await self._execute(plan, observed=False, remembered=True)
                except BaseException:
                    self._dirty |= dirty
                    raise

    def _store_failed(self, e: StoreError) -> None:
        """A store failure outside a command: logged once until it changes."""
        if isinstance(e, Frozen):
            return  # the mode's change was logged
        if str(e) != self._store_error:
            self._store_error = str(e)
            log.error("%s", e)
            self.note(f"store: {e}")

    # ================================================================ the store's mode (modes.py)
    def _frozen(self) -> Frozen:
        return Frozen(self.mode.refusal(stamp(self.mode.since)))

    def mode_text(self) -> str:
        return self.mode.line(stamp(self.mode.since)) + "\n"

    def _settled(self) -> bool:
        return all(lk.rounds > 0 for lk in self.links.values()) and not any(
            not t.done() for t in self._lead_tasks if t.get_name().startswith("sched-discover-"))

    async def _settle(self) -> None:
        """Just after it began leading (a start, an election), a command waits a moment, until every
        node has been looked at once (bounded: 2 intervals and a second), so that it is not decided
        on nodes that only look down because nobody asked them yet."""
        bound = self._led_at + 2 * self.interval + 1.0
        while self.leading and not self._settled() and self.monotonic() < bound:
            await asyncio.sleep(0.02)

    async def _store_watch(self) -> None:
        """Look at the store every ``probe_every`` seconds: reachable, holding this cluster's state,
        and (while a write failed) writable again.  Each look is bounded by ``probe_timeout``."""
        while not self._closing:
            await asyncio.sleep(self.probe_every)
            # A scheduler with nothing to commit (a quiet cluster) would not learn that its disk
            # filled up until a user's command failed: it writes a little itself now and then.
            idle = (self.leading or not self.replicated) and self.monotonic() - self._wrote_at >= WRITE_EVERY
            await self._step("looking at the store", self._probe(write=bool(self._seen.write_error) or idle))

    def _store_suspect(self, cause: str) -> None:
        """A commit failed: look at the store at once (apart), writing too; if that fails, degraded."""
        if self._probing is None or self._probing.done():
            self._probing = asyncio.get_running_loop().create_task(self._probe(write=True, cause=cause),
                                                                   name="sched-store-probe")

    async def _look(self, ask: Callable[[], Awaitable[str | None]], what: str) -> str | None:
        """One look at the store, each try bounded by ``probe_timeout``.  A refusal counts at once,
        and so does a silence while this scheduler's loop was free to hear the answer.  But when the
        loop itself stood still for a quarter of the timeout or more meanwhile (long steps, a garbage
        collection: a scheduler of 10,000 nodes), the late answer may be the scheduler's own doing:
        the look is asked again at once, for up to ``LOOK_TRIES`` tries in all, after which the
        silence counts whatever the loop did."""
        loop = asyncio.get_running_loop()
        clock = [0.0, 0.0]  # the last tick, and how long the loop stood still since the try began

        async def tick() -> None:
            while True:
                await asyncio.sleep(_TICK)
                now = loop.time()
                clock[1] += max(0.0, now - clock[0] - _TICK)
                clock[0] = now

        tries = 0
        while True:
            tries += 1
            clock[:] = [loop.time(), 0.0]
            ticker = loop.create_task(tick(), name="sched-store-look-tick")
            try:
                return await asyncio.wait_for(ask(), self.probe_timeout)
            except TimeoutError:
                stood = clock[1] + max(0.0, loop.time() - clock[0] - _TICK)
                if tries >= LOOK_TRIES or stood < self.probe_timeout / 4:
                    raise StoreError(f"cannot {what} the store {self.store.where}: no answer within "
                                     f"{self.probe_timeout:g}s" + (f", {tries} times in a row while the "
                                                                  f"scheduler was busy" if tries > 1 else "")
                                     ) from None
                self.store_slow_looks += 1
            finally:
                ticker.cancel()

    async def _probe(self, write: bool, cause: str = "") -> None:
        seen = self._seen
        try:
            ident = await self._look(self.store.probe, "read")
        except StoreError as e:
            self._saw(dataclasses.replace(seen, read_error=str(e)))
            return
        seen = dataclasses.replace(seen, read_error="", identity=ident)
        if write and ident == seen.expected and self.mode.name != RECOVERY:
            try:
                await self._look(lambda: self.store.probe(write=True), "write")
            except StoreError as e:
                seen = dataclasses.replace(seen, write_error=cause or str(e))
            else:
                seen = dataclasses.replace(seen, write_error="")
                self._wrote_at = self.monotonic()
        self._saw(seen)

    def _saw(self, seen: Seen) -> None:
        """Record what a look at the store showed; if the mode changes, say so and react."""
        self._seen = seen
        new = decide(self.mode, seen, self.clock())
        if new is self.mode:
            return
        old, self.mode = self.mode, new
        line = f"mode {new.name} (was {old.name})" + (f": {new.reason}" if new.reason else "")
        (log.warning if new.name != NORMAL else log.info)("%s", line)
        self.note(line)
        if new.name == NORMAL:
            self._resume()

    def _resume(self) -> None:
        """Back to normal: what was paused goes on from what is true now (not from what happened meanwhile)."""
        held, self._held = self._held, set()
        moves = []
        for node in sorted(held):
            n = self.state.cluster.nodes.get(node)
            now = self.liveness.status(node)
            if n is not None and n.status != now:
                moves.append(Transition(node, n.status, now, self.liveness.last_error(node)))
        if moves:
            self._lead_tasks.append(asyncio.get_running_loop().create_task(
                self._step("liveness", self._transitions(moves)), name="sched-resume"))
        for name, lk in self.links.items():
            if lk.listing is not None and (lk.reconciler is None or lk.reconciler.done()):
                lk.reconciler = asyncio.get_running_loop().create_task(self._reconcile(name, lk),
                                                                       name=f"sched-reconcile-{name}")
        self._kick.set()

    def _rows(self) -> dict[str, dict[str, Any]]:
        """The last known state as the store's rows."""
        st = self.state
        return {"nodes": {n: st.node_row(n) for n in st.cluster.nodes},
                "placements": {n: st.placement_row(n) for n in st.records},
                "meta": {f"seq/{stem}": n for stem, n in st.seq.items()},
                "policies": dict(st.policies)}

    def _book_lines(self) -> list[tuple[float, str]]:
        """The log as memory holds it, as (time, line): what ``recover`` writes back."""
        out = []
        for text in self.book.tail(LOG_LINES):
            at_s, _, line = text.partition(" ")
            try:
                at = calendar.timegm(time.strptime(at_s[:19], "%Y-%m-%dT%H:%M:%S")) + int(at_s[20:23]) / 1000
            except ValueError:
                continue
            out.append((at, line))
        return out

    async def _cmd_recover(self, cmd: lang.Command) -> str:
        """In recovery mode: write the last known state (rows and log) back to the store."""
        if self.mode.name != RECOVERY:
            raise CommandError(f"recover: the scheduler is {self.mode.name}, not in recovery: nothing to do"
                               + (f" ({self.mode.reason})" if self.mode.reason else ""))
        if self.relead is not None:
            await self.relead()
        async with self._mutate:
            rows = self._rows()
            ident = {"cluster": self.store.cluster, "created": self.clock(), "format": 1,
                     "recovered": self.clock()}
            lines = self._book_lines()
            line = (f"recover (by {cmd.user or '-'}): wrote back {len(rows['placements'])} placements, "
                    f"{len(rows['nodes'])} nodes, {len(rows['policies'])} policy rows and {len(lines)} log lines")
            at = self.clock()
            restore = getattr(self.store, "replace", None)
            if restore is None:
                raise CommandError(f"recover: the store {self.store.where} cannot be written whole")
            await restore(rows, lines + [(at, line)], ident)
            self._unsaved = []
            self.book.add(f"{stamp(at)} {line}")
            log.info("%s", line)
        await self._probe(write=False)
        return line + f"\n{self.mode_text()}"

    # ================================================================ following (replicas.py)
    async def replicate(self, rows: list[tuple[str, str, Any]], lines: list[tuple[float, str]]) -> None:
        """What the leader committed, seen through a watch: made true in both copies of the state."""
        if rows:
            self.state.apply(rows)
            self.decider.apply(rows)
            self.state.sort_pending()
            if any(table == "policies" for table, _, _ in rows):
                await self._reload_policy()
        for at, line in lines:
            self.book.add(f"{stamp(at)} {line}")

    async def resync(self) -> None:
        """Make memory hold exactly what the store holds (after a watch lost its place, or a step-down)."""
        rows: list[tuple[str, str, Any]] = []
        mine = self._rows()
        for table in ("nodes", "meta", "policies", "placements"):
            seen: set[str] = set()
            async for items in self.store.scan(table):
                for it in items:
                    seen.add(it.key)
                    rows.append((table, it.key, it.value))
            rows += [(table, key, None) for key in mine[table] if key not in seen]
        await self.replicate(rows, [])
        await self.decider.call(lambda st: st.sort_pending())

    async def _reload_policy(self) -> None:
        def reload(st: State) -> Any:
            old = self.policies.program
            self.policies.load(dict(st.policies), self.clock())
            return old if old is not None and old is not self.policies.program else None

        old = await self.decider.call(reload)
        self._same_rules()
        if old is not None:
            old.close()

    # ================================================================ the one path of change
    async def _execute(self, plan: Plan, observed: bool = True, remembered: bool = False) -> None:
        """Commit a plan's rows and log, then make them true in memory.  The caller holds _mutate.

        StoreError if the store cannot take it: then nothing changed.  A plan
        that only records what nodes reported (a container running, ended,
        refused; see ``observes_only``) changes no intent: it is made true in
        memory at once and written to the store with the next flush, a fraction
        of a second later (after a crash the nodes tell it again).  That flush's
        rows are copied from memory (``remembered``): they are only written.
        """
        # Each line keeps the time it is shown with, in the store too: after a restart the log reads
        # as it did (lines noted outside a plan reach the store with a later commit).
        at = self.clock()
        texts = [capped(line) for line in plan.log]
        lines: list[LogLine] = [(at, text) for text in texts]
        if observed and plan.changes and observes_only(self.state, plan):
            self._dirty.update(k for _, k in plan.changes)
            self._unsaved += lines
        elif plan.durable or self._unsaved:
            batch = Batch()
            for table, key, value in plan.rows():
                if value is None:
                    batch.delete(table, key)
                else:
                    batch.put(table, key, value)
            saved, self._unsaved = self._unsaved, []  # (lines noted while this commits wait for the next)
            batch.log = saved + lines
            began = time.perf_counter()
            try:
                await self.store.apply(batch)
            except BaseException as e:
                self.observer.commit(_commit_result(e), time.perf_counter() - began)
                self._unsaved = saved + self._unsaved
                if isinstance(e, StoreError) and not isinstance(e, (Conflict, Compacted, NotLeader, StoreBusy)):
                    self._store_suspect(str(e))
                raise
            self.observer.commit("ok", time.perf_counter() - began)
            self._store_error = ""
            self._wrote_at = self.monotonic()
        if not remembered:
            rows = plan.rows()
            self.state.apply(rows)
            for node, status in plan.statuses:
                self.state.set_status(node, status)
            for node, names in plan.foreign.items():
                self.state.observe_foreign(node, names)
            self.decider.apply(rows, plan.statuses, plan.foreign)
        for text in texts:
            self.book.add(f"{stamp(at)} {text}")
            log.info("%s", text)
        if plan.kick:
            self._kick.set()

    # ================================================================ plans, grouped
    async def _submit(self, planner: Planner, small: bool = True) -> Plan:
        """Plan, commit and apply: the one way the state changes.  Returns the committed plan
        (for its caller to act on); CommandError or StoreError if it was refused.

        Plans submitted while others are being made are planned together, each on top of the ones
        before it, and committed in one transaction: eight writers pay one commit, not eight in a row.
        """
        if self.mode.name != NORMAL:
            raise self._frozen()
        loop = asyncio.get_running_loop()
        job = _Job(planner, small, loop.create_future())
        self._jobs.append(job)
        if not self._grouping:
            # Nobody is planning: this caller does, until its own plan is made (no task to start,
            # which a lone writer would pay every time); what others queued meanwhile, a task takes.
            self._grouping = True
            try:
                await self._run_jobs(until=job)
            finally:
                self._hand_over()
        return await job.future

    def _hand_over(self) -> None:
        """Planning stops here: what is still queued goes to a task of its own."""
        self._grouping = bool(self._jobs)
        if self._jobs:
            self._grouper = asyncio.get_running_loop().create_task(self._run_jobs(), name="sched-plans")

    async def _run_jobs(self, until: _Job | None = None) -> None:
        try:
            while self._jobs and (until is None or not until.future.done()):
                jobs, self._jobs = self._jobs[:GROUP], self._jobs[GROUP:]
                try:
                    await self._run_group(jobs)
                except BaseException as e:  # every plan of the group not yet answered learns why
                    err = e if isinstance(e, Exception) else StoreError("the scheduler is stopping")
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(err)
                    if not isinstance(e, Exception):
                        raise
        finally:
            if until is None:
                self._hand_over()

    async def _run_group(self, jobs: list[_Job]) -> None:
        """Plan a group (on the decider's thread, or here if every plan is small and the built-in
        policy decides: a few decisions the cluster's indexes answer at once, see core.simple),
        commit it once, apply it, answer each plan's caller."""
        async with self._mutate:
            busy = set(self._busy_now())
            if len(jobs) <= LOOP_GROUP and all(j.small for j in jobs) and self.decider.state.cluster.program is None:
                results = _plan_all(self.state, jobs, Group(lambda: True, busy, self._acted))
            else:
                acted = dict(self._acted)  # (the decider's thread reads it while this one goes on)
                results, spent = await self.decider.plan(
                    lambda st, left: _plan_all(st, jobs, Group(left, busy, acted)))
                first = next((r for r in results if isinstance(r, Plan)), None)
                if spent and first is not None:
                    first.note(spent)
            made = [(j, r) for j, r in zip(jobs, results, strict=True) if isinstance(r, Plan)]
            merged = Plan(self.clock())
            for _, plan in made:
                merged.extend(plan)
            early = self._start_early(merged)
            try:
                if early:  # the starts go out to their nodes first; the commit is made while they run
                    await asyncio.sleep(0)
                await self._execute(merged)
            except BaseException as e:
                if early:  # the refusal says "nothing changed": so it must be, on the nodes too
                    await asyncio.shield(self._discard_early(early))
                if not isinstance(e, StoreError):
                    raise
                for j, _ in made:
                    if not j.future.done():
                        j.future.set_exception(e)
            else:
                for j, plan in made:
                    self._claim(_acting(plan) - early)  # (the early starts are claimed already)
                    if not j.future.done():
                        j.future.set_result(plan)
            for j, r in zip(jobs, results, strict=True):
                if isinstance(r, BaseException) and not j.future.done():
                    j.future.set_exception(r)

    def _same_rules(self) -> None:
        """The served state's cluster decides by the same text rules as the decider's (for small plans)."""
        rules = self.decider.state.cluster.policy
        if self.state.cluster.policy != rules:
            self.state.cluster.set_policy(rules)

    # ================================================================ acting on nodes
    async def _act(self, plan: Plan) -> Outcome:
        """Carry out a committed plan on the nodes: its stops, then its starts, each concurrently.
        Its placements stay claimed (the reconcilers keep off them) until all of it is done."""
        out = Outcome()
        try:
            if plan.stops:
                await _each(self._stop(s) for s in plan.stops)
            if plan.starts:
                results = await _each(self._start(name) for name in plan.starts)
                out.refused = {name: err for name, err in zip(plan.starts, results, strict=True) if err}
        finally:
            self._release(_acting(plan))
        return out

    def _spec(self, name: str, req: Request) -> Spec:
        return Spec(name, req.image, req.args, req.cpus, req.mem,
                    labels=((CLUSTER_LABEL, self.store.cluster),), env=req.env).with_revision()

    def _start_early(self, plan: Plan) -> set[str]:
        """Start the containers of new placements while their plan commits, so that the store's
        fsync and the node's start overlap (the answer still waits for both).

        The world may run ahead of the record only by containers of ours that no record names,
        and those are what reconciliation stops and destroys (reconcile.py): a crash before the
        commit leaves nothing behind for long.  The names are claimed, so no reconciler acts on a
        listing that shows one meanwhile; a commit that fails stops them at once."""
        names: set[str] = set()
        if self.mode.name != NORMAL or not self.leading:
            return names
        for name, (node, req) in plan.placing.items():
            lk = self.links.get(node)
            if lk is None or name in self._early:
                continue
            task = asyncio.create_task(lk.backend.run(self._spec(name, req)), name=f"sched-start-{name}")
            self._early[name] = (node, task)
            names.add(name)
        self._claim(names)
        return names

    async def _discard_early(self, names: set[str]) -> None:
        """Their plan was not committed: stop and destroy what was started, before the refusal is
        answered (each call is bounded by the node timeout)."""
        undos = []
        for name in names:
            node, task = self._early.pop(name)
            undo = asyncio.create_task(self._undo_start(name, node, task), name=f"sched-unstart-{name}")
            self._undoing.add(undo)
            undo.add_done_callback(self._undoing.discard)
            undos.append(undo)
        await asyncio.gather(*undos, return_exceptions=True)

    async def _undo_start(self, name: str, node: str, task: asyncio.Task[str]) -> None:
        try:
            try:
                cid = await task
            except BackendError:
                return  # it did not start
            lk = self.links.get(node)
            if lk is not None:
                try:
                    await lk.backend.stop(cid)
                    await lk.backend.destroy(cid)
                    self.note(f"{name}: started on {node} as {cid} while its place was committed, which "
                              f"failed: destroyed")
                except BackendError as e:  # reconciliation stops it later (ours, with no record)
                    self.note(f"{name}: started on {node} as {cid}, but its place was not committed, and "
                              f"stopping it failed ({e}); reconciliation will")
        finally:
            self._release({name})

    async def _start(self, name: str) -> str | None:
        """Run one placement on its node (or take the start already under way, see _start_early);
        the node's refusal, if it refused."""
        early = self._early.pop(name, None)
        started: Awaitable[str]
        if early is not None:
            node, started = early
        else:
            p = self.state.cluster.placements.get(name)
            r = self.state.records.get(name)
            lk = self.links.get(p.node) if p is not None and p.node is not None else None
            if p is None or r is None or p.node is None or lk is None or r.want != "run":
                return None
            node, started = p.node, lk.backend.run(self._spec(name, p.request))
        refused = None
        try:
            cid = await started
        except NodeRefused as e:
            refused = why = str(e)
            await self._observe(lambda st, g: plans.plan_refused(st, name, node, why, self.clock()))
        except NodeUnreachable as e:
            err = str(e)
            await self._observe(lambda st, g: plans.plan_unreachable(st, name, node, err, self.clock()))
        else:
            await self._observe(lambda st, g: plans.plan_started(st, name, node, cid, self.clock()))
        return refused

    async def _stop(self, s: Stop) -> None:
        lk = self.links.get(s.node)
        err = ""
        if lk is not None and s.cid:
            try:
                await lk.backend.stop(s.cid)
                if s.destroy:
                    await lk.backend.destroy(s.cid)
            except NoSuchContainer:
                pass  # already gone: what we wanted
            except BackendError as e:
                err = str(e)
        await self._observe(lambda st, g: plans.plan_stopped(st, s, err, self.clock()))

    async def _observe(self, planner: Planner) -> None:
        """Plan and commit what acting showed, then act on it (a start that must be stopped again)."""
        try:
            plan = await self._submit(planner)
        except StoreError as e:
            self._store_failed(e)
            return
        if plan.stops or plan.starts:
            await self._act(plan)

    def _claim(self, names: set[str]) -> None:
        at = self.monotonic()
        for name in names:
            held = self._busy.setdefault(name, [0.0, at])
            held[0] += 1
            held[1] = at

    def _release(self, names: set[str]) -> None:
        at = self.monotonic()
        for name in names:
            held = self._busy.get(name)
            if held is not None:
                held[0] -= 1
                if held[0] <= 0:
                    del self._busy[name]
            self._acted[name] = at

    def _busy_now(self) -> frozenset[str]:
        """Names being acted on; a claim older than any action can take lapses (nothing stays stuck)."""
        now = self.monotonic()
        limit = now - (max(4 * self.node_timeout, 3 * self._call_bound) + 10)
        for name in [n for n, (_, at) in self._busy.items() if at < limit]:
            del self._busy[name]
        if len(self._acted) > 10_000 and now - self._pruned > 1.0:
            # No listing started before this is still under way (a round's calls are bounded):
            # its marks can go.
            self._pruned = now
            oldest = now - (2 * self.node_timeout + self.interval + 1)
            self._acted = {n: at for n, at in self._acted.items() if at > oldest}
        return frozenset(self._busy)

    # ================================================================ commands
    async def command(self, text: str, user: str = "-") -> str:
        """Carry out one ctl command; the answer is what a read of ctl gives back.

        A refused command is logged with the reason (quoted in part): a
        9P2000.L client sees only the errno, and the log is where its user
        finds the words.
        """
        began, verb, result = time.perf_counter(), self._verb_of(text), "error"
        try:
            if self.forward is not None:
                answer = await self.forward("ctl", text, user)
                result = "ok"
                return answer
            await self._settle()
            try:
                try:
                    cmd = lang.parse_command(text)
                except lang.LangError as e:
                    result = "refused"
                    raise CommandError(str(e)) from None
                cmd.user = user
                handler = getattr(self, f"_cmd_{cmd.verb}")
                try:
                    answer = str(await handler(cmd))
                    result = "ok"
                    return answer
                except Frozen as e:
                    result = "frozen"
                    raise CommandError(f"nothing changed: {e}") from None
                except StoreError as e:
                    result = "store"
                    raise CommandError(f"nothing changed: {e}") from None
                except CommandError:
                    result = "refused"
                    raise
            except CommandError as e:
                quoted = text.strip()
                quoted = quoted if len(quoted) <= QUOTE else quoted[:QUOTE] + f"... ({len(quoted)} characters)"
                self.note(f"refused {quoted!r}: {str(e).splitlines()[0] if str(e) else ''}")
                raise
        except CommandError:
            if result == "error":
                result = "refused"
            raise
        finally:
            self.observer.ctl(verb, result, time.perf_counter() - began)

    def _verb_of(self, text: str) -> str:
        """The command's verb as metrics label it: one of the known verbs, or "invalid" (bounded)."""
        words = text[:32].split(None, 1)
        verb = words[0] if words else ""
        return verb if verb.isidentifier() and hasattr(self, f"_cmd_{verb}") else "invalid"

    def _label(self) -> str:
        return self.policies.label()

    async def _cmd_place(self, cmd: lang.Command) -> str:
        req = cmd.request
        assert req is not None
        label, marked = self._label(), tuple(cmd.marked)
        plan = await self._submit(
            lambda st, g: plans.plan_place(st, req, req.replicas, self.clock(), label, marked=marked),
            small=req.replicas <= SMALL and simple(req))
        return await self._finish_place(plan)

    async def _finish_place(self, plan: Plan) -> str:
        """Start what a place decided; if the nodes refused every one (a bad image, say), that is the error."""
        out = await self._act(plan)
        if out.refused and len(out.refused) == len(plan.report):
            why = next(iter(out.refused.values()))
            await self._submit(lambda st, g: plans.plan_unplace(st, plan.report, why, self.clock()))
            raise CommandError(why)
        return plan.answer + "".join(self._answer(name) for name in plan.report)

    def _answer(self, name: str) -> str:
        p = self.state.cluster.placements.get(name)
        r = self.state.records.get(name)
        if p is None or r is None:
            return f"{name} removed\n"
        tail = f" ({r.detail})" if r.detail else ""
        return f"{name} node={p.node or '-'} status={r.status}{tail}\n"

    async def _run_plan(self, plan: Plan) -> str:
        await self._act(plan)
        return plan.answer + "".join(self._answer(name) for name in plan.report)

    async def _cmd_stop(self, cmd: lang.Command) -> str:
        word, user = cmd.targets[0], cmd.user or "-"
        plan = await self._submit(lambda st, g: plans.plan_each(
            st, word, self.clock(), lambda name: plans.plan_stop(st, name, self.clock(), user)))
        return await self._run_plan(plan)

    async def _cmd_start(self, cmd: lang.Command) -> str:
        word = cmd.targets[0]
        names = plans.targets(self.state, word)
        label = self._label()
        small = len(names) <= SMALL and all(simple(self.state.cluster.placements[n].request) for n in names)
        plan = await self._submit(lambda st, g: plans.plan_each(
            st, word, self.clock(), lambda name: plans.plan_start(st, name, self.clock(), label)), small=small)
        return await self._run_plan(plan)

    async def _cmd_remove(self, cmd: lang.Command) -> str:
        word = cmd.targets[0]
        plan = await self._submit(lambda st, g: plans.plan_each(
            st, word, self.clock(), lambda name: plans.plan_remove(st, name, self.clock())))
        await self._act(plan)
        return plan.answer

    async def _cmd_scale(self, cmd: lang.Command) -> str:
        group, want = cmd.targets[0], cmd.count
        label = self._label()
        plan = await self._submit(lambda st, g: plans.plan_scale(st, group, want, self.clock(), label), small=False)
        if plan.answer:  # scaled down
            await self._act(plan)
            return plan.answer
        return await self._finish_place(plan)

    async def _cmd_migrate(self, cmd: lang.Command) -> str:
        name, src, dst = cmd.targets
        plan = await self._submit(lambda st, g: plans.plan_migrate(st, name, src, dst, self.clock()))
        return await self._run_plan(plan)

    async def _cmd_evacuate(self, cmd: lang.Command) -> str:
        node = cmd.targets[0]
        plans.node_of(self.state, node)
        label = self._label()
        plan = await self._submit(lambda st, g: plans.plan_evacuate(st, node, self.clock(), label), small=False)
        await self._act(plan)
        return plan.answer

    async def _cmd_rebalance(self, cmd: lang.Command) -> str:
        limit = cmd.count or 10
        label = self._label()
        plan = await self._submit(
            lambda st, g: plans.plan_rebalance(st, limit, self.clock(), label, frozenset(g.busy)), small=False)
        await self._act(plan)
        return plan.answer

    async def _cmd_join(self, cmd: lang.Command) -> str:
        """Follow one more node, found at an address (an operator's new node; an agent that registered
        with a follower, whose registration is forwarded here)."""
        addr = cmd.targets[0]
        if self.mode.name != NORMAL:
            raise self._frozen()
        for name, lk in self.links.items():
            if lk.addr == addr:
                return f"{addr} is node {name} already\n"
        try:
            backend = self.connect(addr)
        except ValueError as e:
            raise CommandError(f"join {addr}: {e}") from None
        await backend.close()
        if addr in self._addrs:
            return f"joining {addr}: already being reached; its name is learnt on first contact\n"
        if len(self._joining) >= MAX_JOINING:
            raise CommandError(f"join {addr}: {len(self._joining)} addresses are being joined and have not answered "
                               f"yet, the most there may be: forget some (the log names them)")
        self.note(f"join {addr} (by {cmd.user})")
        self._try_addr(addr)
        return f"joining {addr}: its name is learnt on first contact (see /cluster/nodes)\n"

    async def _cmd_forget(self, cmd: lang.Command) -> str:
        """Drop a dead node (its row, its link, its liveness), or stop trying an address not reached yet."""
        target = cmd.targets[0]
        if self.mode.name != NORMAL:
            raise self._frozen()
        if target in self.state.cluster.nodes:
            return await self._forget(target, cmd.user or "-")
        reaching = self._joining.pop(target, None)
        if reaching is not None:
            reaching.cancel()
            self._addrs.discard(target)
            self.note(f"forget {target} (by {cmd.user}): no longer tried")
            return f"{target}: no longer tried\n"
        raise CommandError(f"forget {target}: no such node, nor an address being joined "
                           f"(nodes: {', '.join(sorted(self.state.cluster.nodes)) or 'none'})")

    async def _forget(self, node: str, user: str, why: str = "") -> str:
        """Commit a dead node's forgetting, then let go of it: its link, its liveness."""
        plan = await self._submit(lambda st, g: plans.plan_forget(st, node, self.clock(), user, self.replicated, why))
        lk = self.links.pop(node, None)
        self.liveness.forget(node)
        self._drift_now.discard(node)
        if lk is not None:
            self._addrs.discard(lk.addr)
            for task in (lk.task, lk.reconciler):
                if task is not None:
                    task.cancel()
            await lk.backend.close()
            self._pace()
        return plan.answer

    async def _forget_long_dead(self) -> None:
        """Forget the nodes dead for longer than ``forget_dead`` (as Nomad collects down nodes)."""
        now = self.monotonic()
        if self.forget_dead <= 0 or self.mode.name != NORMAL or now - self._forgot_at < min(self.forget_dead / 4, 60):
            return  # (a look over every node, once a minute at most: 10,000 of them take a few ms)
        self._forgot_at = now
        for node in [n for n in self.links if self.liveness.status(n) == "dead"]:
            since = self.liveness.silent_since(node)
            if since is not None and now - since >= self.forget_dead and node in self.state.cluster.nodes:
                with contextlib.suppress(CommandError):  # (it answered meanwhile: it stays)
                    await self._forget(node, "scheduler", f"dead for {_age(now - since)} (--forget-dead)")

    async def _cmd_cordon(self, cmd: lang.Command, on: bool = True) -> str:
        node = cmd.targets[0]
        plan = await self._submit(lambda st, g: plans.plan_cordon(st, node, on, self.clock()))
        return plan.answer

    async def _cmd_uncordon(self, cmd: lang.Command) -> str:
        return await self._cmd_cordon(cmd, on=False)

    async def _cmd_simulate(self, cmd: lang.Command) -> str:
        req = cmd.request
        assert req is not None
        label, marked = self._label(), tuple(cmd.marked)
        program = self.policies.program

        def simulate(st: State, left: Callable[[], bool]) -> str:
            with program.aside() if program is not None else contextlib.nullcontext():
                return plans.plan_simulate(st, req, self.clock(), label, marked)

        answer, spent = await self.decider.plan(simulate)
        return answer + (spent + "\n" if spent else "")

    # ================================================================ policy
    def policy_text(self) -> str:
        return self.policies.source_text()

    async def set_policy(self, text: str, by: str = "-") -> str:
        """Check a policy (syntax, then a dry run) and make it active; CommandError if it is refused."""
        if self.forward is not None:
            return await self.forward("policy", text, by)
        if self.mode.name != NORMAL:
            raise CommandError(f"policy refused, the old one stays: {self._frozen()}")
        try:
            # Loading may stall (a policy stuck at load time): on a thread of its own, bounded by the
            # load budget; then the dry run against the cluster, on the decider's thread.
            prepared = await asyncio.get_running_loop().run_in_executor(self._loader, self.policies.prepare, text)
            loaded = await self.decider.call(lambda st: self.policies.dry_run(prepared))
        except PolicyError as e:
            self.note(f"policy refused: {str(e).splitlines()[0]}")
            raise CommandError(f"policy refused, the old one stays: {e}") from None
        async with self._mutate:
            v, rows = self.policies.plan_version(loaded, self.clock(), by)
            plan = Plan(self.clock(), kick=True)
            for table, key, value in rows:
                plan.put(table, key, value)
            plan.note(f"policy v{v.n} ({v.kind}, by {by}): {v.title() if v.kind != 'rules' else _one_line(text)}")
            try:
                await self._execute(plan)
            except BaseException:
                if loaded.program is not None:
                    loaded.program.close()
                raise
            old = await self.decider.call(lambda st: self.policies.install(v, loaded))
            self._same_rules()
        if old is not None:
            old.close()
        return f"policy v{v.n} active: {self.policies.label()}\n"

    async def _checked(self, text: str) -> Loaded:
        """A policy through the checks of a write (syntax, loading in a sandbox, the dry run against
        the live cluster), made active nowhere; PolicyError says why not.  The caller closes its program."""
        prepared = await asyncio.get_running_loop().run_in_executor(self._loader, self.policies.prepare, text)
        return await self.decider.call(lambda st: self.policies.dry_run(prepared))

    async def check_policy(self, text: str) -> str:
        """What a policy write would say of ``text``, changing nothing (the web page's validate):
        CommandError with the same words as a refused write."""
        try:
            loaded = await self._checked(text)
        except PolicyError as e:
            raise CommandError(f"policy refused: {e}") from None
        try:
            return loaded.passed("the live cluster", len(self.state.cluster.nodes), len(self.state.records)) + "\n"
        finally:
            loaded.close()

    async def simulate_policy(self, text: str, place: str) -> str:
        """What ``place IMAGE [CONSTRAINT ...]`` would decide on the live cluster if ``text`` were the
        policy: ctl's ``simulate`` with a policy not yet written.  The draft decides on the decider's
        thread in a draft of its state, the active policy is put back before anything else plans."""
        try:
            cmd = lang.parse_command(place if place.lstrip().startswith("simulate") else f"simulate {place}")
        except lang.LangError as e:
            raise CommandError(str(e)) from None
        if cmd.verb != "simulate" or cmd.request is None:
            raise CommandError("simulate wants: place IMAGE [CONSTRAINT ...]")
        req, marked = cmd.request, tuple(cmd.marked)
        try:
            loaded = await self._checked(text)
        except PolicyError as e:
            raise CommandError(f"policy refused: {e}") from None
        label = f"draft {loaded.kind}" + (f" {loaded.name}" if loaded.name else "")

        def simulate(st: State) -> str:
            c = st.cluster
            policy, program = c.policy, c.program
            with st.draft():
                try:
                    if loaded.program is None:
                        assert loaded.rules is not None
                        c.set_program(None)
                        c.set_policy(loaded.rules)
                    else:
                        c.set_policy(Policy())
                        c.set_program(loaded.program)
                    with (loaded.program.budget(loaded.program.limits.command) if loaded.program is not None
                          else contextlib.nullcontext()) as b:
                        answer = plans.plan_simulate(st, req, self.clock(), label, marked)
                    return answer + (b.line() + "\n" if b is not None and b.line() else "")
                finally:
                    if c.policy is not policy:
                        c.set_policy(policy)
                    c.set_program(program)

        try:
            return await self.decider.call(simulate)
        finally:
            if loaded.program is not None:
                loaded.program.close()

    async def _cmd_policy(self, cmd: lang.Command) -> str:
        if cmd.targets[0] == "history":
            return self.policies.history_text()
        try:
            source = self.policies.source_of(cmd.count)
        except KeyError as e:
            raise CommandError(str(e.args[0])) from None
        return await self.set_policy(source, by=f"{cmd.user or '-'}: restore of v{cmd.count}")

    # ================================================================ nodes
    def _try_addr(self, addr: str, learnt: bool = False) -> None:
        """Follow a node at ``addr`` (a seed, a join, or a peer a node told of: ``learnt``): its name is
        learnt on first contact.  A seed or a join is tried until it answers; a learnt address
        PEER_TRIES times an interval apart, then not again for as long, and at most MAX_LEARNING at
        once (a node that lists peers without end cannot make the scheduler dial them all)."""
        if addr in self._addrs or self._closing:
            return
        if learnt:
            now = self.monotonic()
            if len(self._learning) >= MAX_LEARNING or self._peer_retry.get(addr, (now, 0))[0] > now:
                return  # (a later look at the node that named it tries again)
            self._learning.add(addr)
        self._addrs.add(addr)
        task = asyncio.create_task(self._discover(addr, learnt), name=f"sched-discover-{addr}")
        self._lead_tasks = [t for t in self._lead_tasks if not t.done()] + [task]

    async def _discover(self, addr: str, learnt: bool = False) -> None:
        me = asyncio.current_task()
        if not learnt and me is not None:
            self._joining[addr] = me  # (what forget ADDR cancels)
        try:
            await self._reach(addr, learnt)
        finally:
            self._learning.discard(addr)
            if self._joining.get(addr) is me:
                del self._joining[addr]

    async def _reach(self, addr: str, learnt: bool) -> None:
        try:
            backend = self.connect(addr)
        except ValueError as e:
            self.note(f"node at {addr}: {e}")
            return
        tries, wait = 0, self.interval
        while not self._closing:
            try:
                info = await backend.info()
                break
            except BackendError as e:
                log.debug("node at %s: %s", addr, e)
                tries += 1
                if not learnt and (tries in (1, 10, 100) or tries % 1000 == 0):  # (a seed or a join: said, sparsely)
                    why = _one_line(str(e)).removeprefix(f"node at {addr}: ").removeprefix(f"node {addr}: ")
                    self.note(f"{addr} not reached ({tries} {'try' if tries == 1 else 'tries'}; trying again, at "
                              f"most {JOIN_BACKOFF * self.interval:g}s apart, or: forget {addr}): {why}")
                if learnt and tries >= PEER_TRIES:
                    await backend.close()
                    self._give_up(addr)
                    return
                await asyncio.sleep(wait)
                if not learnt:  # (a seed or a join is tried until it answers, less and less often)
                    wait = min(wait * 2, JOIN_BACKOFF * self.interval)
        else:
            return
        while self.mode.name != NORMAL and not self._closing:  # no node is registered while change is frozen
            await asyncio.sleep(self.interval)
        existing = self.links.get(info.name)
        if existing is not None and existing.addr == addr:
            await backend.close()
            return
        if existing is not None:  # the node moved to a new address
            self.note(f"node {info.name} now at {addr} (was {existing.addr})")
            if existing.task:
                existing.task.cancel()
            await existing.backend.close()
        self.liveness.add(info.name, self.monotonic())
        lk = self._link(info.name, addr, backend)
        await self._node_info(info.name, info, lk)


    def _give_up(self, addr: str) -> None:
        """A learnt address did not answer PEER_TRIES times: it rests, twice as long each time it is
        given up, up to 64 times the tries' own time (the book of rests bounded to 10,000)."""
        self._addrs.discard(addr)
        now = self.monotonic()
        if len(self._peer_retry) >= 10_000:
            self._peer_retry = {a: v for a, v in self._peer_retry.items() if v[0] > now}
        times = self._peer_retry.get(addr, (0.0, 0))[1]
        self._peer_retry[addr] = (now + PEER_TRIES * self.interval * 2 ** min(times, 6), times + 1)

    async def node_lost(self, node: str, why: str) -> None:
        """The node is dead, whatever its calls say, until ``node_back`` (an agent's lease ran out)."""
        await self._transitions(self.liveness.expire(node, why))

    def node_back(self, node: str) -> None:
        self.liveness.release(node)

    def _link(self, name: str, addr: str, backend: Backend | None = None) -> Link:
        self._addrs.add(addr)
        if backend is None:
            try:
                backend = self.connect(addr)
            except ValueError as e:
                self.note(f"node {name} at {addr}: {e}")
                raise
        lk = Link(backend, addr)
        self.links[name] = lk
        self._call_bound = max(self._call_bound, backend.longest)
        lk.task = asyncio.create_task(self._follow(name, lk), name=f"sched-node-{name}")
        self._pace()
        return lk

    def _pace(self) -> None:
        """Look at each node less often as the cluster grows, at most ``max_looks`` a second in all,
        and give nodes as many looks to answer before they are suspect or dead (liveness.py)."""
        every = look_every(self.interval, len(self.links), self.max_looks)
        if every == self.look_every:
            return
        self.look_every = every
        self.liveness.pace(every / self.interval)
        self.note(f"{len(self.links)} nodes: looking at each every {every:g}s (at most {self.max_looks:g} looks a "
                  f"second); suspect after {self.liveness.suspect_after:g}s, dead after "
                  f"{self.liveness.dead_after:g}s")

    async def _node_info(self, name: str, info: NodeInfo, lk: Link) -> None:
        """Record what a node says of itself, if it changed."""
        row = {"addr": lk.addr, "kind": info.kind, "cpus": info.cpus, "mem": info.mem, "labels": dict(info.labels),
               "cordoned": False, "images": list(info.images) if info.images is not None else None}
        known = self.state.cluster.nodes.get(name)
        if known is not None and name in self.state.nodes and \
                self.state.node_row(name) == {**row, "cordoned": known.cordoned}:
            return
        await self._submit(lambda st, g: plans.plan_node_info(st, name, row, self.clock()))

    async def _follow(self, name: str, lk: Link) -> None:
        """The prober of one node: look every interval.  What a look shows is reconciled apart
        (``_reconcile``), so that a slow plan (a policy deciding for its whole budget) never delays
        the next look: the node's liveness is the node's, not the scheduler's queue."""
        try:
            while not self._closing:
                await self._step(f"following node {name}", self._round(name, lk))
                await asyncio.sleep(self.look_every)
        finally:
            if lk.reconciler is not None:
                lk.reconciler.cancel()

    async def _round(self, name: str, lk: Link) -> None:
        listed = began = self.monotonic()
        try:
            if lk.rounds % 10 == 0 or self.liveness.status(name) != "online":
                info = await lk.backend.info()
                if info.name != name:
                    self.note(f"node at {lk.addr} now calls itself {info.name}, not {name}")
                if self.mode.name == NORMAL:
                    await self._node_info(name, info, lk)
            if lk.rounds % 5 == 0:
                health = await lk.backend.health()
                if health != lk.health:  # (kept only when it changed: the same answer dies young)
                    lk.health = health
            listed = self.monotonic()
            found = await lk.backend.list()
            if lk.rounds % 5 == 0 and isinstance(lk.backend, Discovery):
                await self._learn_peers(lk.backend)
        except BackendError as e:
            self.observer.round("unreachable", self.monotonic() - began)
            await self._transitions(self.liveness.failed(name, self.monotonic(), str(e)))
            return
        finally:
            lk.rounds += 1
        self.observer.round("ok", self.monotonic() - began)
        await self._transitions(self.liveness.ok(name, self.monotonic()))
        key = reconcile.listing_key(found)
        if self.mode.name == NORMAL and self._quiet(name, lk, key):
            return
        # (a listing still waiting to be planned is replaced by this newer one)
        lk.listing = (found, listed, key, self.state.versions.get(name, 0))
        if self.mode.name != NORMAL:
            return  # reconciliation is paused (the newest listing waits: see _resume)
        if lk.reconciler is None or lk.reconciler.done():
            lk.reconciler = asyncio.create_task(self._reconcile(name, lk), name=f"sched-reconcile-{name}")

    def _quiet(self, name: str, lk: Link, key: int) -> bool:
        """Whether a look needs no plan: its listing says what the last one planned said, that plan
        changed nothing (nor did the drift comparison), and nothing the listing is compared with
        has changed since (the node's version in the state).  The plans would be empty again; the
        drift comparison due now is counted, its findings being as they were.  Every QUIET_LOOKS-th
        such look is planned all the same."""
        if lk.quiet is None or lk.quiet != (key, self.state.versions.get(name, 0)) or name in self._drift_now \
                or lk.listing is not None or (lk.reconciler is not None and not lk.reconciler.done()):
            return False
        lk.skipped += 1
        if lk.skipped >= QUIET_LOOKS:
            lk.skipped = 0
            return False
        now = self.monotonic()
        if self.drift_interval > 0 and self._drift_due(name, now):
            self._drift_passed(name, now)
        self.observer.reconcile("skipped", 0.0)
        return True

    async def _reconcile(self, name: str, lk: Link) -> None:
        """Plan what the newest listing of a node means, commit it and act, until none is left."""
        cluster = self.store.cluster
        while lk.listing is not None and not self._closing and self.mode.name == NORMAL:
            (found, listed, key, version), lk.listing = lk.listing, None
            lk.quiet = None

            async def step(found: list[ContainerInfo] = found, listed: float = listed, key: int = key,
                           version: int = version) -> None:
                began, result = time.perf_counter(), "error"
                steady = [False]

                def planner(st: State, g: Group) -> Plan:
                    plan = reconcile.plan_node(st, name, found, cluster=cluster, now=self.clock(), listed_at=listed,
                                               busy=g.busy, acted=g.acted)
                    steady[0] = not plan and reconcile.steady(st, name, found, listed_at=listed, busy=g.busy,
                                                              acted=g.acted)
                    return plan

                try:
                    same = await self._drift_step(name, found, listed)
                    plan = await self._submit(planner)
                    result = "acted" if plan.stops or plan.starts else "unchanged"
                    if same and steady[0] and lk.listing is None:
                        lk.quiet = (key, version)
                    if plan.stops or plan.starts:
                        await self._act(plan)
                except StoreError:
                    result = "store"
                    raise
                finally:
                    self.observer.reconcile(result, time.perf_counter() - began)

            await self._step(f"reconciling node {name}", step())

    async def _drift_step(self, name: str, found: list[ContainerInfo], listed: float) -> bool:
        """Compare a listing with the placements (drift.py): recorded when the findings change, and
        counted as a pass every ``drift_interval`` (and at the first listing after the node returns).
        Whether it changed nothing."""
        if self.drift_interval <= 0:
            return True
        now = self.monotonic()
        due = self._drift_due(name, now)
        cluster, known = self.store.cluster, dict(self.drift.entries)

        def planner(st: State, g: Group | None = None) -> Plan:
            return drift.plan_drift(st, name, found, cluster=cluster, now=self.clock(), listed_at=listed,
                                    busy=g.busy if g is not None else self._busy_now(),
                                    acted=g.acted if g is not None else self._acted, known=known,
                                    revision=lambda n: self._revision(st, n))[0]

        if not due and not planner(self.state):
            return True
        plan = await self._submit(planner)
        self.drift.apply(plan)
        if due:
            self._drift_passed(name, now)
        if plan.stops or plan.starts:
            await self._act(plan)
        return not plan

    def _drift_due(self, name: str, now: float) -> bool:
        """Whether a node's listing is to be counted as a drift pass now (see _drift_step)."""
        return name in self._drift_now or now - self._drift_at.get(name, -1e18) >= self.drift_interval

    def _drift_passed(self, name: str, now: float) -> None:
        self._drift_now.discard(name)
        self._drift_at[name] = now
        self.drift.passes += 1
        self.drift.last = self.clock()

    def _revision(self, st: State, name: str) -> str:
        req = st.cluster.placements[name].request
        rev = self._revisions.get(req)
        if rev is None:
            if len(self._revisions) > 10_000:
                self._revisions.clear()
            rev = self._revisions[req] = self._spec(name, req).revision
        return rev

    async def _learn_peers(self, backend: Discovery) -> None:
        now = self.monotonic()
        new = []
        for peer in await backend.peers():
            if peer.name in self.links:
                await self._transitions(self.liveness.peers_say(peer.name, peer.status, now))
            elif peer.addr and peer.status != "dead":
                new.append(peer.addr)
        # Addresses never tried first, then those given up on longest ago: one listed after many that
        # do not answer is still reached.
        new.sort(key=lambda a: self._peer_retry.get(a, (0.0, 0))[0])
        for addr in new:
            self._try_addr(addr, learnt=True)

    async def _ticker(self) -> None:
        """Time passing: nodes that fell silent become suspect, then dead, whatever their calls do."""
        while not self._closing:
            await asyncio.sleep(min(self.interval, 1.0))
            await self._step("liveness", self._transitions(self.liveness.tick(self.monotonic())))
            await self._step("forgetting dead nodes", self._forget_long_dead())

    async def _transitions(self, moves: list[Transition]) -> None:
        if self.mode.name != NORMAL:  # nothing is re-placed while change is frozen: see _resume
            self._held.update(t.node for t in moves)
            return
        for t in moves:
            if t.now == "dead":
                label = self._label()
                plan = await self._submit(
                    lambda st, g, t=t, label=label: self._reported(plans.plan_node_dead(  # type: ignore[misc]
                        st, t.node, t.why, self.clock(), label), t.node, t.now), small=False)
                await self._act(plan)
                continue
            if t.now == "online":
                self._drift_now.add(t.node)  # compared again at its next listing
                lk = self.links.get(t.node)
                self.note(f"node {t.node} online" + (f" at {lk.addr}" if lk else "") + f" (was {t.was})")
            else:
                lk = self.links.get(t.node)
                why = t.why.replace(f"node {t.node} at {lk.addr}: ", "") if lk else t.why
                self.note(f"node {t.node} {t.now}" + (f" at {lk.addr}" if lk else "") + f": {why}")
            await self._submit(lambda st, g, t=t: self._reported(  # type: ignore[misc]
                Plan(self.clock(), statuses=[(t.node, t.now)], kick=t.now == "online"), t.node, t.now))

    def _reported(self, plan: Plan, node: str, status: str) -> Plan:
        """With replicas, the leader records each node's liveness (meta liveness/NODE) for the
        followers to show: they watch the store, not the nodes.  One small row per change."""
        if self.replicated:
            plan.put("meta", f"liveness/{node}", {"status": status, "since": plan.now})
        return plan

    async def _persister(self) -> None:
        """Write observed statuses and stray log lines to the store, a few times a second."""
        while not self._closing:
            await asyncio.sleep(0.2)
            await self._step("persisting", self._flush_log())

    async def _step(self, what: str, step: Awaitable[None]) -> None:
        """One step of a loop that must go on: a store failure is logged (once), a bug logged too."""
        try:
            await step
        except asyncio.CancelledError:
            raise
        except StoreError as e:
            self._store_failed(e)
        except Exception:  # a bug must not stop the loop
            log.exception("%s", what)

    # ================================================================ pending work
    async def _housekeeping(self) -> None:
        """Place pending containers when capacity may have appeared, and now and then."""
        quiet = max(self.interval, 0.5)
        idle = 0.0
        while not self._closing:
            kicked = False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=quiet)
                kicked = True
            self._kick.clear()
            idle = 0.0 if kicked else idle + quiet
            if self.state.pending and (kicked or idle >= 5 * quiet) and self.mode.name == NORMAL:
                idle = 0.0
                await self._step("placing pending containers", self._place_pending())

    async def _place_pending(self) -> None:
        label = self._label()
        plan = await self._submit(lambda st, g: plans.plan_pending(st, self.clock(), label, g.left), small=False)
        await self._act(plan)

    # ================================================================ views
    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.state.records.values():
            counts[r.status] = counts.get(r.status, 0) + 1
        nodes: dict[str, int] = {}
        for name in self.state.cluster.nodes:
            status = self.node_status(name)
            nodes[status] = nodes.get(status, 0) + 1
        return (f"nodes {len(self.state.cluster.nodes)}" + "".join(f" {k} {v}" for k, v in sorted(nodes.items()))
                + f"\nplacements {len(self.state.records)}"
                + "".join(f" {k} {v}" for k, v in sorted(counts.items()))
                + f"\npolicy {self.policies.label()}" + (f" {h}" if (h := self.policies.health()) else "")
                + f"\nstore {self.store.kind} {self.store.where} cluster {self.store.cluster}"
                + f"\n{self.mode.line(stamp(self.mode.since))}"
                + (f"\nleader {self.leader or 'none (an election is under way)'}"
                   + (" (this replica)" if self.leading else "") if self.replicated else "")
                + f"\n\n{lang.USAGE}")

    async def container_log(self, name: str) -> tuple[str, bytes]:
        """A placement's container output, read through its node (logs/NAME): where it ran
        (``NODE/CID``, which changes when it is started again) and the bytes the node keeps."""
        p, r = self.state.cluster.placements.get(name), self.state.records.get(name)
        if p is None or r is None:
            raise CommandError(f"no placement {name!r}")
        if p.node is None or not r.cid:
            why = f" ({r.detail})" if r.detail else ""
            raise CommandError(f"{name} has no container yet: it is {r.status}{why}")
        lk = self.links.get(p.node)
        if lk is None:
            raise CommandError(f"{name}: node {p.node} is not connected")
        if not isinstance(lk.backend, Logs):
            raise CommandError(f"{name} runs on {p.node}, a {lk.backend.kind} node, which keeps no container logs")
        node, cid = p.node, r.cid
        try:
            return f"{node}/{cid}", await lk.backend.log(cid)
        except NoSuchContainer:
            raise CommandError(f"{name}: its container {cid} is no longer on {node}") from None
        except BackendError as e:
            raise CommandError(f"{name}: {e}") from None

    def placement_text(self, name: str) -> str:
        p = self.state.cluster.placements[name]
        r = self.state.records[name]
        lines = [f"node={p.node or '-'} image={p.request.image} status={r.status}",
                 f"want={r.want}", f"group={r.group}", f"cid={r.cid or '-'}", f"since={stamp(r.since)}"]
        cons = p.request.constraints()
        if cons:
            lines.append(f"constraints={cons}")
        if p.request.args:
            lines.append("args=" + _printable(" ".join(p.request.args)))
        lines += [f"env.{k}={_printable(v)}" for k, v in p.request.env]
        if p.request.restart != "never":
            lines.append(f"restart={p.request.restart} restarts={r.restarts}")
        if r.detail:
            lines.append(f"detail={r.detail}")
        if p.reason:
            lines.append(f"reason={p.reason}")
        return "\n".join(lines) + "\n"

    def node_status(self, name: str) -> str:
        """A node's liveness: what this scheduler saw, or on a follower what the leader recorded."""
        if not self.leading and name in self.state.reported:
            return self.state.reported[name][0]
        return self.state.cluster.nodes[name].status

    def node_field(self, name: str, what: str) -> str:
        n = self.state.cluster.nodes[name]
        meta = self.state.nodes.get(name)
        if what == "status":
            return self.node_status(name) + (" cordoned" if n.cordoned else "") + "\n"
        if what == "addr":
            return (meta.addr if meta else "") + "\n"
        if what == "kind":
            return (meta.kind if meta else "") + "\n"
        if what == "resources":
            f = n.facts
            lines = [f"cpus {f.cpus:g}", f"mem {format_size(f.mem)}", f"cpus_reserved {n.used_cpus:g}",
                     f"mem_reserved {format_size(n.used_mem)}", f"containers {len(n.containers)}"]
            lines += [f"label.{k} {v}" for k, v in sorted(f.labels.items())]
            return "\n".join(lines) + "\n"
        if what == "containers":
            return "".join(f"{c} {self.state.cluster.placements[c].request.image} {self.state.records[c].status}\n"
                           for c in n.containers)
        if what == "health":
            if not self.leading and name in self.state.reported:
                status, since = self.state.reported[name]
                return f"{status} since {stamp(since)}, as the leader {self.leader or '-'} saw it\n"
            last = self.liveness.last_ok(name)
            seen = f"last contact {_ago(self.monotonic() - last)} ago" if last is not None else "not reached yet"
            err = self.liveness.last_error(name)
            return f"{seen}" + (f"\nlast error {err}" if err else "") + "\n"
        raise KeyError(what)

    def log_text(self) -> str:
        return self.book.text()

    # ---------------------------------------------------------------- listings (one read each)
    def status_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every placement (name, image, node, status, age, why), and per group what is wanted and running."""
        now = self.clock()
        rows: list[dict[str, Any]] = []
        groups: dict[str, dict[str, Any]] = {}
        for name in sorted(self.state.records, key=replica_order):
            r, p = self.state.records[name], self.state.cluster.placements[name]
            rows.append({"name": name, "image": p.request.image, "node": p.node or "-", "status": r.status,
                         "want": r.want, "group": r.group, "age_s": round(max(now - r.created, 0.0), 1),
                         "since_s": round(max(now - r.since, 0.0), 1), "why": r.detail})
            g = groups.setdefault(r.group, {"group": r.group, "wanted": 0, "running": 0, "pending": 0, "other": 0})
            g["wanted"] += r.want == "run"
            key = "running" if r.status == "running" else "pending" if r.status in WAITING else "other"
            g[key] += 1
        return rows, [groups[k] for k in sorted(groups)]

    def status_table(self) -> str:
        rows, groups = self.status_rows()
        out = _table(["NAME", "IMAGE", "NODE", "STATUS", "AGE", "WHY"],
                     [[r["name"], r["image"], r["node"],
                       r["status"] + ("" if r["want"] == "run" else f" ({r['want']})"),
                       _age(r["age_s"]), r["why"] or "-"] for r in rows])
        out += "\n" + _table(["GROUP", "WANTED", "RUNNING", "PENDING", "OTHER"],
                             [[g["group"], g["wanted"], g["running"], g["pending"], g["other"]] for g in groups])
        return out

    def node_rows(self) -> list[dict[str, Any]]:
        """Every node: kind, status, cpu and memory offered and reserved, what it last said it uses."""
        out = []
        for name in sorted(self.state.cluster.nodes):
            n, meta, lk = self.state.cluster.nodes[name], self.state.nodes.get(name), self.links.get(name)
            h = lk.health if lk is not None else None
            out.append({"name": name, "kind": meta.kind if meta else "", "addr": meta.addr if meta else "",
                        "status": self.node_status(name) + (" cordoned" if n.cordoned else ""),
                        "cpus": n.facts.cpus, "cpus_reserved": n.used_cpus, "mem": n.facts.mem,
                        "mem_reserved": n.used_mem,
                        "mem_used": n.facts.mem - h.mem_free if h is not None and h.mem_free is not None else None,
                        "load": h.load if h is not None else None, "containers": len(n.containers)})
        return out

    def nodes_table(self) -> str:
        def size(v: int | None) -> str:
            return "-" if v is None else human_size(max(v, 0))

        return _table(["NAME", "KIND", "STATUS", "CPUS", "RESERVED", "MEM", "RESERVED", "USED", "LOAD", "CONTAINERS"],
                      [[r["name"], r["kind"], r["status"], f"{r['cpus']:g}", f"{r['cpus_reserved']:g}", size(r["mem"]),
                        size(r["mem_reserved"]), size(r["mem_used"]),
                        "-" if r["load"] is None else f"{r['load']:.2f}", r["containers"]] for r in self.node_rows()])


OBSERVED = ("running", "succeeded", "exited", "failed", "stopped")  # statuses that only say what a node reported
INTENT = ("request", "node", "reason", "group", "want", "created")


def observes_only(state: State, plan: Plan) -> bool:
    """Whether every change of ``plan`` only records what a node reported (status, cid, detail),
    leaving what the user wants and where it goes as they were."""
    if plan.stops or plan.starts or plan.kick:
        return False
    for (table, key), row in plan.changes.items():
        if table != "placements" or row is None or key not in state.records or row["status"] not in OBSERVED:
            return False
        now = state.placement_row(key)
        if any(row[f] != now[f] for f in INTENT):
            return False
    return True


def _commit_result(e: BaseException) -> str:
    """How a failed commit is counted (the store's kinds of refusal, a bounded set)."""
    for kind, name in ((Conflict, "conflict"), (NotLeader, "not_leader"), (StoreBusy, "busy"),
                       (Compacted, "compacted")):
        if isinstance(e, kind):
            return name
    return "cancelled" if isinstance(e, asyncio.CancelledError) else "error"


def _plan_all(state: State, jobs: list[_Job], group: Group) -> list[Plan | Exception]:
    """Plan a group in order, each on the rows of the plans before it (in a draft of ``state``,
    undone afterwards); a plan refused (CommandError) or failed leaves nothing of itself behind."""
    out: list[Plan | Exception] = []
    last = len(jobs) - 1
    with state.draft():
        for i, job in enumerate(jobs):
            point = state.savepoint()
            try:
                plan = job.planner(state, group)
            except Exception as e:  # its own refusal, or a bug: that plan alone fails
                state.rollback_to(point)
                if not isinstance(e, CommandError):
                    log.exception("planning")
                out.append(e)
                continue
            out.append(plan)
            if i == last:
                break  # no plan comes after it to see its rows (the draft is undone at once)
            state.apply(plan.rows())
            for node, status in plan.statuses:
                state.set_status(node, status)
            for node, names in plan.foreign.items():
                state.observe_foreign(node, names)
            group.busy.update(_acting(plan))
    return out


async def _each(steps: Iterable[Awaitable[T]]) -> list[T]:
    """Await all at once (gather); a single one in this task, without a task of its own."""
    todo = list(steps)
    if len(todo) == 1:
        return [await todo[0]]
    return list(await asyncio.gather(*todo))


def _acting(plan: Plan) -> set[str]:
    return {*plan.starts, *(s.name for s in plan.stops)}


def _connect(addr: str, timeout: float) -> Backend:
    return connect(addr, timeout=timeout)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    """Columns padded to their widest cell, the last one left as it is."""
    cells = [head] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head) - 1)]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] + "\n"
                   for r in cells)


def _printable(text: str) -> str:
    """Text for one line of a file: a newline or another control character written as its escape."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())[:200]


def _age(seconds: float) -> str:
    """An age as kubectl shows one: 45s, 12m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _ago(seconds: float) -> str:
    return f"{seconds:.1f}s"

