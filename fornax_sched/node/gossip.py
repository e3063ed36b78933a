"""UDP discovery (gossip) of fornax-node, as the Fornax design documents fix it.

Wire format: one text datagram per packet, fields separated by spaces::

    ANNOUNCE <node_id> <addr> <name> <cpu_count> <mem_total> <mem_free> <container_count>
    HEARTBEAT <node_id> <load> <mem_free> <container_count>
    LEAVE <node_id>

Two layers, like ``fs.server``: ``PeerTable`` is the pure state machine (it is
given datagrams, sources and the time, and returns events: no clock, no
socket, so tests drive it with a fake clock); ``Gossip`` is the asyncio shell
that owns the UDP socket and the timer.

Decisions, where Fornax is silent:

- Fields.  ``node_id`` is 1-64 hex digits, read case-insensitively and kept
  in lower case.  ``addr`` and ``name`` are 1-255 UTF-8 bytes of printable
  characters without whitespace (``addr`` is the node's 9P dial string, e.g.
  ``tcp!127.0.0.1!5641``, because several nodes may share a machine).
  Counts and memory (bytes) are unsigned decimal integers below 2**64.
  ``load`` is a non-negative decimal with no exponent (``0.52``), written in
  the shortest form that reads back as the same float.  Fields are split on
  any run of whitespace and a trailing newline is allowed.  Extra trailing
  fields are ignored, so a later Fornax that appends a field still talks to
  us.  A datagram over 1024 bytes, not UTF-8, or with a bad field is
  malformed: it is counted (``PeerTable.stats``), logged at debug level and
  otherwise ignored.  An unknown verb is counted apart and ignored.
- A node ignores datagrams carrying its own id (it hears its own broadcasts).
- Sending.  Every ``interval`` seconds a joined node sends HEARTBEAT.  It
  also sends ANNOUNCE on start, on ``join()``, when its id, name or addr
  changes (checked every tick; ``announce()`` sends at once), every
  ``announce_every``-th tick (6: every 30 s by default, so late joiners and
  nodes that lost a datagram learn names), and as an *answer*.  Destinations:
  the broadcast address (port 9710 by default, if broadcast is on), the
  explicit ``peers``, and the source address of every node heard from, so a
  peer listed on one side only still hears back.  With broadcast on, a peer
  may get a datagram twice (broadcast and unicast); datagrams are idempotent.
- Answers.  A node answers an ANNOUNCE with its own ANNOUNCE, unicast to the
  source, when the sender was unknown or not online (new, suspect, dead,
  or restarted), and also to any ANNOUNCE when it has sent no ANNOUNCE in
  the last ``interval`` (so a node restarted with the same id, which its
  peers still hold as online, learns them at once).  It never answers one
  peer twice within an interval, which ends every exchange after at most
  two answers.
- HEARTBEAT before ANNOUNCE.  A node heard only by HEARTBEAT is kept as
  *unannounced*: not listed and no event, but its source is a destination,
  and it is sent our ANNOUNCE (at most once an interval) which asks it to
  answer with its own: the three Fornax verbs suffice for that.
- PEERS, an extension.  Answers to sources are not enough for a chain of
  explicit peers (A lists B, B lists C: A and C never hear of each other), so
  a node also sends ``PEERS <id> udp!<ip>!<port> [<id> udp!<ip>!<port> ...]``,
  the gossip addresses of the peers it holds as online, to every unicast
  destination when a peer joins or comes back and every ``announce_every``-th
  tick.  A receiver takes it only from the source of a peer it holds as
  online, and only for ids it does not hold as online; such an address is a
  *hint*: it is sent our ANNOUNCE at once, and our datagrams until
  ``dead_after`` passes without the hint being repeated.  A node is listed
  only from its own datagrams, never from a hint, so liveness stays first
  hand.  Fornax nodes ignore PEERS as an unknown verb; without it, they still
  converge on broadcast networks.  ``relay=False`` turns it off.
- Status.  ANNOUNCE and HEARTBEAT (not PEERS) count as hearing from a peer.
  Silent for ``suspect_after`` (15 s): ``suspect``; for ``dead_after`` (30 s):
  ``dead``; ``remove_after`` (60 s) after it became dead it is removed, i.e.
  90 s of silence by default.  Transitions are applied by ``tick`` (every
  interval), stamped with the time the threshold was crossed; a late tick
  emits the missed transitions in order.  Any ANNOUNCE or HEARTBEAT brings a
  suspect or dead peer back ``online``.
- LEAVE removes the peer at once with a ``left`` event (no ``removed``): a
  node that leaves is gone, not dead, and the scheduler need not re-place
  its containers in a hurry.  A LEAVE for an unknown id is ignored.
- ``leave()`` sends LEAVE and stops sending (no heartbeat, announce, answer
  or PEERS) until ``join()``; the node keeps listening and keeps its table,
  but peers that knew it only as a source stop writing to it, so its view
  may go stale until it joins again.
- Restarts.  A node restarted with the same id comes back ``online`` (or
  ``joined`` again if it had been removed).  One restarted with a new id is
  a new peer; the old id goes suspect, dead and is removed by the timers,
  as for any silent node.  If ``self_info().id`` changes while running, the
  node says LEAVE for the old id and ANNOUNCE for the new one.
- Events: ``joined`` (first ANNOUNCE of an id not in the table), ``updated``
  (name, addr, cpus or mem_total changed), ``online``, ``suspect``, ``dead``,
  ``removed``, ``left``.  Each carries a snapshot of the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Literal, TypeAlias

log = logging.getLogger("fornax_sched.node.gossip")

PORT = 9710
MAX_DATAGRAM = 1024
MAX_WORD = 255  # bytes of UTF-8 in addr and name
MAX_UINT = 2**64 - 1

Address: TypeAlias = tuple[str, int]
Status = Literal["online", "suspect", "dead", "left"]
EventKind = Literal["joined", "updated", "online", "suspect", "dead", "removed", "left"]


# ---------------------------------------------------------------- datagrams

class ParseError(ValueError):
    """A datagram we cannot use; the only exception parsing raises."""


class UnknownVerb(ParseError):
    """A well-formed datagram whose verb we do not know (ignored, not malformed)."""


@dataclass(frozen=True)
class Announce:
    id: str
    addr: str
    name: str
    cpus: int
    mem_total: int
    mem_free: int
    containers: int


@dataclass(frozen=True)
class Heartbeat:
    id: str
    load: float
    mem_free: int
    containers: int


@dataclass(frozen=True)
class Leave:
    id: str


@dataclass(frozen=True)
class Peers:
    """Our extension: gossip addresses of peers the sender holds as online."""

    entries: tuple[tuple[str, Address], ...]


Message: TypeAlias = Announce | Heartbeat | Leave | Peers

_HEX = re.compile(r"[0-9a-fA-F]{1,64}")
_UINT = re.compile(r"[0-9]{1,20}")
_LOAD = re.compile(r"[0-9]{1,400}(?:\.[0-9]{1,400})?")


def _is_word(s: str) -> bool:
    if not s or not s.isprintable() or any(c.isspace() for c in s):
        return False
    try:
        return len(s.encode("utf-8")) <= MAX_WORD
    except UnicodeEncodeError:
        return False


def _p_id(tok: str) -> str:
    if not _HEX.fullmatch(tok):
        raise ParseError(f"bad node id {tok[:80]!r}")
    return tok.lower()


def _p_word(tok: str, what: str) -> str:
    if not _is_word(tok):
        raise ParseError(f"bad {what} {tok[:80]!r}")
    return tok


def _p_uint(tok: str, what: str) -> int:
    if not _UINT.fullmatch(tok) or int(tok) > MAX_UINT:
        raise ParseError(f"bad {what} {tok[:80]!r}")
    return int(tok)


def _p_load(tok: str) -> float:
    if not _LOAD.fullmatch(tok):
        raise ParseError(f"bad load {tok[:80]!r}")
    v = float(tok)
    if not math.isfinite(v):
        raise ParseError("load out of range")
    return v


def _p_udp(tok: str) -> Address:
    parts = tok.split("!")
    if len(parts) != 3 or parts[0] != "udp":
        raise ParseError(f"bad udp address {tok[:80]!r}")
    try:
        host = str(ipaddress.IPv4Address(parts[1]))
    except ValueError:
        raise ParseError(f"bad udp address {tok[:80]!r}") from None
    port = _p_uint(parts[2], "port")
    if not 1 <= port <= 65535:
        raise ParseError(f"bad port {port}")
    return host, port


def parse(text: str) -> Message:
    """One datagram's text to a message; raises ParseError (only) if unusable."""
    if len(text) > MAX_DATAGRAM:
        raise ParseError("datagram too long")
    f = text.split()
    if not f:
        raise ParseError("empty datagram")
    verb = f[0]
    if verb == "ANNOUNCE":
        if len(f) < 8:
            raise ParseError("ANNOUNCE wants 7 fields")
        return Announce(_p_id(f[1]), _p_word(f[2], "addr"), _p_word(f[3], "name"), _p_uint(f[4], "cpu_count"),
                        _p_uint(f[5], "mem_total"), _p_uint(f[6], "mem_free"), _p_uint(f[7], "container_count"))
    if verb == "HEARTBEAT":
        if len(f) < 5:
            raise ParseError("HEARTBEAT wants 4 fields")
        return Heartbeat(_p_id(f[1]), _p_load(f[2]), _p_uint(f[3], "mem_free"), _p_uint(f[4], "container_count"))
    if verb == "LEAVE":
        if len(f) < 2:
            raise ParseError("LEAVE wants a node id")
        return Leave(_p_id(f[1]))
    if verb == "PEERS":
        if len(f) < 3 or len(f) % 2 == 0:
            raise ParseError("PEERS wants pairs of node id and udp address")
        return Peers(tuple((_p_id(f[i]), _p_udp(f[i + 1])) for i in range(1, len(f), 2)))
    raise UnknownVerb(f"unknown verb {verb[:40]!r}")


