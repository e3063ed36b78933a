"""A Fornax node, driven by mounting its /cluster tree over 9P (the Fornax "mount").

One 9P connection per node (9P2000.u: the node's error text travels with
the errno, so a user sees the node's words), opened on first use and again
after it breaks.  Every call is bounded by the client's timeout, flush
included, so a hung node (SIGSTOP, a dead link) is an error after at most
``timeout``, never a wait without end.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import shlex
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ...fs import proto as P
from ...fs.client import Client
from ...fs.errors import P9Error
from ...units import SizeError, format_size, parse_size
from .base import ContainerInfo, Health, NodeInfo, NodeRefused, NodeUnreachable, NoSuchContainer, PeerInfo, Spec

T = TypeVar("T")
# The most a file of a node's is read to (its listing of containers, 500 bytes or so each): a node
# whose file never ended used to be read until the scheduler ran out of memory.
READ_LIMIT = 64 << 20
LIST_LIMIT = 100_000  # entries of a node's directory (its containers, the nodes it knows), likewise
# ctl commands (run, stop, destroy) sent to one node at once; the rest wait their turn here.  A node
# starts its containers about one at a time: 1,000 runs sent together (place replicas=1000 on three
# nodes) took more than the node timeout each, and the nodes, their looks unanswered, went dead.
CTL_AT_ONCE = 8


def parse_kv(text: str) -> dict[str, str]:
    """``key value`` lines into a dict (later keys win)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            out[key] = value.strip()
    return out


def container_of(kv: dict[str, str]) -> ContainerInfo:
    """A container's ``status`` lines as a ContainerInfo (labels from ``label.KEY VALUE`` lines)."""
    code = kv.get("exit_code")
    labels = {k[len("label."):]: v for k, v in kv.items() if k.startswith("label.")}
    return ContainerInfo(kv.get("id", ""), kv.get("name", ""), kv.get("image", ""), kv.get("state", "unknown"),
                         int(code) if code and code.lstrip("-").isdigit() else None, kv.get("reason", ""), labels)


