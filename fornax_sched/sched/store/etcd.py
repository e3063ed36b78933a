"""The replicated store: the KV primitive on an etcd cluster (etcd's v3 API over gRPC).

    etcd://HOST:PORT[,HOST:PORT...][/PREFIX][?OPTION=VALUE&...]

Every key of one store lives under PREFIX (default ``fornax-sched``), so
several clusters can share one etcd.  The mapping onto etcd:

- a row's revision is etcd's ``mod_revision``; a compare is ``mod_revision ==
  N`` (0: the key does not exist), and a transaction is one etcd Txn, its
  operations ordered the way our primitive means them (a later operation on
  a key wins) because etcd refuses a key twice in one Txn; each Txn also
  puts a marker ``w/CLIENT/SEQ`` so that one whose answer was lost is sent
  again and answered rightly (two of ``max_ops`` are the marker's);
- every call asks for a member with a leader (``hasleader``), so during an
  election it is refused at once, before anything is applied, and sent again;
- a snapshot pins the revision of its first read and reads every later
  range at it (``revision=``), so a long scan sees one state;
- the feed is a watch of the prefix from a revision, its events grouped by
  revision (one list per transaction); a revision etcd has compacted away
  fails with ``Compacted`` so the caller reloads, and a broken stream is
  resumed from the next revision on another member for up to ``timeout``;
- leases are etcd leases (whole seconds, rounded up; etcd may grant more);
- a lock is the key ``h/NAME`` created under a lease if absent (as etcd's
  election does), waited for by watching its deletion, and kept alive by a
  task of its own: the holder learns it ``lost`` the lock when the lease
  cannot be renewed within its TTL, or when a transaction guarded by the key
  fails on it (the failure branch of that same Txn reads the key);
- old revisions are compacted every ``compact_every`` seconds, keeping the
  last ``keep`` (compaction is etcd-wide: clusters sharing an etcd share it).

Options: ``timeout`` (seconds every call may take, retries included;
default 3), ``max_ops`` (operations per Txn, etcd's ``--max-txn-ops``;
default 128), ``max_bytes`` (bytes per Txn, below etcd's
``--max-request-bytes``; default 1 MiB), ``keep`` (revisions kept for
watches; 0 leaves compaction to etcd; default 10000), ``compact_every``
(seconds; default 60).  A call that cannot reach a member within its
timeout raises StoreError naming the endpoints and the cause.

The gRPC stubs and messages are aetcd's generated etcd API; aetcd's own
client is not used, because it has no reads at a revision, no limits, no
deadline per call and one endpoint only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import grpc
from aetcd import rpc

from .api import Compacted, StoreBusy, StoreError
from .kv import Change, Compare, Delete, Put, Range, Row, prefix_end

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PREFIX = "fornax-sched"
LOCKS = "h/"
WRITES = "w/"  # w/CLIENT/SEQ: put by each write, so that a write whose answer was lost can be told applied
OWN_OPS = 2  # operations of each Txn that are the store's own (that marker, and dropping older ones)
OPTIONS: dict[str, Callable[[str], Any]] = {
    "timeout": float, "max_ops": int, "max_bytes": int, "keep": int, "compact_every": float,
}
# Asked of every call: a member that has no leader (an election under way) answers at once that it
# has none, before it applies anything, so the call is sent again (to it or another member) until
# a leader is elected, instead of waiting on a proposal that may or may not be applied.
LEADER = (("hasleader", "true"),)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),  # a watch may catch up on many revisions at once
    ("grpc.max_send_message_length", -1),
    ("grpc.keepalive_time_ms", 10_000),  # etcd refuses pings more often than every 5 s
    ("grpc.keepalive_timeout_ms", 5_000),  # a silent member ends a watch within 15 s
    ("grpc.initial_reconnect_backoff_ms", 100),  # a member that is back is used again within a second
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 0),  # we retry ourselves, only what is safe to repeat
]


def parse_spec(where: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """``HOST:PORT[,...][/PREFIX][?opts]`` (what follows ``etcd://``): endpoints, prefix, options."""
    rest, _, query = where.partition("?")
    hosts, _, prefix = rest.partition("/")
    endpoints = []
    for part in hosts.split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreError(f"etcd store etcd://{where}: want HOST:PORT[,HOST:PORT...], not {part.strip()!r}")
        endpoints.append((host, int(port)))
    prefix = prefix.strip("/")
    if any(c in prefix for c in "\0\n") or "//" in prefix:
        raise StoreError(f"etcd store etcd://{where}: a bad key prefix {prefix!r}")
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if name not in OPTIONS:
            raise StoreError(f"etcd store etcd://{where}: unknown option {name!r} (want {', '.join(OPTIONS)})")
        try:
            options[name] = OPTIONS[name](value)
        except ValueError:
            raise StoreError(f"etcd store etcd://{where}: option {name}={value!r} is not a number") from None
    return endpoints, (prefix or DEFAULT_PREFIX) + "/", options


def _cause(e: BaseException | None) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        details = (e.details() or "").strip()
        return f"{e.code().name.lower()}: {details}" if details else e.code().name.lower()
    return str(e) if e is not None else "no answer"


def _unsent(e: grpc.aio.AioRpcError) -> bool:
    """The request never reached a member (so a write may be sent again)."""
    details = (e.details() or "").lower()
    return e.code() == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in details or "connection refused" in details or "no leader" in details
        or "not capable" in details)