def decode(data: bytes) -> Message:
    """Bytes off the wire to a message; raises ParseError (only) if unusable."""
    if len(data) > MAX_DATAGRAM:
        raise ParseError("datagram too long")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("not UTF-8") from None
    return parse(text)


def _f_id(v: str) -> str:
    if not isinstance(v, str) or not _HEX.fullmatch(v):
        raise ValueError(f"node id must be 1-64 hex digits: {v!r}")
    return v.lower()


def _f_word(v: str, what: str) -> str:
    if not isinstance(v, str) or not _is_word(v):
        raise ValueError(f"{what} must be 1-{MAX_WORD} bytes, printable, no spaces: {v!r}")
    return v


def _f_uint(v: int, what: str) -> str:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_UINT:
        raise ValueError(f"{what} must be an integer in 0..2**64-1: {v!r}")
    return str(v)


def _f_load(v: float) -> str:
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"load must be finite and >= 0: {v!r}")
    # repr is the shortest text that reads back as v; Decimal drops its exponent.
    return format(Decimal(repr(abs(v))), "f")


def _f_udp(a: Address) -> str:
    host = str(ipaddress.IPv4Address(a[0]))
    if not 1 <= a[1] <= 65535:
        raise ValueError(f"bad port {a[1]!r}")
    return f"udp!{host}!{a[1]}"


