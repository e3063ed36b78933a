"""The scheduler service: the pure core, the store and the node backends, joined.

Every command follows one rule: *decide, record durably, then act*.  The
core decides (no I/O); the change and its log lines go to the store in one
batch, and only when that batch is durable does the command touch a node
or answer its writer.  A crash at any point therefore leaves a record that
says what should be true, and the reconciler makes it so.

The reconciler is one task per node.  Each round it lists the node's
containers (by name: the scheduler passes its own names to the node's
``run``) and compares them with the placements:

- a placement meant for the node that is not running there is started;
- a container running there under a name placed on another node (a dead
  node that came back, a migration interrupted by a crash) or being
  removed is stopped and destroyed: every container runs exactly once;
- what the node says about a container (running, exited, failed and why)
  becomes the placement's status.

A node that cannot be reached for ``dead_after`` seconds, or that its
peers' gossip reports dead while it cannot be reached, is dead: its
placements are decided again and started elsewhere.  Nodes come from the
``--node`` seeds, from the store, and from the nodes' own /cluster/nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..policy import Limits, PolicyError
from ..units import format_size
from . import lang
from .backends import Backend, BackendError, ContainerInfo, FornaxNode, NodeRefused, NodeUnreachable
from .core import Cluster, Decision, NodeState, Placement
from .model import NodeFacts, Request
from .policies import Policies
from .store import Batch, Store, StoreError

log = logging.getLogger("fornax_sched.sched")

ALIVE = ("created", "running")  # container states that count as running on a node
TERMINAL = ("stopped", "exited", "failed")
LOG_LINES = 10_000  # log lines kept in memory for the log file (the store keeps more)


class CommandError(Exception):
    """A command that cannot be carried out; the message is what its writer reads."""


@dataclass
class Record:
    """What the scheduler keeps about one placement beyond the core's view."""

    group: str  # the replica set it belongs to (scale works on groups)
    status: str = "pending"  # pending starting running stopping stopped exited failed removing
    cid: str = ""  # the node's id for the container
    since: float = 0.0  # when the status last changed
    detail: str = ""  # the node's reason (exit code, memory limit) or why it is pending
    created: float = 0.0


@dataclass
class NodeLink:
    """The scheduler's connection to one node and what it knows of its health."""

    backend: Backend
    addr: str
    last_ok: float = 0.0  # last successful contact (0: never)
    last_error: str = ""
    peers_say_dead: bool = False
    task: asyncio.Task[None] | None = None
    rounds: int = 0
    ignored: set[str] = field(default_factory=set)  # foreign container names already logged


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def request_to_json(r: Request) -> dict[str, Any]:
    return {"image": r.image, "args": list(r.args), "name": r.name, "replicas": r.replicas, "cpus": r.cpus,
            "mem": r.mem, "labels": [list(kv) for kv in r.labels], "include": list(r.include),
            "exclude": list(r.exclude), "avoid": list(r.avoid)}


def request_from_json(d: dict[str, Any]) -> Request:
    return Request(image=d["image"], args=tuple(d.get("args", ())), name=d.get("name", ""),
                   replicas=int(d.get("replicas", 1)), cpus=float(d.get("cpus", 0)), mem=int(d.get("mem", 0)),
                   labels=tuple((k, v) for k, v in d.get("labels", ())), include=tuple(d.get("include", ())),
                   exclude=tuple(d.get("exclude", ())), avoid=tuple(d.get("avoid", ())))


