"""The Persys wire types, compiled from our .proto files when first used.

``agent()`` and ``control()`` give the two packages (``persys.agent.v1``,
``persys.control.v1``): their message classes and enums by name, and their
service descriptors; ``handler`` serves a service from an object's methods
and ``Stub`` calls one, with grpc's own (public) plumbing.

How the Python side comes to be: at first use, grpc_tools' protoc (in
process, about 40 ms for both files) compiles the .proto files shipped in
``proto/`` into a FileDescriptorSet in a temporary directory; its files are
added to protobuf's default descriptor pool and the message classes made
from the descriptors.  Nothing generated is written into the checkout or
installed, so a clean checkout, an editable install and a wheel behave
alike, and nothing stale can ever be imported; no cache directory has to
be writable; and no top-level ``persys`` Python package appears (generated
``_pb2`` modules would import each other as ``persys.agent.v1...``).  The
price is grpcio-tools as a run-time dependency.  The pool's file names
carry the package path (``persys/agent/v1/agent.proto``), never a bare
``agent.proto``: etcd clients register bare names in the same pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf import timestamp_pb2 as _timestamp_pb2  # noqa: F401 - puts timestamp.proto in the pool first
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from ..fs.server import file_limit

PROTO_ROOT = Path(__file__).resolve().parent / "proto"
AGENT_FILE = "persys/agent/v1/agent.proto"
CONTROL_FILE = "persys/control/v1/control.proto"
FILES = (AGENT_FILE, CONTROL_FILE)


log = logging.getLogger("fornax_sched.persys.protos")

# Told of every unary call served (``handler``) or made (``Stub``): the service's full name, the
# method, the status code's name ("OK", "NOT_FOUND") and the seconds it took.  Metrics plug in here.
RpcObserve = Callable[[str, str, str, float], None]


class ProtoError(RuntimeError):
    """The .proto files could not be compiled (a broken install): the message says which and why."""


@dataclass
class Api:
    """One proto package: ``api.ApplyWorkloadRequest(...)``, ``api.ActualState``, ``api.ACTUAL_STATE_RUNNING``."""

    file: FileDescriptor
    messages: dict[str, Any] = field(default_factory=dict)  # short name -> message class
    enums: dict[str, Any] = field(default_factory=dict)  # short name -> EnumTypeWrapper
    values: dict[str, int] = field(default_factory=dict)  # enum value name -> number (as generated modules have)

    @property
    def package(self) -> str:
        return self.file.package

    def service(self, name: str) -> ServiceDescriptor:
        return self.file.services_by_name[name]

    def __getattr__(self, name: str) -> Any:
        for table in (self.messages, self.enums, self.values):
            if name in table:
                return table[name]
        raise AttributeError(f"{self.file.package} has no {name}")


_lock = threading.Lock()
_apis: dict[str, Api] = {}

HANDSHAKE_MS = 10_000  # a connection must have said HTTP/2 (and TLS, if any) within this (grpc: 120 s)


def server_options(share: int = 32) -> list[tuple[str, Any]]:
    """Options every gRPC server of the project takes: at most a ``share``-th of the process's file
    limit as connections (at least 16), and a connection that does not finish its handshake within
    ``HANDSHAKE_MS`` closed.  Without them idle connections took every file, and the 9P server,
    which leaves an eighth of the limit for the process's other files, accepted no one."""
    return [("grpc.max_allowed_incoming_connections", max(16, file_limit() // share)),
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_MS)]


def agent() -> Api:
    """``persys.agent.v1``: the AgentService an agent hosts."""
    return _load()[AGENT_FILE]


def control() -> Api:
    """``persys.control.v1``: the AgentControl a scheduler hosts."""
    return _load()[CONTROL_FILE]


def _load() -> dict[str, Api]:
    with _lock:
        if not _apis:
            pool = descriptor_pool.Default()
            for fdp in compile_files():
                try:
                    pool.FindFileByName(fdp.name)
                except KeyError:
                    pool.Add(fdp)
            for name in FILES:
                _apis[name] = _api(pool.FindFileByName(name))
        return _apis


def compile_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """Our .proto files compiled by protoc (dependencies such as timestamp.proto left out)."""
    from grpc_tools import protoc

    include = str(files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory(prefix="fornax-proto-") as tmp:
        out = os.path.join(tmp, "set.pb")
        rc = protoc.main(["protoc", f"-I{include}", f"-I{PROTO_ROOT}", f"--descriptor_set_out={out}", *FILES])
        try:
            data = Path(out).read_bytes()
        except OSError:
            data = b""
    if rc != 0 or not data:
        raise ProtoError(f"cannot compile {', '.join(FILES)} in {PROTO_ROOT}: protoc exited {rc} "
                         f"(its message is above)")
    return list(descriptor_pb2.FileDescriptorSet.FromString(data).file)


def _api(fd: FileDescriptor) -> Api:
    api = Api(fd)
    for name, md in fd.message_types_by_name.items():
        api.messages[name] = message_factory.GetMessageClass(md)
    for name, ed in fd.enum_types_by_name.items():
        api.enums[name] = EnumTypeWrapper(ed)
        for v in ed.values:
            api.values[v.name] = v.number
    return api


# ---------------------------------------------------------------- serving and calling
def _classes(m: MethodDescriptor) -> tuple[Any, Any]:
    return message_factory.GetMessageClass(m.input_type), message_factory.GetMessageClass(m.output_type)


def _tell(observe: RpcObserve, service: str, method: str, code: str, began: float) -> None:
    try:
        observe(service, method, code, time.perf_counter() - began)
    except Exception:  # a metrics hook must never fail a call
        log.exception("gRPC observe hook failed")


def _code_name(code: Any, default: str) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # (grpc.aio's context gives the number on some paths)
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
    return default


def _observed(fn: Callable[..., Any], service: str, method: str, observe: RpcObserve) -> Callable[..., Any]:
    """A unary handler that tells ``observe`` how it ended: an abort's code, or OK, or UNKNOWN (a bug)."""

    async def serve(request: Any, context: grpc.aio.ServicerContext) -> Any:
        began = time.perf_counter()
        code = "UNKNOWN"
        try:
            reply = await fn(request, context)
            code = _code_name(context.code(), "OK")
            return reply
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code_name(context.code(), "UNKNOWN")
            raise
        finally:
            _tell(observe, service, method, code, began)

    return serve


def handler(service: ServiceDescriptor, impl: object, observe: RpcObserve | None = None) -> grpc.GenericRpcHandler:
    """Serve ``service`` from ``impl``'s coroutine methods named as the RPCs (``ApplyWorkload(request, context)``).

    A method ``impl`` lacks is left out, so a call of it gets UNIMPLEMENTED.  ``observe`` is told of
    every unary call served.
    """
    handlers = {}
    for m in service.methods:
        fn = getattr(impl, m.name, None)
        if fn is None:
            continue
        req, resp = _classes(m)
        make: Callable[..., grpc.RpcMethodHandler]
        if m.client_streaming and m.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif m.client_streaming:
            make = grpc.stream_unary_rpc_method_handler
        elif m.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
            if observe is not None:
                fn = _observed(fn, service.full_name, m.name, observe)
        handlers[m.name] = make(fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class Stub:
    """A client of ``service`` on a grpc.aio channel: ``await Stub(ch, svc).ApplyWorkload(req, timeout=10)``."""

    def __init__(self, channel: grpc.aio.Channel, service: ServiceDescriptor,
                 observe: RpcObserve | None = None) -> None:
        """``observe`` is told of every unary call made (its code, OK or the error's)."""
        self.service = service
        for m in service.methods:
            req, resp = _classes(m)
            path = f"/{service.full_name}/{m.name}"
            kw = dict(request_serializer=req.SerializeToString, response_deserializer=resp.FromString)
            if m.client_streaming and m.server_streaming:
                call: Any = channel.stream_stream(path, **kw)
            elif m.client_streaming:
                call = channel.stream_unary(path, **kw)
            elif m.server_streaming:
                call = channel.unary_stream(path, **kw)
            else:
                call = channel.unary_unary(path, **kw)
                if observe is not None:
                    call = _calling(call, service.full_name, m.name, observe)
            setattr(self, m.name, call)

    def __getattr__(self, name: str) -> Any:  # (for mypy: the RPCs are set per instance)
        raise AttributeError(f"{self.service.full_name} has no rpc {name}")


def _calling(call: Any, service: str, method: str, observe: RpcObserve) -> Callable[..., Any]:
    """A unary call that tells ``observe`` its code when it ends."""

    async def rpc(request: Any, **kw: Any) -> Any:
        began = time.perf_counter()
        try:
            reply = await call(request, **kw)
        except grpc.aio.AioRpcError as e:
            _tell(observe, service, method, _code_name(e.code(), "UNKNOWN"), began)
            raise
        except asyncio.CancelledError:
            _tell(observe, service, method, "CANCELLED", began)
            raise
        _tell(observe, service, method, "OK", began)
        return reply

    return rpc