def format_message(m: Message) -> str:
    """A message to datagram text (no newline); ValueError if a field is invalid."""
    if isinstance(m, Announce):
        text = " ".join(["ANNOUNCE", _f_id(m.id), _f_word(m.addr, "addr"), _f_word(m.name, "name"),
                         _f_uint(m.cpus, "cpu_count"), _f_uint(m.mem_total, "mem_total"),
                         _f_uint(m.mem_free, "mem_free"), _f_uint(m.containers, "container_count")])
    elif isinstance(m, Heartbeat):
        text = " ".join(["HEARTBEAT", _f_id(m.id), _f_load(m.load), _f_uint(m.mem_free, "mem_free"),
                         _f_uint(m.containers, "container_count")])
    elif isinstance(m, Leave):
        text = "LEAVE " + _f_id(m.id)
    elif isinstance(m, Peers):
        if not m.entries:
            raise ValueError("PEERS needs at least one entry")
        text = " ".join(["PEERS", *(f"{_f_id(i)} {_f_udp(a)}" for i, a in m.entries)])
    else:
        raise TypeError(f"not a gossip message: {m!r}")
    if len(text.encode("utf-8")) > MAX_DATAGRAM:
        raise ValueError("datagram too long")
    return text


def pack_peers(entries: Sequence[tuple[str, Address]]) -> list[Peers]:
    """Split PEERS entries into messages that each fit in one datagram."""
    out: list[Peers] = []
    cur: list[tuple[str, Address]] = []
    size = len("PEERS")
    for e in entries:
        n = len(f" {_f_id(e[0])} {_f_udp(e[1])}")
        if cur and size + n > MAX_DATAGRAM:
            out.append(Peers(tuple(cur)))
            cur, size = [], len("PEERS")
        cur.append(e)
        size += n
    if cur:
        out.append(Peers(tuple(cur)))
    return out