class _Snapshot:
    """Reads at one revision: the one its first read saw."""

    def __init__(self, kv: EtcdKV) -> None:
        self.kv = kv
        self.revision = 0

    async def read(self, r: Range) -> list[Row]:
        kv = self.kv
        req = rpc.RangeRequest(key=kv._k(r.start), range_end=kv._k(r.end), limit=r.limit, revision=self.revision,
                               sort_order=rpc.RangeRequest.DESCEND if r.reverse else rpc.RangeRequest.ASCEND,
                               sort_target=rpc.RangeRequest.KEY)
        resp = await kv._call("read", lambda t: kv._kvstub.Range(req, timeout=t, metadata=LEADER), retry=True)
        if not self.revision:
            self.revision = resp.header.revision
        n = len(kv.prefix_bytes)
        return [Row(x.key[n:].decode(), x.value.decode(), x.mod_revision, x.lease) for x in resp.kvs]


class _Feed:
    """Changes to [start, end) after a revision, one list per revision, from an etcd watch."""

    def __init__(self, kv: EtcdKV, start: bytes, end: bytes, since: int) -> None:
        self.kv = kv
        self.start = start
        self.end = end
        self.next = since + 1  # the first revision not yet delivered
        self._closing = False
        self._call: Any = None

    def __aiter__(self) -> AsyncIterator[list[Change]]:
        return self._run()

    async def close(self) -> None:
        self._closing = True
        if self._call is not None:
            self._call.cancel()
        self.kv._feeds.discard(self)

    async def _run(self) -> AsyncIterator[list[Change]]:
        kv = self.kv
        loop = asyncio.get_running_loop()
        broken_since: float | None = None
        last: BaseException | None = None
        n = len(kv.prefix_bytes)
        while not self._closing:
            if broken_since is not None and loop.time() - broken_since > kv.timeout:
                raise StoreError(f"the watch of the store {kv.where} broke and could not be resumed within "
                                 f"{kv.timeout:g}s ({_cause(last)})")
            call = kv._watchstub.Watch(metadata=LEADER)
            self._call = call
            try:
                await asyncio.wait_for(call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=self.start, range_end=self.end, start_revision=self.next))), kv.timeout)
                created = await asyncio.wait_for(call.read(), kv.timeout)
                if created is grpc.aio.EOF:
                    raise StoreError(f"the store {kv.where} ended a watch as it began")
                while True:
                    resp = created if created is not None else await call.read()
                    created = None
                    if resp is grpc.aio.EOF:
                        raise StoreError(f"the store {kv.where} ended a watch")
                    if resp.compact_revision:
                        raise Compacted(f"the store {kv.where} keeps no changes from revision {self.next - 1} on "
                                        f"(compacted up to {resp.compact_revision}): read it again",
                                        resp.compact_revision)
                    if resp.canceled:
                        raise StoreError(f"the store {kv.where} cancelled a watch: {resp.cancel_reason or 'no reason'}")
                    broken_since = None
                    group: list[Change] = []
                    for ev in resp.events:
                        rev = ev.kv.mod_revision
                        if group and group[-1].revision != rev:
                            self.next = group[-1].revision + 1
                            yield group
                            group = []
                        value = None if ev.type == rpc.Event.DELETE else ev.kv.value.decode()
                        group.append(Change(ev.kv.key[n:].decode(), value, rev))
                    if group:
                        self.next = group[-1].revision + 1
                        yield group
            except asyncio.CancelledError:
                if self._closing:
                    return
                raise
            except (grpc.aio.AioRpcError, TimeoutError) as e:
                if self._closing:
                    return
                if isinstance(e, grpc.aio.AioRpcError) and e.code() not in (
                        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL):
                    raise StoreError(f"the store {kv.where} refused a watch: {_cause(e)}") from None
                last = e
                if broken_since is None:
                    broken_since = loop.time()
                await asyncio.sleep(0.1)
            finally:
                call.cancel()
                self._call = None


