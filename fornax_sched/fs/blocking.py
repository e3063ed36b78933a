"""A blocking 9P client, for one-shot commands: one request at a time over a plain socket.

The operations are ClientCore's (the same generators the asyncio Client
drives), so it says and does exactly what Client does; what differs is
only the transport.  It exists because a shell command such as
``fornax-sched 9p read`` must start in well under 100 ms, and importing
asyncio alone takes longer than that on a small machine.

    with BlockingClient.connect("tcp!127.0.0.1!5640", version="9P2000.u") as c:
        print(c.read_file("cluster/scheduler/ctl").decode())

Every request is bounded like Client's: one not answered within the
timeout is flushed, and a server that does not answer the Tflush within
one more timeout is declared dead (the connection is closed).
"""

from __future__ import annotations

import errno as E
import socket
import time
from collections.abc import Callable

from . import codec as M
from . import proto as P
from .clientcore import ClientCore, FileInfo, check_reply, decode_frame
from .codec import Message, ProtocolError
from .dial import Address, parse
from .errors import P9Error

TYPE_CHECKING = False  # (not typing's: importing typing is a tenth of a shell command's start-up)
if TYPE_CHECKING:
    from typing import Any, TypeVar

    from .clientcore import Op

    T = TypeVar("T")


class BlockingClient(ClientCore):
    """One 9P connection with an attached root fid, over a blocking socket."""

    def __init__(self, address: Address, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(address, timeout)
        self.clock = clock
        self._sock: socket.socket | None = None
        self._gone: ConnectionError | None = None
        self._tag = 0

    @classmethod
    def connect(cls, dial: str, *, version: str | tuple[str, ...] = P.VERSION_9PL, msize: int = P.DEFAULT_MSIZE,
                uname: str | None = None, aname: str = "", timeout: float = 10.0,
                clock: Callable[[], float] = time.monotonic) -> BlockingClient:
        """Dial, negotiate the version and attach; raise ConnectionError, TimeoutError or P9Error.

        Each dialect of ``version`` is tried, in order, on a fresh connection.
        """
        versions = (version,) if isinstance(version, str) else version
        addr = parse(dial)
        for i, v in enumerate(versions):
            self = cls(addr, timeout, clock)
            self._dial()
            try:
                self._drive(self._op_handshake(v, msize, uname, aname))
                return self
            except P9Error as e:
                self.close()
                if e.errno != E.EPROTONOSUPPORT or i == len(versions) - 1:
                    raise
            except BaseException:
                self.close()
                raise
        raise ValueError("no 9P version to try")

    def _dial(self) -> None:
        addr = self.address
        try:
            if addr.net == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(addr.path)
                except BaseException:
                    sock.close()
                    raise
            elif _numeric(addr.host):  # (create_connection's getaddrinfo would load the idna codec for nothing)
                sock = socket.socket(socket.AF_INET6 if ":" in addr.host else socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect((addr.host, addr.port))
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((addr.host, addr.port), timeout=self.timeout)
        except TimeoutError:
            raise ConnectionError(f"cannot dial 9P server {addr}: no answer within {self.timeout:g}s") from None
        except OSError as e:
            raise ConnectionError(f"cannot dial 9P server {addr}: {e.strerror or e}") from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._gone is None:
            self._gone = ConnectionError(f"9P connection to {self.address} is closed")

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the wire
    def _die(self, why: str) -> ConnectionError:
        self.close()
        self._gone = ConnectionError(f"9P server {self.address} {why}: connection closed")
        return self._gone

    def _send(self, msg: Message) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(self.codec.encode(msg))
        except (TimeoutError, OSError) as e:
            raise self._die(f"could not be sent {type(msg).__name__} ({e or 'timed out'})") from None

    def _receive(self, tag: int, deadline: float) -> Message | None:
        """The reply with ``tag``, skipping late replies to flushed requests; None at the deadline."""
        assert self._sock is not None
        while True:
            try:
                frame = self._framer.next_frame()
                if frame is not None:
                    reply = decode_frame(self.codec, frame)
                    if reply.tag == tag:
                        return reply
                    continue
            except ProtocolError as e:
                raise self._die(f"sent a bad message ({e})") from None
            left = deadline - self.clock()
            if left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as e:
                raise self._die(f"went away ({e})") from None
            if not data:
                raise self._die("closed the connection")
            self._framer.feed(data)

    def _next_tag(self) -> int:
        self._tag = (self._tag + 1) % P.NOTAG
        return self._tag

    def rpc(self, msg: Message, timeout: float | None = None) -> Any:
        """Send one request and wait for its reply; errors raise P9Error, a silent server TimeoutError."""
        if self._gone is not None or self._sock is None:
            raise self._gone or ConnectionError(f"9P connection to {self.address} is closed")
        versioning = isinstance(msg, M.Tversion)
        msg.tag = P.NOTAG if versioning else self._next_tag()
        wait = timeout or self.timeout
        self._send(msg)
        reply = self._receive(msg.tag, self.clock() + wait)
        if reply is None:
            late = f"9P {type(msg).__name__} to {self.address} timed out after {wait:g}s"
            if versioning:  # NOTAG cannot be flushed
                self._die(f"did not answer Tversion within {wait:g}s")
                raise TimeoutError(f"{late}; connection closed")
            flush = M.Tflush(self._next_tag(), msg.tag)
            self._send(flush)
            if self._receive(flush.tag, self.clock() + self.timeout) is None:
                raise TimeoutError(f"{late}; {self._die(f'did not answer a Tflush within {self.timeout:g}s')}")
            raise TimeoutError(late)
        return check_reply(msg, reply)

    def _drive(self, op: Op[T]) -> T:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                msg = op.throw(error) if error is not None else op.send(reply)
            except StopIteration as done:
                return done.value
            try:
                reply, error = self.rpc(msg), None
            except BaseException as e:  # the operation's finally clauses (clunks) still run
                reply, error = None, e

    # ------------------------------------------------------------ operations (see ClientCore)
    def read_file(self, path: str, limit: int | None = None) -> bytes:
        return self._drive(self._op_read_file(path, limit))

    def write_file(self, path: str, data: bytes, *, create: bool = False, read_reply: bool = False) -> bytes:
        return self._drive(self._op_write_file(path, data, create, read_reply))

    def ls(self, path: str, limit: int | None = None) -> list[FileInfo]:
        return self._drive(self._op_ls(path, limit))

    def stat_path(self, path: str) -> FileInfo:
        return self._drive(self._op_stat_path(path))

    def walk(self, path: str, fid: int | None = None) -> int:
        return self._drive(self._op_walk(path, fid))

    def open(self, fid: int, mode: int = P.OREAD) -> Any:
        return self._drive(self._op_open(fid, mode))

    def read(self, fid: int, offset: int, count: int) -> bytes:
        return self._drive(self._op_read(fid, offset, count))

    def clunk(self, fid: int) -> None:
        self._drive(self._op_clunk(fid))


def _numeric(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address rather than a name to look up."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False