def parse_hostport(s: str) -> Address:
    """``host:port`` (or ``udp!host!port``) to an address tuple."""
    if s.startswith("udp!"):
        _, host, port = s.split("!", 2)
    else:
        host, sep, port = s.rpartition(":")
        if not sep:
            raise ValueError(f"want host:port: {s!r}")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"want host:port: {s!r}")
    return host, int(port)


# ---------------------------------------------------------------- the state machine

@dataclass
class SelfInfo:
    """What this node tells its peers; read anew at every tick."""

    id: str
    name: str
    addr: str
    cpus: int
    mem_total: int
    mem_free: int
    containers: int
    load: float = 0.0


@dataclass
class Peer:
    id: str
    name: str
    addr: str
    cpus: int
    mem_total: int
    mem_free: int
    containers: int
    load: float
    status: Status
    last_seen: float  # monotonic time of its last ANNOUNCE or HEARTBEAT
    source: Address  # where its datagrams come from: where we write to it
    since: float  # when status last changed


@dataclass(frozen=True)
class Event:
    kind: EventKind
    peer: Peer  # a snapshot, safe to keep
    at: float  # the time given to observe/tick


@dataclass
class Stats:
    received: int = 0
    malformed: int = 0
    unknown_verb: int = 0
    own: int = 0
    unannounced: int = 0  # heartbeats from ids that have not announced
    untrusted: int = 0  # PEERS from a source that is no online peer


@dataclass
class _Contact:
    """An address we write to without listing a peer: unannounced ids and hints."""

    source: Address
    expires: float