class FornaxNode:
    """The Backend (and Discovery) of a Fornax node at a 9P dial string (``tcp!host!port``)."""

    kind = "fornax"

    def __init__(self, addr: str, name: str = "", *, timeout: float = 5.0, version: str = "9P2000.u") -> None:
        self.addr = addr
        self.name = name or addr
        self.timeout = timeout
        self.version = version
        self._client: Client | None = None
        self._connecting = asyncio.Lock()
        self._listing: bool | None = None  # whether the node serves /cluster/self/containers
        # Open fids on the node's cluster/ctl, each used by one command at a time: a command is
        # then a write and a read sent together (one round trip) instead of a walk, open, write,
        # read and clunk.
        self._ctl_fids: list[int] = []
        self._ctl_client: Client | None = None
        self._ctl_turns = asyncio.Semaphore(CTL_AT_ONCE)  # (its waiting is not bounded by the timeout)
        # Whether the node answers a read sent with the write only after the write (fs/session.py);
        # one that answered the read first (an older node) gets the read after the write instead.
        self._piped = True

    @property
    def longest(self) -> float:
        return 2 * self.timeout  # a request, then its flush: each bounded by the timeout (fs/client.py)

    def _where(self) -> str:
        return f"node {self.name}" + (f" at {self.addr}" if self.name != self.addr else "")

    async def _c(self) -> Client:
        c = self._client
        if c is not None and c._gone is None:
            return c
        async with self._connecting:
            c = self._client
            if c is None or c._gone is not None:
                try:
                    c = await Client.connect(self.addr, version=self.version, timeout=self.timeout)
                    if self.name == self.addr:  # learn what the node calls itself
                        self.name = (await c.read_file("cluster/self/name")).decode().strip() or self.addr
                except (ConnectionError, TimeoutError, OSError) as e:
                    why = str(e).removeprefix(f"cannot dial 9P server {self.addr}: ") or "timed out"
                    raise NodeUnreachable(f"{self._where()}: cannot connect: {why}") from None
                except P9Error as e:
                    raise NodeUnreachable(f"{self._where()}: {e}") from None
                self._client = c
            return c

    async def _do(self, what: str, op: Callable[[Client], Awaitable[T]]) -> T:
        c = await self._c()
        try:
            return await op(c)
        except P9Error as e:
            if e.errno == errno.ENOENT or "unknown container" in str(e):
                raise NoSuchContainer(f"{self._where()}: {what}: {e}") from None
            raise NodeRefused(f"{self._where()}: {what}: {e}") from None
        except (ConnectionError, TimeoutError, OSError) as e:
            self._client = None
            await c.close()
            raise NodeUnreachable(f"{self._where()}: {what}: {e or 'timed out'}") from None

    async def _read(self, path: str) -> str:
        data = await self._do(f"read {path}", lambda c: c.read_file(path, READ_LIMIT))
        return data.decode("utf-8", "replace")

    async def _ctl(self, path: str, command: str, what: str) -> str:
        async with self._ctl_turns:
            return await self._ctl_now(path, command, what)

    async def _ctl_now(self, path: str, command: str, what: str) -> str:
        data = command.encode()
        c = await self._c()
        if len(data) > c.iounit - 64:
            reply = await self._do(what, lambda c: c.write_file(path, data, read_reply=True))
            return reply.decode("utf-8", "replace")
        if self._ctl_client is not c:  # a new connection: the fids of the old one are gone with it
            self._ctl_client, self._ctl_fids = c, []

        async def command_on(c: Client) -> bytes:
            fid = self._ctl_fids.pop() if self._ctl_fids else None
            if fid is None:
                fid = await c.walk(path)
                try:
                    await c.open(fid, P.ORDWR)
                except BaseException:
                    await c.clunk(fid)
                    raise
            try:
                if self._piped:
                    first, fresh = await c.write_read(fid, data, c.iounit)
                    if not fresh:
                        self._piped = False
                        first = await c.read(fid, 0, c.iounit)
                else:
                    await c.write(fid, 0, data)
                    first = await c.read(fid, 0, c.iounit)
                chunks, off = [first], len(first)
                while len(chunks[-1]) == c.iounit and (chunk := await c.read(fid, off, c.iounit)):
                    chunks.append(chunk)
                    off += len(chunk)
            except P9Error:  # the node refused the command: the fid is still good
                self._keep(c, fid)
                raise
            self._keep(c, fid)
            return b"".join(chunks)

        return (await self._do(what, command_on)).decode("utf-8", "replace")

    def _keep(self, c: Client, fid: int) -> None:
        if self._ctl_client is c and len(self._ctl_fids) < CTL_AT_ONCE:
            self._ctl_fids.append(fid)
        else:
            asyncio.ensure_future(c.clunk(fid))

    # ------------------------------------------------------------ about the node
    async def info(self) -> NodeInfo:
        res = parse_kv(await self._read("cluster/self/resources"))
        node_id = (await self._read("cluster/self/id")).strip()
        name = (await self._read("cluster/self/name")).strip()
        self.name = name or self.name
        try:
            mem = parse_size(res.get("mem", "0"), "mem", allow_zero=True)
            free = parse_size(res.get("mem_free", "0"), "mem_free", allow_zero=True)
            cpus = float(res.get("cpus", "0"))
        except (SizeError, ValueError) as e:
            raise NodeRefused(f"{self._where()}: unreadable resources: {e}") from None
        labels = {k[len("label."):]: v for k, v in res.items() if k.startswith("label.")}
        try:
            images: tuple[str, ...] | None = tuple(
                line.strip() for line in (await self._read("cluster/self/images")).splitlines() if line.strip())
        except NoSuchContainer:  # (ENOENT) a node that does not list its images
            images = None
        return NodeInfo(node_id, name, self.addr, cpus, mem, free, labels, images, self.kind)

    async def health(self) -> Health:
        res = parse_kv(await self._read("cluster/self/resources"))
        try:
            load = float(res["load"]) if "load" in res else None
            free = parse_size(res["mem_free"], "mem_free", allow_zero=True) if "mem_free" in res else None
            count = int(res["containers"]) if res.get("containers", "").isdigit() else None
        except (SizeError, ValueError) as e:
            return Health(False, f"unreadable resources: {e}")
        return Health(True, "", load, free, count)

    # ------------------------------------------------------------ containers
    async def run(self, spec: Spec) -> str:
        options = ([f"mem={format_size(spec.mem)}"] if spec.mem else []) + ([f"cpu={spec.cpus:g}"] if spec.cpus else [])
        options.append(f"name={spec.name}")
        options += [f"label={k}={v}" for k, v in spec.labels]
        options += [f"env={k}={v}" for k, v in spec.env]
        # Options go before "--", so no argument is ever taken for one.
        words = ["run", spec.image, *options, "--", *spec.args] if spec.args else ["run", spec.image, *options]
        cid = (await self._ctl("cluster/ctl", " ".join(shlex.quote(w) for w in words), f"run {spec.name}")).strip()
        if not cid.isdigit():
            raise NodeRefused(f"{self._where()}: run answered {cid!r}, not a container id")
        return cid

    async def stop(self, cid: str) -> None:
        await self._ctl("cluster/ctl", f"stop {cid}", f"stop container {cid}")

    async def destroy(self, cid: str) -> None:
        await self._ctl("cluster/ctl", f"destroy {cid}", f"destroy container {cid}")

    async def status(self, cid: str) -> ContainerInfo:
        return container_of(parse_kv(await self._read(f"cluster/containers/{cid}/status")))

    async def log(self, cid: str) -> bytes:
        path = f"cluster/containers/{cid}/log"
        return await self._do(f"read the log of container {cid}", lambda c: c.read_file(path, READ_LIMIT))

    async def list(self) -> list[ContainerInfo]:
        if self._listing is not False:
            try:
                text = await self._read("cluster/self/containers")
            except NoSuchContainer:  # an older node: one read per container
                self._listing = False
            else:
                self._listing = True
                return [container_of(parse_kv(block)) for block in text.split("\n\n") if block.strip()]
        entries = await self._do("list containers", lambda c: c.ls("cluster/containers", LIST_LIMIT))
        out = []
        for e in entries:
            try:
                out.append(await self.status(e.name))
            except NoSuchContainer:
                continue  # destroyed while we listed
        return out

    # ------------------------------------------------------------ discovery
    async def peers(self) -> builtins.list[PeerInfo]:
        entries = await self._do("list nodes", lambda c: c.ls("cluster/nodes", LIST_LIMIT))
        out = []
        for e in entries:
            try:
                name = (await self._read(f"cluster/nodes/{e.name}/name")).strip()
                addr = (await self._read(f"cluster/nodes/{e.name}/addr")).strip()
                status = (await self._read(f"cluster/nodes/{e.name}/status")).strip()
            except NoSuchContainer:
                continue  # the peer went away while we listed
            out.append(PeerInfo(e.name, name, addr, status))
        return out

    async def close(self) -> None:
        c, self._client = self._client, None
        self._ctl_fids, self._ctl_client = [], None
        if c is not None:
            await c.close()
