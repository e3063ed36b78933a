"""The asyncio shell around ``Session``: a 9P2000 / 9P2000.u / 9P2000.L server.

``Session`` (fs/session.py) is the protocol, with no I/O.  ``_Connection``
only moves bytes: what the socket gives goes to the session, the frames it
answers go to the socket, the coroutines it asks for run as tasks (and are
cancelled when it says so), and reading pauses while the peer does not
read its replies or the session has as many requests in flight as it takes.
``Server`` accepts connections on TCP and Unix sockets.
"""

from __future__ import annotations

import asyncio
import functools
import grp
import logging
import os
import pwd
import time
from functools import lru_cache

from . import proto as P
from .codec import Message
from .dial import Address, parse
from .session import BATCH, Attach, Config, Fid, Output, Session, Users
from .tree import Dir

__all__ = ["Config", "Fid", "Listener", "Output", "Server", "Session", "Users", "system_users"]

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


class _Connection(asyncio.Protocol):
    """One client connection: bytes to the session, its frames to the socket, its work as tasks."""

    HIGH_WATER = 1 << 20
    BATCH = BATCH

    def __init__(self, server: Server, conn_id: int) -> None:
        self.server = server
        self.session = Session(server.config, conn_id)
        self.tasks: dict[int, asyncio.Task[Message | None]] = {}
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.read_paused = False
        self.closed = False
        self.peer = "?"

    # ---- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername") or "unix")
        transport.set_write_buffer_limits(high=self.HIGH_WATER)
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        self._apply(self.session.lost())

    def data_received(self, data: bytes) -> None:
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
        if task.cancelled():
            return
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


class Listener:
    """A bound server socket and the dial string that reaches it."""

    def __init__(self, server: asyncio.AbstractServer, address: Address) -> None:
        self.server = server
        self.address = address

    def close(self) -> None:
        self.server.close()

    async def wait_closed(self) -> None:
        await self.server.wait_closed()


class Server:
    """Serves a tree (or one tree per aname) to any number of 9P clients."""

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
        max_connections: int = 1024,
        users: Users | None = None,
    ) -> None:
        attach: Attach = (lambda ctx, aname: root) if isinstance(root, Dir) else root
        self.config = Config(attach, msize=msize, dialects=dialects, groups=groups, max_fids=max_fids,
                             max_inflight=max_inflight, max_held=max_held, users=users or system_users())
        self.max_connections = max_connections
        self.wallclock = time.time  # what Tsetattr records as "now"
        self._connections: set[_Connection] = set()
        self._listeners: list[Listener] = []
        self._next_conn = 0

    @property
    def max_inflight(self) -> int:
        return self.config.max_inflight

    def _protocol(self) -> asyncio.Protocol:
        self._next_conn += 1
        conn = _Connection(self, self._next_conn)
        if len(self._connections) >= self.max_connections:
            log.warning("refusing 9P connection: %d connections open", len(self._connections))
            conn.closed = True
            return _Refuse()
        return conn

    async def listen(self, dial: str) -> Listener:
        """Listen on a dial string; port 0 picks a free port (see ``.address``)."""
        addr = parse(dial)
        loop = asyncio.get_running_loop()
        if addr.net == "unix":
            if os.path.exists(addr.path):
                os.unlink(addr.path)
            srv = await loop.create_unix_server(self._protocol, addr.path)
        else:
            srv = await loop.create_server(self._protocol, addr.host, addr.port, reuse_address=True)
            host, port = srv.sockets[0].getsockname()[:2]
            addr = Address("tcp", host, port)
        listener = Listener(srv, addr)
        self._listeners.append(listener)
        return listener

    async def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        for conn in list(self._connections):
            conn._hangup()
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
