"""The asyncio shell around ``Session``: a 9P2000 / 9P2000.u / 9P2000.L server.

``Session`` (fs/session.py) is the protocol, with no I/O.  ``_Connection``
only moves bytes: what the socket gives goes to the session, the frames it
answers go to the socket, the coroutines it asks for run as tasks (and are
cancelled when it says so), and reading pauses while the peer does not
read its replies or the session has as many requests in flight as it takes.

``Server`` accepts connections on TCP and Unix sockets and keeps their
number below the process's file limit without locking anyone out: at the
cap the connection idle longest (one that never attached first) makes room
for the newcomer, and a connection that does not attach within the
handshake deadline is closed.  Every time it reads comes from one injected
clock, so all of that is testable without waiting.
"""

from __future__ import annotations

import asyncio
import errno as E
import functools
import grp
import logging
import os
import pwd
import resource
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Protocol, TypeVar

from . import proto as P
from .codec import Message
from .dial import Address, parse
from .session import BATCH, Attach, Config, Fid, Observe, Output, Session, Users
from .tree import Dir

__all__ = ["Config", "Fid", "Listener", "Observe", "Output", "Server", "Session", "Users", "default_max_connections",
           "evictee", "file_limit", "system_users"]

log = logging.getLogger("fornax_sched.fs.server")