class Scheduler:
    """One scheduler: its cluster state, its store, its nodes."""

    def __init__(self, store: Store, *, seeds: Iterable[str] = (), interval: float = 1.0,
                 dead_after: float = 10.0, node_timeout: float = 5.0,
                 connect: Callable[[str], Backend] | None = None,
                 clock: Callable[[], float] = time.time, limits: Limits | None = None) -> None:
        self.store = store
        self.cluster = Cluster()
        self.policies = Policies(self.cluster, self.note, limits=limits)
        self.records: dict[str, Record] = {}
        self.links: dict[str, NodeLink] = {}  # by node name
        self.seeds = list(seeds)
        self.interval = interval
        self.dead_after = dead_after
        self.node_timeout = node_timeout
        self.connect = connect or (lambda addr: FornaxNode(addr, timeout=node_timeout))
        self.clock = clock
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self._unsaved: list[str] = []  # log lines not yet in the store
        self._seq: dict[str, int] = {}  # next replica number per name stem
        # Placements a command is acting on, from the decision to start them (or the stop) until the
        # node has answered, with when that began: the reconciler keeps off them.
        self._busy: dict[str, float] = {}
        self._pending: dict[str, None] = {}  # names whose status is pending, oldest first
        self._acted: dict[str, float] = {}  # when a command last acted on a placement (monotonic)
        self._mutate = asyncio.Lock()  # one decide-and-record at a time
        self._pending_kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._addrs: set[str] = set()  # addresses known or being tried
        self._closing = False
        self.started = self.clock()

    # ================================================================ life
    async def start(self) -> None:
        """Load the state, then start following every known node."""
        await self._load()
        for addr in self.seeds:
            self._try_addr(addr)
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="sched-housekeeping"))

    async def close(self) -> None:
        self._closing = True
        tasks = self._tasks + [lk.task for lk in self.links.values() if lk.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self._flush_log()
        for lk in self.links.values():
            with contextlib.suppress(Exception):
                await lk.backend.close()
        self.policies.close()

    async def _load(self) -> None:
        meta = await self.store.load("meta")
        self._seq = dict(meta.get("seq", {}))  # stores from before one row a stem
        self._seq.update({k[4:]: int(v) for k, v in meta.items() if k.startswith("seq/")})
        for name, d in (await self.store.load("nodes")).items():
            st = self.cluster.add_node(NodeFacts(name, d["cpus"], d["mem"], dict(d.get("labels", {}))), "unknown")
            st.cordoned = bool(d.get("cordoned"))
            self._link(name, d["addr"])
        # Row by row, oldest first, with one copy of each repeated string and request:
        # replicas share their request, thousands of placements their status.
        requests: dict[Request, Request] = {}
        text: dict[str, str] = {}

        def one(v: str) -> str:
            return text.setdefault(v, v)

        async for items in self.store.scan("placements"):
            for item in items:
                name, d = item.key, item.value
                req = request_from_json(d["request"])
                req = requests.setdefault(req, req)
                self.cluster.add(name, req)
                r = Record(one(d.get("group", name)), one(d.get("status", "pending")), d.get("cid", ""),
                           d.get("since", 0.0), one(d.get("detail", "")), d.get("created", 0.0))
                self.records[name] = r
                node = d.get("node")
                if node and node in self.cluster.nodes:
                    self.cluster.assign(name, node, one(d.get("reason", "")), force=True)
                elif node:
                    r.status = "pending"
                if r.status == "pending":
                    self._pending[name] = None
        self._pending = dict.fromkeys(sorted(self._pending, key=lambda n: self.records[n].created))
        for at, line in await self.store.log_tail(LOG_LINES):
            self.lines.append(f"{_stamp(at)} {line}")
        # The policy last: its sandbox starts with the cluster's placements known.
        self.policies.load(await self.store.load("policies"), self.clock())
        self.note(f"scheduler started: {len(self.cluster.nodes)} nodes, {len(self.records)} placements "
                  f"from the store, policy {self.policies.label()}")

    # ================================================================ the log
    def note(self, line: str) -> None:
        """One log line: kept in memory for the log file and saved with the next batch."""
        self.lines.append(f"{_stamp(self.clock())} {line}")
        self._unsaved.append(line)
        log.info("%s", line)

    async def _commit(self, batch: Batch) -> None:
        """Make a batch (and the log lines noted so far) durable; StoreError if it cannot."""
        lines, self._unsaved = self._unsaved, []
        batch.log[:0] = lines
        try:
            await self.store.apply(batch)
        except StoreError:
            self._unsaved[:0] = lines
            raise

    async def _flush_log(self) -> None:
        if self._unsaved:
            with contextlib.suppress(StoreError):
                await self._commit(Batch())

    # ================================================================ records
    def _put(self, batch: Batch, name: str) -> None:
        p = self.cluster.placements[name]
        r = self.records[name]
        batch.put("placements", name, {
            "request": request_to_json(p.request), "node": p.node, "reason": p.reason, "group": r.group,
            "status": r.status, "cid": r.cid, "since": r.since, "detail": r.detail,
            "created": r.created})

    def _set(self, name: str, status: str, detail: str = "", cid: str | None = None) -> bool:
        """Change a placement's status; True if anything changed."""
        r = self.records[name]
        if status == "starting":
            # Whoever decided this starts it next: until then a node's reconciler,
            # whose listing cannot show it yet, must not start it as well.
            self._claim(name)
        if status == "pending":
            self._pending[name] = None
        else:
            self._pending.pop(name, None)
        if cid is not None and cid != r.cid:
            r.cid = cid
        elif r.status == status and r.detail == detail:
            return False
        if r.status != status:
            r.since = self.clock()
        r.status, r.detail = status, detail
        return True

    def _put_node(self, batch: Batch, n: NodeState) -> None:
        lk = self.links.get(n.name)
        batch.put("nodes", n.name, {"addr": lk.addr if lk else "", "cpus": n.facts.cpus, "mem": n.facts.mem,
                                    "labels": n.facts.labels, "cordoned": n.cordoned})

    def _next_names(self, req: Request, count: int, take: bool = True) -> tuple[str, list[str]]:
        """The group and container names for ``count`` new replicas of ``req`` (``take``: use them up)."""
        if req.name and req.replicas == 1 and count == 1:
            if req.name in self.records:
                raise CommandError(f"container {req.name!r} exists")
            return req.name, [req.name]
        stem = req.name or req.image
        n = self._seq.get(stem, 1)
        names: list[str] = []
        while len(names) < count:
            candidate = f"{stem}-{n}"
            n += 1
            if candidate not in self.records:
                names.append(candidate)
        if take:
            self._seq[stem] = n
        return (req.name or names[0] if count == 1 else stem), names

    # ================================================================ commands
    async def command(self, text: str, user: str = "-") -> str:
        """Carry out one ctl command; the answer is what a read of ctl gives back.

        A refused command is logged with the reason: a 9P2000.L client sees
        only the errno, and the log is where its user finds the words.
        """
        try:
            try:
                cmd = lang.parse_command(text)
            except lang.LangError as e:
                raise CommandError(str(e)) from None
            cmd.user = user
            handler = getattr(self, f"_cmd_{cmd.verb}")
            try:
                return str(await handler(cmd))
            except StoreError as e:
                raise CommandError(f"nothing changed: {e}") from None
        except CommandError as e:
            self.note(f"refused {text.strip()[:200]!r}: {str(e).splitlines()[0]}")
            raise

    async def _cmd_place(self, cmd: lang.Command) -> str:
        req = cmd.request
        assert req is not None
        return await self._place_new(req, req.replicas)

    async def _place_new(self, req: Request, count: int, group: str = "") -> str:
        """Decide and record ``count`` new replicas of ``req`` (in ``group``, else the one named
        after it), then start them."""
        async with self._mutate:
            first, names = self._next_names(req, count)
            decisions = self._decide_new(names, req, group or first)
            batch = Batch()
            self._put_seq(batch, req.name or req.image)
            for name in names:
                self._put(batch, name)
            try:
                await self._commit(batch)
            except StoreError:
                for name in names:
                    self._forget(name)
                raise
        return await self._start_new(names, decisions)

    async def _start_new(self, names: list[str], decisions: list[Decision]) -> str:
        """Start new placements; if the nodes refused every one (a bad image, say), that is the error."""
        started = await self._start_all([d.name for d in decisions if d.node is not None])
        refused = [e for n, e in started.items() if e and n not in self.records]
        if refused and len(refused) == len(names):
            raise CommandError(refused[0])
        return "".join(self._answer(name, started.get(name)) for name in names)

    def _decide_new(self, names: list[str], req: Request, group: str) -> list[Decision]:
        out = []
        now = self.clock()
        for name in names:
            d = self.cluster.place(name, req)
            self.records[name] = Record(group, "starting" if d.node else "pending", since=now,
                                        detail="" if d.node else d.reason, created=now)
            if d.node:
                self._claim(name)  # ours to start: see _set
            else:
                self._pending[name] = None
            self._decided(d, f"place {name} ({lang.format_place(req)})")
            out.append(d)
        return out

    def _decided(self, d: Decision, what: str) -> None:
        policy = self.policies.label()
        if d.node is None:
            self.note(f"{what}: pending: {d.reason} (policy {policy})")
        else:
            self.note(f"{what}: -> {d.node}: {d.reason} (policy {policy})")

    def _answer(self, name: str, error: str | None) -> str:
        p = self.cluster.placements.get(name)
        r = self.records.get(name)
        if p is None or r is None:
            return f"{name} removed: {error}\n"
        tail = f" ({r.detail})" if r.detail else ""
        return f"{name} node={p.node or '-'} status={r.status}{tail}\n"

    def _forget(self, name: str) -> None:
        if name in self.cluster.placements:
            self.cluster.forget(name)
        self.records.pop(name, None)
        self._acted.pop(name, None)
        self._busy.pop(name, None)
        self._pending.pop(name, None)

    # ---------------------------------------------------------------- acting on nodes
    async def _start_all(self, names: list[str]) -> dict[str, str | None]:
        """Start placements on their nodes, concurrently; returns errors by name."""
        results = await asyncio.gather(*(self._start(n) for n in names))
        return dict(zip(names, results, strict=True))

    async def _start(self, name: str) -> str | None:
        """Run one placement on its node.  A refusal (a bad image, say) removes the
        placement durably and returns the node's words; an unreachable node leaves
        it starting, for the reconciler or the dead-node logic to finish."""
        p = self.cluster.placements.get(name)
        lk = self.links.get(p.node) if p is not None and p.node is not None else None
        if p is None or p.node is None or lk is None:
            self._done(name)
            return None if p is None or p.node is None else f"no connection to {p.node}"
        node = p.node
        self._claim(name)
        try:
            req = p.request
            cid = await lk.backend.run(req.image, req.args, req.cpus, req.mem, name)
        except NodeRefused as e:
            self._done(name)
            self.note(f"start {name} on {node}: refused: {e}")
            async with self._mutate:
                batch = Batch().delete("placements", name)
                self._forget(name)
                await self._commit_quietly(batch)
            self._kick()
            return str(e)
        except NodeUnreachable as e:
            self.note(f"start {name} on {node}: {e}; will retry")
            self._set(name, "starting", f"node unreachable: {lk.last_error or e}")
            return str(e)
        finally:
            self._done(name)
        if self.cluster.placements.get(name) is p and p.node == node:
            self._set(name, "running", "", cid)
            self.note(f"started {name} on {node} as container {cid}")
            await self._save(name)
        return None

    def _claim(self, name: str) -> None:
        self._busy[name] = time.monotonic()

    def _is_busy(self, name: str) -> bool:
        """A command is acting on ``name``.  A claim older than any start or stop can take
        (a command that failed between deciding and acting) lapses, so nothing stays stuck."""
        at = self._busy.get(name)
        return at is not None and time.monotonic() - at < 4 * self.node_timeout + 10

    def _done(self, name: str) -> None:
        """A command finished acting on ``name``: a listing taken before now is stale for it."""
        self._busy.pop(name, None)
        self._acted[name] = time.monotonic()

    def _put_seq(self, batch: Batch, stem: str) -> None:
        """The next replica number of one stem: a row each, so a place writes a few bytes."""
        if stem in self._seq:
            batch.put("meta", f"seq/{stem}", self._seq[stem])

    async def _save(self, *names: str) -> None:
        """Record status changes; they are facts the nodes also hold, so a failure is only logged."""
        batch = Batch()
        for name in names:
            if name in self.records:
                self._put(batch, name)
        await self._commit_quietly(batch)

    async def _commit_quietly(self, batch: Batch) -> None:
        try:
            await self._commit(batch)
        except StoreError as e:
            log.error("%s", e)
            self.note(f"store: {e}")

    async def _stop_on(self, node: str, name: str, cid: str, destroy: bool) -> str | None:
        """Stop (and destroy) a container on a node; returns an error or None."""
        lk = self.links.get(node)
        if lk is None or not cid:
            return None
        try:
            await lk.backend.stop(cid)
            if destroy:
                await lk.backend.destroy(cid)
        except NodeRefused as e:
            if "no container" not in str(e) and "unknown container" not in str(e):
                return str(e)
        except NodeUnreachable as e:
            return str(e)
        return None

    # ---------------------------------------------------------------- container commands
    def _placement(self, name: str) -> Placement:
        p = self.cluster.placements.get(name)
        if p is None:
            raise CommandError(f"no container {name!r}")
        return p

    async def _cmd_stop(self, cmd: lang.Command) -> str:
        name = cmd.targets[0]
        p = self._placement(name)
        r = self.records[name]
        if r.status in TERMINAL:
            return f"{name} already {r.status}\n"
        async with self._mutate:
            self._set(name, "stopping")
            self.note(f"stop {name} on {p.node or '-'}")
            await self._save_or_fail(name)
        if p.node is None:
            self._set(name, "stopped")
        else:
            self._claim(name)
            try:
                err = await self._stop_on(p.node, name, r.cid, destroy=False)
            finally:
                self._done(name)
            if err:
                self.note(f"stop {name}: {err}; will retry")
                return f"{name} status=stopping ({err})\n"
            self._set(name, "stopped")
        self.note(f"stopped {name}")
        await self._save(name)
        return self._answer(name, None)

    async def _save_or_fail(self, name: str) -> None:
        batch = Batch()
        self._put(batch, name)
        await self._commit(batch)

    async def _cmd_start(self, cmd: lang.Command) -> str:
        name = cmd.targets[0]
        p = self._placement(name)
        r = self.records[name]
        if r.status in ("running", "starting"):
            return f"{name} already {r.status}\n"
        async with self._mutate:
            old_node, old_cid = p.node, r.cid
            if p.node is None or not self.cluster.nodes[p.node].usable:
                self.cluster.unassign(name)
                d = self.cluster.decide(name, p.request)
                if d.node is not None:
                    self.cluster.assign(name, d.node, d.reason)
                self._decided(d, f"start {name}")
            self._set(name, "starting" if p.node else "pending", "", cid="")
            await self._save_or_fail(name)
        if old_node and old_cid:  # the stopped instance goes before the new one starts
            await self._stop_on(old_node, name, old_cid, destroy=True)
        err = await self._start(name)
        return self._answer(name, err)

    async def _cmd_remove(self, cmd: lang.Command) -> str:
        name = cmd.targets[0]
        self._placement(name)
        await self._remove(name)
        return f"removed {name}\n"

    async def _remove(self, name: str) -> None:
        p = self.cluster.placements[name]
        r = self.records[name]
        async with self._mutate:
            self._set(name, "removing")
            self.note(f"remove {name} from {p.node or '-'}")
            await self._save_or_fail(name)
        if p.node is not None:
            self._claim(name)
            try:
                err = await self._stop_on(p.node, name, r.cid, destroy=True)
            finally:
                self._done(name)
            if err:  # the reconciler finishes it when the node answers
                self.note(f"remove {name}: {err}; will retry")
                return
        await self._drop(name)

    async def _drop(self, name: str) -> None:
        async with self._mutate:
            self._forget(name)
            batch = Batch().delete("placements", name)
            self.note(f"removed {name}")
            await self._commit_quietly(batch)
        self._kick()

    async def _cmd_scale(self, cmd: lang.Command) -> str:
        group, want = cmd.targets[0], cmd.count
        members = [n for n, r in self.records.items() if r.group == group and r.status != "removing"]
        if not members:
            raise CommandError(f"no group {group!r}: scale works on containers placed with name=")
        if want <= len(members):
            drop = sorted(members, key=_replica_order)[want:]
            for name in drop:
                await self._remove(name)
            return f"{group} scaled to {want}: removed {' '.join(drop) or 'nothing'}\n"
        template = self.cluster.placements[members[0]].request
        req = Request(**{**template.__dict__, "name": group, "replicas": want})
        return await self._place_new(req, want - len(members), group)

    # ---------------------------------------------------------------- moving
    async def _cmd_migrate(self, cmd: lang.Command) -> str:
        name, src, dst = cmd.targets
        p = self._placement(name)
        for node in (src, dst):
            if node not in self.cluster.nodes:
                raise CommandError(f"no node {node!r}")
        if p.node != src:
            raise CommandError(f"{name} is on {p.node or 'no node (pending)'}, not {src}")
        if src == dst:
            raise CommandError(f"{name} is already on {dst}")
        n = self.cluster.nodes[dst]
        if not n.usable:
            raise CommandError(f"{dst} is {'cordoned' if n.cordoned else n.status}")
        if not self.cluster.feasible(n, p.request):
            raise CommandError(f"{name} does not fit on {dst} ({self._fit_report(n, p.request)})")
        async with self._mutate:
            self.cluster.assign(name, dst, f"migrated from {src}")
            self.note(f"migrate {name}: {src} -> {dst}")
            old_cid = self.records[name].cid
            self._set(name, "starting", "", cid="")
            batch = Batch()
            self._put(batch, name)
            try:
                await self._commit(batch)
            except StoreError:
                self.cluster.assign(name, src, p.reason, force=True)
                raise
        err = await self._move(name, src, old_cid)
        return self._answer(name, err)

    def _fit_report(self, n: NodeState, req: Request) -> str:
        free_cpu = n.facts.cpus - n.used_cpus
        free_mem = n.facts.mem - n.used_mem
        if not req.allows(n.facts):
            return f"constraints {req.constraints()} exclude it"
        if req.avoid and n.runs_any(req.avoid):
            return f"it runs a container matching {' '.join(req.avoid)}"
        return f"free cpu {free_cpu:g}, mem {format_size(max(free_mem, 0))}"

    async def _move(self, name: str, src: str, old_cid: str) -> str | None:
        """Stop on the source, then start on the target (already recorded)."""
        self._claim(name)
        try:
            err = await self._stop_on(src, name, old_cid, destroy=True)
            if err:
                self.note(f"move {name}: stop on {src}: {err}; the reconciler stops it when {src} answers")
        finally:
            self._done(name)
        return await self._start(name)

    async def _cmd_evacuate(self, cmd: lang.Command) -> str:
        node = cmd.targets[0]
        if node not in self.cluster.nodes:
            raise CommandError(f"no node {node!r}")
        async with self._mutate:
            before = {n: (self.cluster.placements[n].node, self.records[n].cid)
                      for n in self.cluster.nodes[node].containers}
            was_cordoned = self.cluster.nodes[node].cordoned
            decisions = self.cluster.evacuate(node)
            self.note(f"evacuate {node}: cordoned; {len(decisions)} containers to move")
            batch = Batch()
            self._put_node(batch, self.cluster.nodes[node])
            for d in decisions:
                self._decided(d, f"evacuate {d.name}")
                self._set(d.name, "starting" if d.node else "pending", "" if d.node else d.reason, cid="")
                self._put(batch, d.name)
            try:
                await self._commit(batch)
            except StoreError:
                self.cluster.cordon(node, was_cordoned)
                for name, (home, _) in before.items():
                    if home is not None:
                        self.cluster.assign(name, home, force=True)
                raise
        errors = await asyncio.gather(*(self._move(d.name, node, before[d.name][1]) if d.node
                                        else self._stop_on(node, d.name, before[d.name][1], destroy=True)
                                        for d in decisions))
        moved = [f"{d.name} -> {d.node}" for d in decisions if d.node]
        pending = [d.name for d in decisions if not d.node]
        out = f"evacuated {node}: {len(moved)} moved, {len(pending)} pending\n"
        out += "".join(f"{m}\n" for m in moved)
        out += "".join(f"{n} pending: {self.records[n].detail}\n" for n in pending if n in self.records)
        out += "".join(f"error: {e}\n" for e in errors if e)
        return out

    async def _cmd_rebalance(self, cmd: lang.Command) -> str:
        limit = cmd.count or 10
        async with self._mutate:
            before = {n: (p.node, self.records[n].cid) for n, p in self.cluster.placements.items()
                      if p.node and not self._is_busy(n) and self.records[n].status == "running"}
            moves = [m for m in self.cluster.rebalance(limit)]
            batch = Batch()
            for name, src, dst in moves:
                self.note(f"rebalance {name}: {src} -> {dst} (policy {self.policies.label()})")
                self._set(name, "starting", "", cid="")
                self._put(batch, name)
            try:
                await self._commit(batch)
            except StoreError:
                for name, src, _ in moves:
                    self.cluster.assign(name, src, force=True)
                raise
        await asyncio.gather(*(self._move(name, src, before.get(name, (None, ""))[1]) for name, src, _ in moves))
        return f"rebalanced: {len(moves)} moved\n" + "".join(f"{n} {s} -> {d}\n" for n, s, d in moves)

    async def _cmd_cordon(self, cmd: lang.Command, on: bool = True) -> str:
        node = cmd.targets[0]
        if node not in self.cluster.nodes:
            raise CommandError(f"no node {node!r}")
        async with self._mutate:
            self.cluster.cordon(node, on)
            self.note(f"{'cordon' if on else 'uncordon'} {node}")
            batch = Batch()
            self._put_node(batch, self.cluster.nodes[node])
            try:
                await self._commit(batch)
            except StoreError:
                self.cluster.cordon(node, not on)
                raise
        if not on:
            self._kick()
        return f"{node} {'cordoned' if on else 'uncordoned'}\n"

    async def _cmd_uncordon(self, cmd: lang.Command) -> str:
        return await self._cmd_cordon(cmd, on=False)

    # ================================================================ policy
    def policy_text(self) -> str:
        return self.policies.source_text()

    async def set_policy(self, text: str, by: str = "-") -> str:
        """Check a policy (syntax, then a dry run) and make it active; CommandError if it is refused."""
        try:
            loaded = self.policies.check(text)
        except PolicyError as e:
            self.note(f"policy refused: {str(e).splitlines()[0]}")
            raise CommandError(f"policy refused, the old one stays: {e}") from None
        async with self._mutate:
            batch, undo, done = self.policies.activate(loaded, self.clock(), by)
            v = self.policies.active
            assert v is not None
            self.note(f"policy v{v.n} ({v.kind}, by {by}): {v.title() if v.kind != 'rules' else _one_line(text)}")
            try:
                await self._commit(batch)
            except StoreError:
                undo()
                raise
            done()
        self._kick()
        return f"policy v{v.n} active: {self.policies.label()}\n"

    async def _cmd_policy(self, cmd: lang.Command) -> str:
        what = cmd.targets[0]
        if what == "history":
            return self.policies.history_text()
        try:
            source = self.policies.source_of(cmd.count)
        except KeyError as e:
            raise CommandError(str(e.args[0])) from None
        return await self.set_policy(source, by=f"{cmd.user or '-'}: restore of v{cmd.count}")

    async def _cmd_simulate(self, cmd: lang.Command) -> str:
        req = cmd.request
        assert req is not None
        _, names = self._next_names(req, req.replicas, take=False)
        program = self.policies.program
        with program.aside() if program is not None else contextlib.nullcontext():
            decisions = self.cluster.simulate(names, req)
        head = f"simulate {lang.format_place(req)} (policy {self.policies.label()}): nothing changed\n"
        return head + "".join(d.line() + "\n" for d in decisions)

    # ================================================================ nodes
    def _try_addr(self, addr: str) -> None:
        """Follow a node at ``addr`` (a seed or a peer): its name is learnt on first contact."""
        if addr in self._addrs or self._closing:
            return
        self._addrs.add(addr)
        self._tasks.append(asyncio.create_task(self._discover(addr), name=f"sched-discover-{addr}"))

    async def _discover(self, addr: str) -> None:
        backend = self.connect(addr)
        while not self._closing:
            try:
                info = await backend.info()
                break
            except BackendError as e:
                log.debug("node at %s: %s", addr, e)
                await asyncio.sleep(self.interval)
        else:
            return
        existing = self.links.get(info.name)
        if existing is not None and existing.addr == addr:
            await backend.close()
            return
        if existing is not None:  # the node moved to a new address
            self.note(f"node {info.name} now at {addr} (was {existing.addr})")
            if existing.task:
                existing.task.cancel()
            await existing.backend.close()
        lk = self._link(info.name, addr, backend)
        await self._node_online(info.name, info, lk)

    def _link(self, name: str, addr: str, backend: Backend | None = None) -> NodeLink:
        self._addrs.add(addr)
        lk = NodeLink(backend or self.connect(addr), addr)
        self.links[name] = lk
        lk.task = asyncio.create_task(self._follow(name, lk), name=f"sched-node-{name}")
        return lk

    async def _node_online(self, name: str, info: Any, lk: NodeLink) -> None:
        facts = NodeFacts(name, info.cpus, info.mem, dict(info.labels))
        known = self.cluster.nodes.get(name)
        if known is not None and known.facts == facts and known.status == "online":
            return
        was = known.status if known else None
        async with self._mutate:
            n = self.cluster.add_node(facts, "online")
            batch = Batch()
            self._put_node(batch, n)
            if was != "online":
                self.note(f"node {name} online at {lk.addr}: cpus {facts.cpus:g}, mem {format_size(facts.mem)}"
                          + (f", labels {_labels(facts.labels)}" if facts.labels else "")
                          + (f" (was {was})" if was else ""))
            await self._commit_quietly(batch)
        self._kick()

    async def _follow(self, name: str, lk: NodeLink) -> None:
        """The reconciler of one node: poll, compare, act, every interval."""
        while not self._closing:
            try:
                await self._round(name, lk)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop following the node
                log.exception("following node %s", name)
            await asyncio.sleep(self.interval)

    async def _round(self, name: str, lk: NodeLink) -> None:
        now = self.clock()
        try:
            if lk.rounds % 10 == 0 or self.cluster.nodes.get(name) is None or \
                    self.cluster.nodes[name].status != "online":
                info = await lk.backend.info()
                if info.name != name:
                    self.note(f"node at {lk.addr} now calls itself {info.name}, not {name}")
                await self._node_online(name, info, lk)
            listed = time.monotonic()
            found = await lk.backend.containers()
            if lk.rounds % 5 == 0:
                await self._learn_peers(lk)
        except BackendError as e:
            lk.last_error = str(e)
            await self._unreachable(name, lk, now)
            return
        finally:
            lk.rounds += 1
        lk.last_ok = now
        lk.last_error = ""
        await self._reconcile(name, found, listed)

    async def _learn_peers(self, lk: NodeLink) -> None:
        for peer in await lk.backend.peers():
            if peer.name in self.links:
                self.links[peer.name].peers_say_dead = peer.status == "dead"
            elif peer.addr and peer.status != "dead":
                self._try_addr(peer.addr)

    async def _unreachable(self, name: str, lk: NodeLink, now: float) -> None:
        n = self.cluster.nodes.get(name)
        if n is None or n.status == "dead":
            return
        since = lk.last_ok or self.started
        if now - since >= self.dead_after or (lk.peers_say_dead and lk.last_ok == 0.0):
            await self._node_dead(name, f"unreachable for {now - since:.1f}s: {lk.last_error}")
        elif n.status != "suspect":
            self.cluster.set_status(name, "suspect")
            self.note(f"node {name} suspect: {lk.last_error}")

    async def _node_dead(self, name: str, why: str) -> None:
        """Place everything of a dead node again, elsewhere."""
        async with self._mutate:
            lost = self.cluster.node_lost(name)
            self.note(f"node {name} dead ({why}): {len(lost)} containers to place again")
            batch = Batch()
            again: list[str] = []
            gone: list[str] = []
            for cname in lost:
                r = self.records[cname]
                if r.status == "removing":
                    gone.append(cname)
                    continue
                if r.status in TERMINAL or r.status == "stopping":  # it had ended: it stays ended, nowhere
                    self._set(cname, "stopped" if r.status == "stopping" else r.status, f"was on {name}, which died")
                    self._put(batch, cname)
                    continue
                d = self.cluster.decide(cname, self.cluster.placements[cname].request)
                if d.node is not None:
                    self.cluster.assign(cname, d.node, f"{name} died; {d.reason}")
                    again.append(cname)
                self._decided(d, f"re-place {cname}")
                self._set(cname, "starting" if d.node else "pending", "" if d.node else d.reason, cid="")
                self._put(batch, cname)
            for cname in gone:
                self._forget(cname)
                batch.delete("placements", cname)
            await self._commit_quietly(batch)
        await self._start_all(again)

    async def _reconcile(self, node: str, found: list[ContainerInfo], listed: float) -> None:
        """Compare what ``node`` runs (as listed at ``listed``) with what should run there, and act.

        A placement a command is acting on, or acted on since the listing
        began, is left alone: the listing may not show what that command did.
        """
        def fresh(name: str) -> bool:
            return not self._is_busy(name) and self._acted.get(name, -1.0) < listed

        alive: dict[str, ContainerInfo] = {}
        ended: dict[str, ContainerInfo] = {}
        copies: dict[str, list[ContainerInfo]] = {}  # every live instance of each name
        for item in sorted(found, key=lambda i: (len(i.id), i.id)):  # the newest instance of a name wins
            (alive if item.state in ALIVE else ended)[item.name] = item
            if item.state in ALIVE:
                copies.setdefault(item.name, []).append(item)
        changed: list[str] = []
        to_start: list[str] = []
        to_stop: list[tuple[str, ContainerInfo]] = []
        n = self.cluster.nodes.get(node)
        mine = list(n.containers) if n is not None else []
        for name in mine:
            if not fresh(name):
                continue
            r = self.records[name]
            c = alive.get(name)
            if r.status == "removing" or r.status == "stopping":
                if c is not None:
                    to_stop.append((name, c))
                elif r.status == "removing":
                    await self._drop(name)
                elif self._set(name, "stopped"):
                    changed.append(name)
            elif c is not None:
                keep = next((i for i in copies[name] if i.id == r.cid), c)
                if self._set(name, "running", "", cid=keep.id):
                    changed.append(name)
                for extra in copies[name]:
                    if extra is not keep:  # started twice here: one instance is enough
                        to_stop.append((name, extra))
                        self.note(f"{name} runs twice on {node} (containers {keep.id} and {extra.id}): "
                                  f"stopping {extra.id}")
            elif r.status == "starting":
                to_start.append(name)
            elif r.status == "running":
                e = ended.get(name)
                if e is not None:
                    how = f"exit code {e.exit_code}" if e.exit_code is not None else ""
                    detail = ", ".join(x for x in (how, e.reason) if x)
                    self._set(name, e.state, detail, cid=e.id)
                    self.note(f"{name} on {node}: {e.state}" + (f" ({detail})" if detail else ""))
                else:  # the node lost it (state wiped): it should run, so run it again
                    self._set(name, "starting", f"lost on {node}", cid="")
                    self.note(f"{name}: not found on {node}; starting it again")
                    to_start.append(name)
                changed.append(name)
        for cname, info in alive.items():
            p = self.cluster.placements.get(cname)
            if p is None or not fresh(cname) or p.node == node:
                if p is None:
                    self._foreign(node, cname)
                continue
            to_stop.append((cname, info))
            self.note(f"{cname} also runs on {node} (placed on {p.node or 'no node'}): stopping it there")
        for cname, info in to_stop:
            err = await self._stop_on(node, cname, info.id, destroy=True)
            if err:
                self.note(f"stop {cname} on {node}: {err}")
        if changed:
            await self._save(*changed)
        if to_start:
            await self._start_all(to_start)

    def _foreign(self, node: str, cname: str) -> None:
        lk = self.links.get(node)
        if lk is not None and cname not in lk.ignored:
            lk.ignored.add(cname)
            self.note(f"{cname} on {node} was not placed by this scheduler; left alone")

    # ================================================================ pending work
    def _kick(self) -> None:
        self._pending_kick.set()

    async def _housekeeping(self) -> None:
        """Place pending containers when capacity may have appeared; save the log."""
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._pending_kick.wait(), timeout=max(self.interval, 0.5))
            self._pending_kick.clear()
            try:
                await self._place_pending()
                await self._flush_log()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("housekeeping")

    async def _place_pending(self) -> None:
        if not self._pending:
            return
        async with self._mutate:
            placed = []
            batch = Batch()
            for name in list(self._pending):
                p = self.cluster.placements[name]
                r = self.records[name]
                if r.status != "pending" or p.node is not None:
                    continue
                d = self.cluster.decide(p.name, p.request)
                if d.node is None:
                    if r.detail != d.reason:
                        r.detail = d.reason
                        self._put(batch, p.name)
                    continue
                self.cluster.assign(p.name, d.node, d.reason)
                self._decided(d, f"place pending {p.name}")
                self._set(p.name, "starting", "", cid="")
                self._put(batch, p.name)
                placed.append(p.name)
            if not batch:
                return
            await self._commit_quietly(batch)
        await self._start_all(placed)

    # ================================================================ views
    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.records.values():
            counts[r.status] = counts.get(r.status, 0) + 1
        nodes: dict[str, int] = {}
        for n in self.cluster.nodes.values():
            nodes[n.status] = nodes.get(n.status, 0) + 1
        return (f"nodes {len(self.cluster.nodes)}" + "".join(f" {k} {v}" for k, v in sorted(nodes.items()))
                + f"\nplacements {len(self.records)}" + "".join(f" {k} {v}" for k, v in sorted(counts.items()))
                + f"\npolicy {self.policies.label()}" + (f" {h}" if (h := self.policies.health()) else "")
                + f"\n\n{lang.USAGE}")

    def placement_text(self, name: str) -> str:
        p = self.cluster.placements[name]
        r = self.records[name]
        lines = [f"node={p.node or '-'} image={p.request.image} status={r.status}",
                 f"group={r.group}", f"cid={r.cid or '-'}", f"since={_stamp(r.since)}"]
        cons = p.request.constraints()
        if cons:
            lines.append(f"constraints={cons}")
        if p.request.args:
            lines.append("args=" + " ".join(p.request.args))
        if r.detail:
            lines.append(f"detail={r.detail}")
        if p.reason:
            lines.append(f"reason={p.reason}")
        return "\n".join(lines) + "\n"

    def node_field(self, name: str, what: str) -> str:
        n = self.cluster.nodes[name]
        lk = self.links.get(name)
        if what == "status":
            return n.status + (" cordoned" if n.cordoned else "") + "\n"
        if what == "addr":
            return (lk.addr if lk else "") + "\n"
        if what == "resources":
            f = n.facts
            lines = [f"cpus {f.cpus:g}", f"mem {format_size(f.mem)}", f"cpus_reserved {n.used_cpus:g}",
                     f"mem_reserved {format_size(n.used_mem)}", f"containers {len(n.containers)}"]
            lines += [f"label.{k} {v}" for k, v in sorted(f.labels.items())]
            return "\n".join(lines) + "\n"
        if what == "containers":
            return "".join(f"{c} {self.cluster.placements[c].request.image} {self.records[c].status}\n"
                           for c in n.containers)
        if what == "health":
            seen = f"last contact {_stamp(lk.last_ok)}" if lk and lk.last_ok else "never reached"
            err = f"\nlast error {lk.last_error}" if lk and lk.last_error else ""
            return f"{seen}{err}\n"
        raise KeyError(what)

    def log_text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())[:200]


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _replica_order(name: str) -> tuple[int, str]:
    stem, _, n = name.rpartition("-")
    return (int(n), stem) if n.isdigit() else (0, name)