class PeerTable:
    """The peers one node knows, driven by datagrams and the time it is given."""

    def __init__(self, self_id: str, *, suspect_after: float = 15.0, dead_after: float = 30.0,
                 remove_after: float = 60.0, answer_holdoff: float = 5.0, max_contacts: int = 1024) -> None:
        if not 0 < suspect_after <= dead_after or remove_after < 0 or answer_holdoff < 0:
            raise ValueError("want 0 < suspect_after <= dead_after, remove_after >= 0, answer_holdoff >= 0")
        self.self_id = self_id.lower()
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.remove_after = remove_after
        self.answer_holdoff = answer_holdoff
        self.max_contacts = max_contacts
        self.stats = Stats()
        self._peers: dict[str, Peer] = {}
        self._unannounced: dict[str, _Contact] = {}
        self._hints: dict[str, _Contact] = {}
        self._answered: dict[str, float] = {}
        self._last_announce = -math.inf
        self._answers: list[Address] = []
        self._relay = False

    # -------------------------------------------- input
    def observe(self, datagram: str | bytes, source: Address, now: float) -> list[Event]:
        """One received datagram; never raises for its content."""
        self.stats.received += 1
        try:
            msg = parse(datagram) if isinstance(datagram, str) else decode(datagram)
        except UnknownVerb as e:
            self.stats.unknown_verb += 1
            log.debug("ignored datagram from %s: %s", source, e)
            return []
        except ParseError as e:
            self.stats.malformed += 1
            log.debug("malformed datagram from %s: %s", source, e)
            return []
        src = (str(source[0]), int(source[1]))
        if isinstance(msg, Peers):
            self._on_peers(msg, src, now)
            return []
        if msg.id == self.self_id:
            self.stats.own += 1
            return []
        if isinstance(msg, Announce):
            return self._on_announce(msg, src, now)
        if isinstance(msg, Heartbeat):
            return self._on_heartbeat(msg, src, now)
        return self._on_leave(msg, now)

    def tick(self, now: float) -> list[Event]:
        """Apply the timers: suspect, dead, removed; expire contacts."""
        events: list[Event] = []
        for pid in sorted(self._peers):
            p = self._peers[pid]
            silent = now - p.last_seen
            if p.status == "online" and silent >= self.suspect_after:
                self._set(p, "suspect", p.last_seen + self.suspect_after, events, now)
            if p.status == "suspect" and silent >= self.dead_after:
                self._set(p, "dead", p.last_seen + self.dead_after, events, now)
            if p.status == "dead" and silent >= self.dead_after + self.remove_after:
                del self._peers[pid]
                self._answered.pop(pid, None)
                events.append(Event("removed", replace(p), now))
        for contacts in (self._unannounced, self._hints):
            for cid in [c for c, v in contacts.items() if v.expires <= now]:
                del contacts[cid]
        for aid in [a for a, t in self._answered.items() if now - t >= self.answer_holdoff]:
            del self._answered[aid]
        return events

    def announced(self, now: float) -> None:
        """Tell the table we sent ANNOUNCE to every destination (it holds back answers)."""
        self._last_announce = now

    # -------------------------------------------- output
    def peers(self) -> list[Peer]:
        """Every listed peer (online, suspect or dead), by id; copies."""
        return [replace(self._peers[k]) for k in sorted(self._peers)]

    def get(self, peer_id: str) -> Peer | None:
        p = self._peers.get(peer_id.lower())
        return replace(p) if p else None

    def sources(self) -> list[Address]:
        """Every address to write to besides broadcast and explicit peers."""
        seen: dict[Address, None] = {}
        for p in self._peers.values():
            seen[p.source] = None
        for c in (*self._unannounced.values(), *self._hints.values()):
            seen[c.source] = None
        return list(seen)

    def online_entries(self) -> list[tuple[str, Address]]:
        """What our PEERS datagrams say."""
        return [(p.id, p.source) for p in self.peers() if p.status == "online"]

    def take_answers(self) -> list[Address]:
        """Addresses owed our ANNOUNCE since the last call."""
        out = list(dict.fromkeys(self._answers))
        self._answers.clear()
        return out

    def take_relay(self) -> bool:
        """Whether a peer joined or came back since the last call (send PEERS)."""
        r, self._relay = self._relay, False
        return r

    # -------------------------------------------- handlers
    def _set(self, p: Peer, status: Literal["online", "suspect", "dead"], since: float, events: list[Event],
             now: float) -> None:
        p.status = status
        p.since = since
        events.append(Event(status, replace(p), now))

    def _answer(self, key: str, to: Address, now: float, *, urgent: bool) -> None:
        if now - self._answered.get(key, -math.inf) < self.answer_holdoff:
            return
        if not urgent and now - self._last_announce < self.answer_holdoff:
            return
        self._answered[key] = now
        self._answers.append(to)

    def _on_announce(self, m: Announce, src: Address, now: float) -> list[Event]:
        events: list[Event] = []
        self._unannounced.pop(m.id, None)
        self._hints.pop(m.id, None)
        p = self._peers.get(m.id)
        if p is None:
            p = Peer(m.id, m.name, m.addr, m.cpus, m.mem_total, m.mem_free, m.containers, 0.0,
                     "online", now, src, now)
            self._peers[m.id] = p
            events.append(Event("joined", replace(p), now))
            back = True
        else:
            back = p.status != "online"
            changed = (p.name, p.addr, p.cpus, p.mem_total) != (m.name, m.addr, m.cpus, m.mem_total)
            p.name, p.addr, p.cpus, p.mem_total = m.name, m.addr, m.cpus, m.mem_total
            p.mem_free, p.containers, p.last_seen, p.source = m.mem_free, m.containers, now, src
            if back:
                self._set(p, "online", now, events, now)
            if changed:
                events.append(Event("updated", replace(p), now))
        if back:
            self._relay = True
        self._answer(m.id, src, now, urgent=back)
        return events

    def _on_heartbeat(self, m: Heartbeat, src: Address, now: float) -> list[Event]:
        p = self._peers.get(m.id)
        if p is None:
            self.stats.unannounced += 1
            if m.id in self._unannounced or len(self._unannounced) < self.max_contacts:
                self._unannounced[m.id] = _Contact(src, now + self.dead_after)
                self._answer(m.id, src, now, urgent=True)
            return []
        events: list[Event] = []
        p.load, p.mem_free, p.containers, p.last_seen, p.source = m.load, m.mem_free, m.containers, now, src
        if p.status != "online":
            self._set(p, "online", now, events, now)
            self._relay = True
            self._answer(m.id, src, now, urgent=True)
        return events

    def _on_leave(self, m: Leave, now: float) -> list[Event]:
        self._unannounced.pop(m.id, None)
        self._hints.pop(m.id, None)
        self._answered.pop(m.id, None)
        p = self._peers.pop(m.id, None)
        if p is None:
            return []
        p.status, p.since = "left", now
        return [Event("left", p, now)]

    def _on_peers(self, m: Peers, src: Address, now: float) -> None:
        if not any(p.source == src and p.status == "online" for p in self._peers.values()):
            self.stats.untrusted += 1
            return
        for pid, addr in m.entries:
            known = self._peers.get(pid)
            if pid == self.self_id or (known is not None and known.status == "online"):
                continue
            old = self._hints.get(pid)
            if old is None and len(self._hints) >= self.max_contacts:
                continue
            self._hints[pid] = _Contact(addr, now + self.dead_after)
            if old is None or old.source != addr:
                self._answers.append(addr)


