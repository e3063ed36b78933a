"""Several schedulers on one store: one leads, the others follow (docs/serve.8.md, "Replicas").

Each replica campaigns for the store's leadership (a lock under a lease of
``ttl`` seconds, whose value names the replica's advertised 9P address).
The leader decides and acts on nodes; every one of its transactions compares
the leadership key (kv.py), so once its lease is gone (a pause, a partition)
nothing it sends commits: it learns it lost (``lost``), steps down and follows.

A follower keeps its state current from a watch of the store and serves the
whole tree from it; a ctl or policy write is sent once to the leader, over
9P, as the writing user, and the leader's answer (or refusal) is the
follower's.  With no leader the write is refused, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ..fs.client import Client
from ..fs.errors import P9Error
from .plans import CommandError
from .service import Scheduler
from .store import Batch, Compacted, Leadership, StoreError

log = logging.getLogger("fornax_sched.sched.replicas")

NAME = "scheduler"  # the leadership's name in the store
TABLES = ("placements", "nodes", "meta", "policies", "log")


def leader_address(holder: str | None) -> str | None:
    """The advertised address in a leadership key's value (``pid P on HOST since T: ADDRESS``)."""
    if not holder:
        return None
    return holder.rpartition(": ")[2].strip() or None


class Replica:
    def __init__(self, sched: Scheduler, advertise: str, ttl: float = 5.0, forward_timeout: float = 60.0) -> None:
        self.sched = sched
        self.store = sched.store
        self.advertise = advertise
        self.ttl = ttl
        self.forward_timeout = forward_timeout
        self.hold: Leadership | None = None
        self.elections = 0  # times this replica became leader
        self._seen = 0  # the revision of the last change the watch delivered
        self._tasks: list[asyncio.Task[None]] = []
        self._follower: asyncio.Task[None] | None = None
        self._closing = False
        self._swapped = asyncio.Event()  # the leadership was taken again (relead)

    async def start(self) -> None:
        """Follow at once (the state is loaded), and campaign."""
        self.sched.forward = self._forward
        self.sched.relead = self.relead
        self.sched.replicated = True
        self._seen = self.store.revision
        self._follow()
        self._tasks.append(asyncio.create_task(self._campaign(), name="sched-campaign"))
        self._tasks.append(asyncio.create_task(self._watch_leader(), name="sched-leader"))
        # Serve once the first election is decided (a free leadership is taken in milliseconds),
        # so that a write just after start is not refused for want of a leader.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ttl
        while loop.time() < deadline and not self.sched.leading:
            with contextlib.suppress(StoreError, TimeoutError):
                if self.hold is None and leader_address(
                        await asyncio.wait_for(self.store.leader(NAME), self.sched.probe_timeout)) is not None:
                    break
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._closing = True
        for t in [*self._tasks, *([self._follower] if self._follower else [])]:
            t.cancel()
        for t in [*self._tasks, *([self._follower] if self._follower else [])]:
            with contextlib.suppress(BaseException):
                await t
        if self.hold is not None:
            with contextlib.suppress(StoreError):
                await self.hold.resign()

    # ------------------------------------------------------------ leading
    async def _campaign(self) -> None:
        """Campaign while the store is normal; lead until the leadership is lost; follow; again."""
        while not self._closing:
            if self.sched.mode.name != "normal":  # a replica that saw the store fail or emptied waits
                await asyncio.sleep(self.sched.probe_every)
                continue
            try:
                hold = await self.store.campaign(NAME, self.advertise, self.ttl, wait=True)
            except StoreError as e:
                log.debug("campaign: %s", e)
                await asyncio.sleep(min(self.ttl / 3, 1.0))
                continue
            await self.sched._probe(write=False)  # the mode now, not as last seen
            if self.sched.mode.name != "normal":  # (an emptied store: this replica's memory is no better)
                with contextlib.suppress(StoreError):
                    await hold.resign()
                continue
            self.hold = hold
            try:
                await self._take_over()
                await self._until_lost()
            finally:
                self.hold = None
                if not self._closing:
                    await self._step_down()

    async def _until_lost(self) -> None:
        """Until the leadership held is lost (one taken again by ``relead`` counts as the same)."""
        while self.hold is not None:
            hold = self.hold
            lost = asyncio.ensure_future(hold.lost.wait())
            swapped = asyncio.ensure_future(self._swapped.wait())
            try:
                await asyncio.wait({lost, swapped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                swapped.cancel()
            self._swapped.clear()
            if hold.lost.is_set() and self.hold is hold:
                return

    async def relead(self) -> None:
        """Before ``recover``: a leader whose leadership key went with the store's state takes it again."""
        if self.hold is None:
            raise CommandError("recover: this replica does not lead")
        if await self.store.leader(NAME) is not None and not self.hold.lost.is_set():
            return
        new = await self.store.campaign(NAME, self.advertise, self.ttl, wait=False)  # StoreBusy: someone else
        old, self.hold = self.hold, new
        self._swapped.set()
        with contextlib.suppress(StoreError):
            await old.resign()

    async def _take_over(self) -> None:
        """Elected: catch up with what the last leader committed, then decide and act."""
        sched = self.sched
        self.elections += 1
        if sched.mode.name == "normal":
            try:
                # A guarded write of our own: once the watch has delivered it, it has delivered
                # everything committed before it.
                rev = await self.store.apply(Batch().note(f"{self.advertise} leads (election {self.elections} "
                                                          "of this replica)"))
                await asyncio.wait_for(self._caught_up(rev), self.ttl + 5)
            except (StoreError, TimeoutError) as e:
                log.warning("catching up as the new leader: %s; reading the whole store", e)
                with contextlib.suppress(StoreError):
                    await sched.resync()
        await self._unfollow()
        sched.leader = self.advertise
        sched.begin_leading()
        sched.note(f"this replica ({self.advertise}) leads the store {self.store.where}")

    async def _caught_up(self, rev: int) -> None:
        while self._seen < rev:
            await asyncio.sleep(0.01)

    async def _step_down(self) -> None:
        sched = self.sched
        await sched.end_leading()
        sched.forward = self._forward
        sched.leader = None
        sched.note(f"this replica ({self.advertise}) no longer leads the store {self.store.where} "
                   "(its lease was lost): following")
        if sched.mode.name == "normal":  # (an emptied store: memory keeps the last known state, for recover)
            with contextlib.suppress(StoreError):
                await sched.resync()  # what memory holds beyond the store (observed, never committed) goes
        self._seen = max(self._seen, self.store.revision)
        self._follow()

    # ------------------------------------------------------------ following
    def _follow(self) -> None:
        if self._follower is None or self._follower.done():
            self._follower = asyncio.create_task(self._watch(), name="sched-follow")

    async def _unfollow(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(BaseException):
                await self._follower
            self._follower = None

    async def _watch(self) -> None:
        """The leader's commits, as they land, into memory; from where the last watch stopped."""
        while not self._closing:
            watch = self.store.watch(TABLES, self._seen)
            try:
                async for events in watch:
                    rows: list[tuple[str, str, Any]] = []
                    lines: list[tuple[float, str]] = []
                    for e in events:
                        if e.table == "log":
                            if isinstance(e.value, dict) and "line" in e.value:
                                lines.append((float(e.value.get("at", 0.0)), str(e.value["line"])))
                        else:
                            rows.append((e.table, e.key, e.value))
                    await self.sched.replicate(rows, lines)
                    if events:
                        self._seen = max(self._seen, max(e.revision for e in events))
            except Compacted:
                log.info("the watch of %s lost its place: reading the whole store", self.store.where)
                with contextlib.suppress(StoreError):
                    self._seen = self.store.revision
                    await self.sched.resync()
            except StoreError as e:
                log.debug("watch: %s", e)
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(BaseException):
                    await watch.close()

    async def _watch_leader(self) -> None:
        """Keep ``sched.leader`` (what ctl names) current while following."""
        while not self._closing:
            if self.hold is None:
                try:
                    self.sched.leader = leader_address(
                        await asyncio.wait_for(self.store.leader(NAME), self.sched.probe_timeout))
                except (StoreError, TimeoutError):
                    self.sched.leader = None
            await asyncio.sleep(min(self.ttl / 5, 0.5))

    async def _leader_now(self) -> str | None:
        """The leader's address; with none, waiting a little (an election takes milliseconds once a lease is gone)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self.ttl, 1.0)
        while True:
            try:
                addr = leader_address(await asyncio.wait_for(self.store.leader(NAME), self.sched.probe_timeout))
            except (StoreError, TimeoutError) as e:
                raise CommandError(f"nothing changed: this replica cannot tell which scheduler leads "
                                   f"({e or 'timeout'})") from None
            if addr is not None or loop.time() >= deadline:
                return addr
            await asyncio.sleep(0.05)

    async def _forward(self, file: str, text: str, user: str) -> str:
        """A write to a follower: sent once to the leader; its answer, or its refusal, is ours."""
        addr = await self._leader_now()
        if addr == self.advertise and self.hold is not None:  # elected, taking over: answered here
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.ttl + 5
            while self.sched.forward is not None and self.hold is not None and loop.time() < deadline:
                await asyncio.sleep(0.01)
            if self.sched.forward is None:
                return await (self.sched.command(text, user) if file == "ctl" else self.sched.set_policy(text, user))
        if addr is None or addr == self.advertise:
            raise CommandError(f"nothing changed: no scheduler leads the store {self.store.where} now (an "
                               "election is under way, or no replica is running): try again") from None
        self.sched.leader = addr
        sent = False
        try:
            async with await Client.connect(addr, timeout=min(10.0, self.forward_timeout), version="9P2000.u",
                                            uname=user) as c:
                sent = True
                data = await asyncio.wait_for(
                    c.write_file(f"cluster/scheduler/{file}", text.encode(), read_reply=file == "ctl"),
                    self.forward_timeout)
        except P9Error as e:
            raise CommandError(str(e)) from None
        except (OSError, ConnectionError, TimeoutError, EOFError) as e:
            if not sent:
                raise CommandError(f"nothing changed: the leader {addr} cannot be reached ({e or 'timeout'})"
                                   ) from None
            raise CommandError(f"the leader {addr} did not answer ({e or 'timeout'}): whether it was applied is "
                               "unknown; read the placements to see") from None
        return data.decode() if file == "ctl" else f"policy sent to the leader {addr}\n"