@lru_cache(maxsize=1024)
def _user_id(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return 65534


@lru_cache(maxsize=1024)
def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return _user_id(name)


@lru_cache(maxsize=1024)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def system_users() -> Users:
    """Names and ids from this machine's password and group files (cached)."""
    return Users(uid=_user_id, gid=_group_id, name=_user_name)


def file_limit() -> int:
    """The process's soft RLIMIT_NOFILE (an unlimited or huge one taken as 2**20): what the 9P
    server's and the other listeners' shares of files are taken from."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY or soft > 1 << 20 else soft


def default_max_connections() -> int:
    """The soft RLIMIT_NOFILE less a reserve (an eighth, at least 64) for the process's other files.

    At the limit itself accept() would fail, and so would everything else
    the process opens (its store, its logs, a container's pipes).
    """
    soft = file_limit()
    return max(1, soft - max(64, soft // 8))


class Idle(Protocol):
    """What eviction looks at in a connection."""

    @property
    def busy(self) -> bool: ...  # a request is in flight

    @property
    def idle_since(self) -> float: ...


C = TypeVar("C", bound=Idle)


def evictee(groups: Iterable[Iterable[C]], now: float, idle_minimum: float) -> C | None:
    """The connection to close so that a newcomer at the cap gets in, or None.

    ``groups`` come in order of preference (never attached first), each in
    order of ``idle_since``: the first connection of a group with nothing
    in flight is its longest idle, and it is taken if it has been idle for
    ``idle_minimum``.  Connections busy with requests are never taken.
    """
    for group in groups:
        for conn in group:
            if conn.busy:
                continue
            if now - conn.idle_since >= idle_minimum:
                return conn
            break  # the rest of this group has been idle for less
    return None


class _Connection(asyncio.Protocol):
    """One client connection: bytes to the session, its frames to the socket, its work as tasks."""

    HIGH_WATER = 1 << 20
    BATCH = BATCH

    def __init__(self, server: Server, conn_id: int, now: float) -> None:
        self.server = server
        self.session = Session(server.config, conn_id)
        self.tasks: dict[int, asyncio.Task[Message | None]] = {}
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.read_paused = False
        self.closed = False
        self.peer = "?"
        self.opened = now
        self.idle_since = now  # the last request in or reply out
        self.attached = False  # did Tversion and Tattach once

    @property
    def busy(self) -> bool:
        return self.session.in_flight > 0

    # ---- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername") or "unix")
        transport.set_write_buffer_limits(high=self.HIGH_WATER)
        if self.closed:  # evicted before the loop got here
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._forget(self)
        self._apply(self.session.lost())

    def data_received(self, data: bytes) -> None:
        self.server._active(self)
        self.session.receive_data(data)
        self._pump()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._pump()

    # ---- work
    def _pump(self) -> None:
        # Replies go out a batch at a time, so that a peer that does not read
        # makes the transport call pause_writing before memory grows.
        while not self.closed and not self.write_paused:
            out = self.session.process(self.server.wallclock())
            self._apply(out)
            if not out.more:
                break
        if self.session.attached and not self.attached and not self.closed:
            self.attached = True
            self.server._attached(self)
        self._update_reading()

    def _apply(self, out: Output) -> None:
        for token in out.cancel:
            task = self.tasks.pop(token, None)
            if task is not None:
                task.cancel()
        if out.start:
            if self.closed:
                for _, work in out.start:
                    work.close()
            else:
                loop = asyncio.get_running_loop()
                for token, work in out.start:
                    task = loop.create_task(work)
                    self.tasks[token] = task
                    task.add_done_callback(functools.partial(self._finished, token))
        send = out.send
        if send and self.transport is not None and not self.closed:
            self.transport.write(send[0] if len(send) == 1 else b"".join(send))
        if out.hangup is not None:
            log.info("9P connection %s: %s; hanging up", self.peer, out.hangup)
            self._hangup()

    def _finished(self, token: int, task: asyncio.Task[Message | None]) -> None:
        if self.tasks.get(token) is not task:
            return  # cancelled: flushed, or the connection is gone
        del self.tasks[token]
        if task.cancelled() or self.closed:
            return
        self.server._active(self)
        self._apply(self.session.finished(token, task.exception() or task.result()))
        self._pump()

    def _update_reading(self) -> None:
        want_pause = self.write_paused or self.session.saturated
        if want_pause == self.read_paused:
            return
        t = self.transport
        if t is None or self.closed:
            return
        if want_pause and not self.read_paused:
            t.pause_reading()
            self.read_paused = True
        elif not want_pause and self.read_paused:
            t.resume_reading()
            self.read_paused = False

    def _hangup(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def evict(self, why: str) -> None:
        """Close at once (unsent replies dropped): the server needs the room."""
        log.info("9P connection %s: %s; closing it", self.peer, why)
        self.server._forget(self)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Listener:
    """Bound, listening sockets and the dial string that reaches them."""

    def __init__(self, sockets: list[socket.socket], address: Address) -> None:
        self.sockets = sockets
        self.address = address

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            if sock.fileno() != -1:
                loop.remove_reader(sock.fileno())
                sock.close()

    async def wait_closed(self) -> None:
        return None


class Server:
    """Serves a tree (or one tree per aname) to many 9P clients, within bounds (see 9p-server(4))."""

    BACKLOG = 1024  # a burst of connections waits in the kernel (holding none of our descriptors)
    ACCEPT_BATCH = 16  # accepted per wake-up: descriptors of evicted connections close on the next

    def __init__(
        self,
        root: Dir | Attach,
        *,
        msize: int = P.DEFAULT_MSIZE,
        dialects: tuple[str, ...] = P.DIALECTS,
        groups: dict[str, frozenset[str]] | None = None,
        max_fids: int = 16384,
        max_inflight: int = 256,
        max_held: int = 32 << 20,
        max_connections: int | None = None,
        idle_minimum: float = 5.0,
        handshake_timeout: float = 60.0,
        users: Users | None = None,
        clock: Callable[[], float] = time.monotonic,
        observe: Observe | None = None,
    ) -> None:
        """``observe`` is told of every request answered (see session.Observe): the hook a
        program's metrics plug into, knowing nothing of 9P's insides."""
        attach: Attach = (lambda ctx, aname: root) if isinstance(root, Dir) else root
        self.config = Config(attach, msize=msize, dialects=dialects, groups=groups, max_fids=max_fids,
                             max_inflight=max_inflight, max_held=max_held, users=users or system_users(),
                             observe=observe)
        self.max_connections = max_connections if max_connections is not None else default_max_connections()
        self.idle_minimum = idle_minimum  # a connection this idle may be closed to make room
        self.handshake_timeout = handshake_timeout  # from accept to Rattach
        self.clock = clock  # every time the limits read; monotonic seconds
        self.wallclock = time.time  # what Tsetattr records as "now"
        self._connections: set[_Connection] = set()
        # By idle_since, oldest first: those that never attached, then the others.
        self._fresh: OrderedDict[_Connection, None] = OrderedDict()
        self._settled: OrderedDict[_Connection, None] = OrderedDict()
        self._handshaking: dict[_Connection, None] = {}  # by time opened (insertion order)
        self._sweeper: asyncio.TimerHandle | None = None
        self._refusals = 0  # since the last warning about them
        self._refusal_logged = -float("inf")
        self._listeners: list[Listener] = []
        self._starting: set[asyncio.Task[None]] = set()
        self._next_conn = 0

    @property
    def max_inflight(self) -> int:
        return self.config.max_inflight

    def _admit(self) -> _Connection | None:
        """A connection for a newcomer, closing the longest idle one at the cap; None: refuse it."""
        now = self.clock()
        self.sweep()
        if len(self._connections) >= self.max_connections:
            victim = evictee((self._fresh, self._settled), now, self.idle_minimum)
            if victim is None:
                self._refused(now)
                return None
            victim.evict(f"idle for {now - victim.idle_since:.0f}s, "
                         f"{'attached' if victim.attached else 'never attached'}, "
                         f"and {len(self._connections) + 1} connections at the cap of {self.max_connections}")
        self._next_conn += 1
        conn = _Connection(self, self._next_conn, now)
        # Counted from now, not from connection_made, which comes a loop iteration later.
        self._connections.add(conn)
        self._fresh[conn] = None
        self._handshaking[conn] = None
        if self._sweeper is None:
            self._arm()
        return conn

    def _refused(self, now: float) -> None:
        # One line per ten seconds at most: a flood must not fill the log too.
        self._refusals += 1
        if now - self._refusal_logged >= 10.0:
            log.warning("refused %d 9P connection(s): %d open (the cap), none idle for %gs",
                        self._refusals, len(self._connections), self.idle_minimum)
            self._refusals, self._refusal_logged = 0, now

    # ---- what the limits track
    def _active(self, conn: _Connection) -> None:
        conn.idle_since = self.clock()
        group = self._settled if conn.attached else self._fresh
        if conn in group:
            group.move_to_end(conn)

    def _attached(self, conn: _Connection) -> None:
        self._handshaking.pop(conn, None)
        if conn in self._fresh:
            del self._fresh[conn]
            self._settled[conn] = None

    def _forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        self._fresh.pop(conn, None)
        self._settled.pop(conn, None)
        self._handshaking.pop(conn, None)

    def sweep(self) -> None:
        """Close the connections that did not attach within ``handshake_timeout`` of ``clock``."""
        now = self.clock()
        while self._handshaking:
            conn = next(iter(self._handshaking))
            if now - conn.opened < self.handshake_timeout:
                break
            conn.evict(f"no Tversion and Tattach within {self.handshake_timeout:g}s")

    def _arm(self) -> None:
        """Wake for the next handshake deadline (the oldest connection still handshaking)."""
        self._sweeper = None
        if not self._handshaking:
            return
        first = next(iter(self._handshaking))
        due = first.opened + self.handshake_timeout - self.clock()
        self._sweeper = asyncio.get_running_loop().call_later(max(due, 0.0), self._wake)

    def _wake(self) -> None:
        self.sweep()
        self._arm()

    async def listen(self, dial: str) -> Listener:
        """Listen on a dial string; port 0 picks a free port (see ``.address``)."""
        addr = parse(dial)
        loop = asyncio.get_running_loop()
        socks: list[socket.socket] = []
        try:
            if addr.net == "unix":
                if os.path.exists(addr.path):
                    os.unlink(addr.path)
                socks.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                socks[0].bind(addr.path)
            else:
                infos = await loop.getaddrinfo(addr.host or None, addr.port, type=socket.SOCK_STREAM,
                                               flags=socket.AI_PASSIVE)
                if addr.port == 0:
                    infos = infos[:1]  # one free port, not one per address family
                for family, kind, proto, _, where in dict.fromkeys(infos):
                    sock = socket.socket(family, kind, proto)
                    socks.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(where)
                host, port = socks[0].getsockname()[:2]
                addr = Address("tcp", host, port)
            for sock in socks:
                sock.listen(self.BACKLOG)
                sock.setblocking(False)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        for sock in socks:
            loop.add_reader(sock.fileno(), self._accept, sock)
        listener = Listener(socks, addr)
        self._listeners.append(listener)
        return listener

    def _accept(self, listening: socket.socket) -> None:
        """Take what waits in the backlog, a few at a time.

        Our own accept loop, not asyncio's: a refused newcomer's socket is
        closed at once, so descriptors never pile up past the cap while a
        flood is turned away (asyncio accepts a whole backlog before any
        protocol can refuse, and closes a loop iteration later).
        """
        loop = asyncio.get_running_loop()
        for _ in range(self.ACCEPT_BATCH):
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (E.EMFILE, E.ENFILE, E.ENOBUFS, E.ENOMEM):
                    # The process's other files used the room: leave newcomers queued a moment.
                    log.warning("9P server cannot accept: %s; retrying in a second", e)
                    fd = listening.fileno()
                    loop.remove_reader(fd)
                    loop.call_later(1.0, self._resume_accepting, listening, fd)
                else:
                    log.warning("9P server accept failed: %s", e)
                return
            conn = self._admit()
            if conn is None:
                sock.close()
                continue
            sock.setblocking(False)
            task = loop.create_task(self._start(conn, sock))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    def _resume_accepting(self, listening: socket.socket, fd: int) -> None:
        if listening.fileno() == fd and any(listening in lst.sockets for lst in self._listeners):
            asyncio.get_running_loop().add_reader(fd, self._accept, listening)

    async def _start(self, conn: _Connection, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock)
        except OSError as e:
            log.info("9P connection lost before it started: %s", e)
            sock.close()
            self._forget(conn)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)
        for conn in list(self._connections):
            conn._hangup()