# ---------------------------------------------------------------- the asyncio shell

class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Gossip) -> None:
        self.owner = owner
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.owner._received(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("gossip socket: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Gossip:
    """A node's discovery: a UDP socket, a timer and a PeerTable."""

    def __init__(self, self_info: Callable[[], SelfInfo], *, listen: Address = ("0.0.0.0", PORT),
                 peers: Sequence[Address | str] = (), broadcast: str | None = "255.255.255.255",
                 broadcast_port: int = PORT, interval: float = 5.0, suspect_after: float = 15.0,
                 dead_after: float = 30.0, remove_after: float = 60.0, announce_every: int = 6,
                 relay: bool = True, on_event: Callable[[Event], None] | None = None) -> None:
        if interval <= 0 or announce_every < 1:
            raise ValueError("want interval > 0 and announce_every >= 1")
        self._self_info = self_info
        self.listen = (listen[0], int(listen[1]))
        self.peer_spec = [parse_hostport(p) if isinstance(p, str) else (p[0], int(p[1])) for p in peers]
        self.broadcast = broadcast
        self.broadcast_port = broadcast_port
        self.interval = interval
        self.announce_every = announce_every
        self.relay = relay
        self.on_event = on_event
        self.table = PeerTable("", suspect_after=suspect_after, dead_after=dead_after,
                               remove_after=remove_after, answer_holdoff=interval)
        self.joined = True
        self.port = 0
        self._explicit: list[Address] = []
        self._ident: tuple[str, str, str] | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _Protocol | None = None
        self._task: asyncio.Task[None] | None = None

    # -------------------------------------------- life
    async def start(self) -> None:
        """Bind, announce, and tick every interval."""
        if self._transport is not None:
            raise RuntimeError("gossip already started")
        loop = asyncio.get_running_loop()
        self.table.self_id = _f_id(self._self_info().id)
        self._explicit = [a for a in [await self._resolve(p) for p in self.peer_spec] if a]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.broadcast:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind(self.listen)
            transport, protocol = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport, self._protocol = transport, protocol
        self.port = sock.getsockname()[1]
        self._tick(0)  # before any datagram is handled: our ANNOUNCE goes first
        self._task = asyncio.create_task(self._run(), name=f"gossip-{self.port}")

    async def stop(self, leave: bool = True) -> None:
        """Stop; say LEAVE first unless ``leave`` is False (a crash, for tests)."""
        if self._transport is None:
            return
        if leave and self.joined:
            self._send_leave(self.table.self_id)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._transport.close()
        assert self._protocol is not None
        await self._protocol.closed
        self._transport = self._protocol = None

    def join(self) -> None:
        """Take part in gossip again after leave(): announce now."""
        if self.joined:
            return
        self.joined = True
        if self._transport is not None:
            self._announce(heartbeat=True)

    def leave(self) -> None:
        """Say LEAVE and stop sending until join(); keep listening."""
        if not self.joined:
            return
        if self._transport is not None:
            self._send_leave(self.table.self_id)
        self.joined = False

    def announce(self) -> None:
        """Send ANNOUNCE now, e.g. after a rename (the next tick would also notice)."""
        if self.joined and self._transport is not None:
            self._announce()

    def peers(self) -> list[Peer]:
        return self.table.peers()

    @property
    def stats(self) -> Stats:
        return self.table.stats

    # -------------------------------------------- internals
    async def _resolve(self, a: Address) -> Address | None:
        try:
            socket.inet_aton(a[0])
            return a
        except OSError:
            pass
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(a[0], a[1], family=socket.AF_INET,
                                                                 type=socket.SOCK_DGRAM)
            host, port = infos[0][4][:2]
            return str(host), int(port)
        except OSError as e:
            log.warning("gossip peer %s:%d: %s (skipped)", a[0], a[1], e)
            return None

    async def _run(self) -> None:
        n = 1
        due = time.monotonic() + self.interval
        while True:
            await asyncio.sleep(max(due - time.monotonic(), 0))
            try:
                self._tick(n)
            except Exception:
                log.exception("gossip tick")
            n += 1
            due += self.interval
            if due < time.monotonic():  # fell behind (suspended): do not burst
                due = time.monotonic()

    def _info(self) -> SelfInfo | None:
        try:
            return self._self_info()
        except Exception:
            log.exception("gossip: self_info failed")
            return None

    def _tick(self, n: int) -> None:
        self._dispatch(self.table.tick(time.monotonic()))
        if not self.joined:
            return
        periodic = n % self.announce_every == 0
        info = self._info()
        if info is None:
            return
        ident = (info.id.lower(), info.name, info.addr)
        if periodic or ident != self._ident:
            self._announce(info)
        self._heartbeat(info)
        if periodic and self.relay:
            self._send_peers()

    def _announce(self, info: SelfInfo | None = None, heartbeat: bool = False) -> None:
        info = info or self._info()
        if info is None:
            return
        try:
            text = format_message(Announce(info.id, info.addr, info.name, info.cpus, info.mem_total,
                                           info.mem_free, info.containers))
        except ValueError as e:
            log.warning("gossip: cannot announce: %s", e)
            return
        new_id = info.id.lower()
        if new_id != self.table.self_id:
            self._send_leave(self.table.self_id)
            self.table.self_id = new_id
        self._ident = (new_id, info.name, info.addr)
        self._send_all(text)
        self.table.announced(time.monotonic())
        if heartbeat:
            self._heartbeat(info)

    def _heartbeat(self, info: SelfInfo) -> None:
        try:
            text = format_message(Heartbeat(info.id, info.load, info.mem_free, info.containers))
        except ValueError as e:
            log.warning("gossip: cannot heartbeat: %s", e)
            return
        self._send_all(text)

    def _send_leave(self, node_id: str) -> None:
        if node_id:
            self._send_all(format_message(Leave(node_id)))

    def _send_peers(self) -> None:
        entries = self.table.online_entries()
        for m in pack_peers(entries):
            text = format_message(m)
            for dest in self._destinations(broadcast=False):
                self._sendto(text, dest)

    def _destinations(self, broadcast: bool = True) -> list[Address]:
        out: dict[Address, None] = {}
        if broadcast and self.broadcast:
            out[(self.broadcast, self.broadcast_port)] = None
        for a in (*self._explicit, *self.table.sources()):
            out[a] = None
        return list(out)

    def _send_all(self, text: str) -> None:
        for dest in self._destinations():
            self._sendto(text, dest)

    def _sendto(self, text: str, dest: Address) -> None:
        if self._transport is None:
            return
        try:
            self._transport.sendto(text.encode("utf-8"), dest)
        except OSError as e:
            log.debug("gossip to %s:%d: %s", dest[0], dest[1], e)

    def _received(self, data: bytes, source: Address) -> None:
        try:
            events = self.table.observe(data, source, time.monotonic())
            answers = self.table.take_answers()
            relay = self.table.take_relay()
            if self.joined:
                info = self._info() if answers else None
                if info is not None:
                    try:
                        text = format_message(Announce(info.id, info.addr, info.name, info.cpus, info.mem_total,
                                                       info.mem_free, info.containers))
                    except ValueError as e:
                        log.warning("gossip: cannot answer: %s", e)
                    else:
                        for a in answers:
                            self._sendto(text, a)
                if relay and self.relay:
                    self._send_peers()
            self._dispatch(events)
        except Exception:
            log.exception("gossip: datagram from %s", source)

    def _dispatch(self, events: list[Event]) -> None:
        for e in events:
            log.info("peer %s (%s) %s", e.peer.id, e.peer.name, e.kind)
            if self.on_event is not None:
                try:
                    self.on_event(e)
                except Exception:
                    log.exception("gossip on_event")