class _Hold:
    """A held lock: its key, under a lease this object keeps alive."""

    def __init__(self, kv: EtcdKV, name: str, identity: str, lease: int, ttl: float) -> None:
        self.kv = kv
        self.key = LOCKS + name
        self.identity = identity
        self.lease = lease
        self.ttl = ttl
        self.lost = asyncio.Event()
        self.guard: Compare | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep(), name=f"store-lease-{self.key}")

    async def _keep(self) -> None:
        """Renew the lease every third of its TTL; past the TTL without a renewal it is lost."""
        loop = asyncio.get_running_loop()
        expires = loop.time() + self.ttl
        while not self.lost.is_set():
            await asyncio.sleep(max(self.ttl / 3, 0.05))
            sent = loop.time()
            if sent >= expires:  # paused, or etcd unreachable, for longer than the lease lives
                break
            try:
                alive = await self.kv._keepalive(self.lease, min(self.kv.timeout, expires - sent))
            except StoreError as e:
                log.debug("cannot renew the lease of %s: %s", self.key, e)
                continue
            if not alive:
                break
            expires = sent + self.ttl
        self._lose()

    def _lose(self) -> None:
        if not self.lost.is_set():
            log.warning("lost the lock %s of the store %s", self.key, self.kv.where)
            self.lost.set()
        if self.kv._holds.get(self.key) is self:
            del self.kv._holds[self.key]

    async def release(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        if self.kv._holds.get(self.key) is self:
            del self.kv._holds[self.key]
        with contextlib.suppress(StoreError):
            await self.kv.revoke(self.lease)


def _normalize(ops: Sequence[Put | Delete]) -> list[Put | Delete]:
    """The operations with the meaning of applying them in order, as one etcd Txn accepts them:
    no key twice, no put inside a range deleted in the same Txn."""
    final: dict[str, Put | Delete] = {}
    ranges: list[Delete] = []
    for op in ops:
        if isinstance(op, Delete) and op.end:
            for k in [k for k in final if op.key <= k < op.end]:
                del final[k]
            ranges.append(op)
        else:
            final.pop(op.key, None)
            final[op.key] = op
    puts = sorted(k for k, op in final.items() if isinstance(op, Put))
    out: list[Put | Delete] = []
    for r in ranges:  # cut each range around the keys put after it
        lo = r.key
        for k in puts:
            if lo <= k < r.end:
                if lo < k:
                    out.append(Delete(lo, k))
                lo = k + "\0"
        if lo < r.end:
            out.append(Delete(lo, r.end))
    out.extend(final.values())
    return out


class EtcdKV:
    """The KV primitive (kv.KV) on etcd (see the module docstring)."""

    kind = "etcd"

    def __init__(self, endpoints: list[tuple[str, int]], prefix: str, *, timeout: float = 3.0, max_ops: int = 128,
                 max_bytes: int = 1 << 20, keep: int = 10_000, compact_every: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not 0.05 <= timeout <= 600:
            raise StoreError(f"etcd store: timeout={timeout:g}: want 0.05 to 600 seconds")
        if max_ops < 2 + OWN_OPS or max_bytes < 4096 or keep < 0 or compact_every <= 0:
            raise StoreError(f"etcd store: want max_ops >= {2 + OWN_OPS}, max_bytes >= 4096, keep >= 0, "
                             "compact_every > 0")
        self.endpoints = endpoints
        self.prefix = prefix
        self.prefix_bytes = prefix.encode()
        self.where = "etcd://" + ",".join(f"{h}:{p}" for h, p in endpoints) + "/" + prefix.rstrip("/")
        self.timeout = timeout
        self.max_ops = max_ops - OWN_OPS  # what a batch may use of etcd's limit
        self.max_bytes = max_bytes
        self.keep = keep
        self.compact_every = compact_every
        self.clock = clock
        self.created = False
        self._channel: grpc.aio.Channel | None = None
        self._kvstub: Any = None
        self._leasestub: Any = None
        self._watchstub: Any = None
        self._feeds: set[_Feed] = set()
        self._holds: dict[str, _Hold] = {}
        self._compacted = 0
        self._client = secrets.token_hex(6)
        self._seq = 0
        self._inflight: set[int] = set()
        self._compactor: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------ opening
    @classmethod
    async def open(cls, where: str, *, create: bool = True, fresh: bool = False,
                   clock: Callable[[], float] = time.time, **kw: Any) -> EtcdKV:
        endpoints, prefix, options = parse_spec(where)
        options.update({k: v for k, v in kw.items() if k in OPTIONS})
        kv = cls(endpoints, prefix, clock=clock, **options)
        try:
            await kv._connect()
            async with kv.snapshot() as snap:
                held = await snap.read(Range("", "\U0010ffff", 1))
            if held and fresh:
                raise StoreError(f"the store {kv.where} holds keys already: --fresh does not delete them on etcd; "
                                 "export what it holds (fornax-sched store export), delete the prefix "
                                 f"(etcdctl del --prefix {prefix}) or choose another prefix")
            if not held:
                if not (create or fresh):
                    raise StoreError(f"the store {kv.where} holds no scheduler state (no keys under its prefix): "
                                     "refusing to start afresh on it; start with --fresh to begin a new store")
                kv.created = True
            if kv.keep:
                kv._compactor = asyncio.get_running_loop().create_task(kv._compact_loop(), name="store-compact")
        except BaseException:
            await kv.close()
            raise
        return kv

    async def _connect(self) -> None:
        if len(self.endpoints) == 1:
            host, port = self.endpoints[0]
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        else:  # several members: one channel that moves to the next address when one fails
            addrs = [await self._resolve(h, p) for h, p in self.endpoints]
            v6 = [":" in a for a, _ in addrs]
            if any(v6) and not all(v6):
                raise StoreError(f"the store {self.where}: its endpoints mix IPv4 and IPv6 addresses")
            scheme = "ipv6:" if all(v6) else "ipv4:"
            target = scheme + ",".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in addrs)
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._kvstub = rpc.KVStub(self._channel)
        self._leasestub = rpc.LeaseStub(self._channel)
        self._watchstub = rpc.WatchStub(self._channel)

    async def _resolve(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.timeout)
        except (OSError, TimeoutError) as e:
            raise StoreError(f"the store {self.where}: cannot resolve {host}: {e or 'timed out'}") from None
        infos.sort(key=lambda i: i[0] != socket.AF_INET)
        return str(infos[0][4][0]), port

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._compactor is not None:
            self._compactor.cancel()
            with contextlib.suppress(BaseException):
                await self._compactor
        for f in list(self._feeds):
            await f.close()
        for h in list(self._holds.values()):
            await h.release()
        if self._seq:  # this client's write markers
            mine = f"{WRITES}{self._client}/"
            req = rpc.TxnRequest(success=[self._op(Delete(mine, prefix_end(mine)))])
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._kvstub.Txn(req, timeout=self.timeout, metadata=LEADER)
        if self._channel is not None:
            await self._channel.close(grace=None)

    # ------------------------------------------------------------ calls
    def _k(self, key: str) -> bytes:
        return self.prefix_bytes + key.encode()

    async def _call(self, what: str, fn: Callable[[float], Awaitable[T]], *, retry: bool) -> T:
        """One call within ``timeout``; again while no member answers (a write only if it was not sent)."""
        if self._closed or self._kvstub is None:
            raise StoreError(f"the store {self.where} is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        last: BaseException | None = None
        pause = 0.02
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise StoreError(f"cannot {what} the store {self.where}: no member answered within "
                                 f"{self.timeout:g}s ({_cause(last)})")
            try:
                return await fn(left)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise StoreError(f"cannot {what} the store {self.where}: no member answered within "
                                     f"{self.timeout:g}s ({_cause(last or e)})"
                                     + ("" if retry else "; whether it was applied is unknown")) from None
                if code == grpc.StatusCode.UNAVAILABLE and (retry or _unsent(e)):
                    last = e
                    await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                    pause = min(pause * 2, 0.25)
                    continue
                if code == grpc.StatusCode.UNAVAILABLE:
                    raise StoreError(f"cannot {what} the store {self.where}: the member went away during the call "
                                     f"({_cause(e)}); whether it was applied is unknown") from None
                raise self._error(what, e) from None

    def _error(self, what: str, e: grpc.aio.AioRpcError) -> StoreError:
        details = e.details() or ""
        if "compacted" in details:
            return Compacted(f"the store {self.where} no longer keeps that revision ({details}): read it again", 0)
        if "too many operations" in details:
            return StoreError(f"the store {self.where} refused a transaction: {details} (etcd's --max-txn-ops is "
                              f"below this store's max_ops={self.max_ops}: lower it in the store URL)")
        if "too large" in details:
            return StoreError(f"the store {self.where} refused a transaction: {details} (etcd's "
                              f"--max-request-bytes is below this store's max_bytes={self.max_bytes})")
        if "lease not found" in details:
            return StoreError(f"the store {self.where}: a lease has expired ({details})")
        return StoreError(f"cannot {what} the store {self.where}: {_cause(e)}")

    # ------------------------------------------------------------ transactions
    async def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> int | None:
        """One etcd Txn.  It also puts a marker of its own, so that when its answer is lost (the
        member or the leader went away during the call) it is sent again, and a second answer
        that its compares failed is told apart from the first having been applied: the failure
        branch reads the marker.  (Sending one again is safe: a batch's puts and deletes name
        their keys and values, so applying it twice leaves what applying it once does.)"""
        guarded = [h for c in compares if (h := self._holds.get(c.key)) is not None
                   and h.guard is not None and h.guard.revision == c.revision]
        self._seq += 1
        seq = self._seq
        self._inflight.add(seq)
        mine = f"{WRITES}{self._client}/"
        marker = f"{mine}{seq:012d}"
        own: list[Put | Delete] = [Put(marker, ""), Delete(mine, f"{mine}{min(self._inflight):012d}")]
        req = rpc.TxnRequest(
            compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=self._k(c.key),
                                 mod_revision=c.revision) for c in compares],
            success=[self._op(op) for op in _normalize(ops)] + [self._op(op) for op in own],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=self._k(h.key), keys_only=True))
                     for h in guarded] + [rpc.RequestOp(request_range=rpc.RangeRequest(key=self._k(marker),
                                                                                      keys_only=True))])
        try:
            resp = await self._write(req)
        finally:
            self._inflight.discard(seq)
        if resp.succeeded:
            return int(resp.header.revision)
        applied = resp.responses[-1].response_range.kvs
        if applied:  # an earlier sending was applied, and its answer lost
            return int(applied[0].mod_revision)
        for h, r in zip(guarded, resp.responses, strict=False):  # did the guard fail, or another compare?
            kvs = r.response_range.kvs
            if h.guard is not None and (not kvs or kvs[0].mod_revision != h.guard.revision):
                h._lose()
        return None

    async def _write(self, req: Any) -> Any:
        """Send a Txn until it is answered, within ``timeout``: each sending may take a third of it."""
        if self._closed or self._kvstub is None:
            raise StoreError(f"the store {self.where} is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        each = max(self.timeout / 3, 0.5)
        last: BaseException | None = None
        sent = False
        pause = 0.02
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise StoreError(f"cannot write the store {self.where}: no member answered within "
                                 f"{self.timeout:g}s ({_cause(last)})"
                                 + ("; whether it was applied is unknown" if sent else ""))
            try:
                return await self._kvstub.Txn(req, timeout=min(each, left), metadata=LEADER)
            except grpc.aio.AioRpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise self._error("write", e) from None
                last = e
                sent = sent or not _unsent(e)
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                pause = min(pause * 2, 0.25)

    def _op(self, op: Put | Delete) -> Any:
        if isinstance(op, Put):
            return rpc.RequestOp(request_put=rpc.PutRequest(key=self._k(op.key), value=op.value.encode(),
                                                            lease=op.lease))
        end = self._k(op.end) if op.end else b""
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._k(op.key), range_end=end))

    # ------------------------------------------------------------ reads
    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[_Snapshot]:
        yield _Snapshot(self)

    # ------------------------------------------------------------ watches
    def subscribe(self, prefix: str, since: int) -> _Feed:
        start = self._k(prefix)
        end = self._k(prefix_end(prefix)) if prefix else prefix_end_bytes(self.prefix_bytes)
        feed = _Feed(self, start, end, since)
        self._feeds.add(feed)
        return feed

    # ------------------------------------------------------------ leases
    async def grant(self, ttl: float) -> int:
        req = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        resp = await self._call("grant a lease in",
                                lambda t: self._leasestub.LeaseGrant(req, timeout=t, metadata=LEADER), retry=True)
        if resp.error:
            raise StoreError(f"the store {self.where} granted no lease: {resp.error}")
        return int(resp.ID)

    async def keepalive(self, lease: int) -> bool:
        return await self._keepalive(lease, self.timeout)

    async def _keepalive(self, lease: int, timeout: float) -> bool:
        async def once(t: float) -> Any:
            call = self._leasestub.LeaseKeepAlive(timeout=t, metadata=LEADER)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
                return await call.read()
            finally:
                call.cancel()

        resp = await self._call("renew a lease in", lambda t: once(min(t, timeout)), retry=True)
        return resp is not grpc.aio.EOF and resp.TTL > 0

    async def revoke(self, lease: int) -> None:
        req = rpc.LeaseRevokeRequest(ID=lease)
        try:
            await self._call("revoke a lease in",
                             lambda t: self._leasestub.LeaseRevoke(req, timeout=t, metadata=LEADER), retry=True)
        except StoreError as e:
            if "lease not found" not in str(e):
                raise

    # ------------------------------------------------------------ the lock
    async def lock(self, name: str, identity: str, ttl: float, wait: bool) -> _Hold:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock()))
        text = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}: {identity}"
        key = self._k(LOCKS + name)
        hold: _Hold | None = None
        try:
            while True:
                if hold is None or hold.lost.is_set():  # a lease of our own, kept alive while we wait
                    if hold is not None:
                        await hold.release()
                    hold = _Hold(self, name, identity, await self.grant(ttl), ttl)
                    hold.start()
                req = rpc.TxnRequest(
                    compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key,
                                         create_revision=0)],
                    success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=text.encode(),
                                                                      lease=hold.lease))],
                    failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))])
                resp = await self._write(req)
                kvs = resp.responses[0].response_range.kvs if not resp.succeeded else []
                if resp.succeeded or (kvs and kvs[0].lease == hold.lease):  # (ours: an earlier sending won)
                    hold.guard = Compare(hold.key, int(kvs[0].mod_revision if kvs else resp.header.revision))
                    self._holds[hold.key] = hold
                    return hold
                holder = kvs[0].value.decode(errors="replace") if kvs else "unknown"
                if not wait:
                    raise StoreBusy(f"the store {self.where} is in use by another scheduler ({holder}); two "
                                    "schedulers on one state would undo each other's work: stop that one first")
                await self._wait_gone(key, int(resp.header.revision))
        except BaseException:
            if hold is not None:
                await hold.release()
            raise

    async def _wait_gone(self, key: bytes, seen: int) -> None:
        """Until ``key`` is deleted after revision ``seen`` (it may be gone already)."""
        feed = _Feed(self, key, key + b"\0", seen)
        self._feeds.add(feed)
        try:
            async for changes in feed:
                if any(c.value is None for c in changes):
                    return
        finally:
            await feed.close()

    async def holder(self, name: str) -> str | None:
        async with self.snapshot() as snap:
            rows = await snap.read(Range(LOCKS + name, LOCKS + name + "\0", 1))
        return rows[0].value if rows else None

    # ------------------------------------------------------------ compaction
    async def compact(self) -> int:
        """Forget revisions older than the last ``keep``: the revision compacted to (0: nothing to do)."""
        async with self.snapshot() as snap:
            await snap.read(Range("i", "i\0", 1))
        target = snap.revision - self.keep
        if target <= self._compacted:
            return 0
        req = rpc.CompactionRequest(revision=target)
        try:
            await self._call("compact", lambda t: self._kvstub.Compact(req, timeout=t, metadata=LEADER), retry=True)
        except Compacted:
            pass  # someone compacted further already
        self._compacted = target
        return target

    async def _compact_loop(self) -> None:
        while True:
            await asyncio.sleep(self.compact_every)
            try:
                await self.compact()
            except StoreError as e:
                log.debug("compaction of %s: %s", self.where, e)


def prefix_end_bytes(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])
