"""The Persys side of a fornax-node: AgentService served next to the 9P tree, on the same event loop.

The node daemon makes one ``PersysSide`` when it is given ``--persys``
and starts it once its runtime has adopted its containers (and forked its
fork server: grpc starts threads, which must not exist at that fork).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from . import protos, tls
from .agent import Agent
from .register import Facts, Registrar

log = logging.getLogger(__name__)


@dataclass
class PersysConfig:
    listen: str  # HOST:PORT of AgentService
    reconcile: float = 10.0  # seconds between reconcile passes (0: none)
    scheduler: str | None = None  # HOST:PORT of an AgentControl to register with
    advertise: str | None = None  # the grpc_endpoint it should dial, if not the listen address
    tls: tls.TLSFiles | None = None  # mTLS for both the served AgentService and the calls to the scheduler
    insecure: bool = False  # plain gRPC allowed off loopback


def split_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port); ValueError naming the text if it is not one."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad address {text!r}: want HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


class PersysSide:
    def __init__(self, host: Facts, state: Path, cfg: PersysConfig, observe: protos.RpcObserve | None = None) -> None:
        """Checks the options (ValueError naming the one that is wrong); starts nothing.  ``observe`` is
        told of every AgentService call served (the node's metrics)."""
        listen_host, _ = split_hostport(cfg.listen)
        if cfg.tls is None:
            tls.check_plain(f"--persys {cfg.listen}", listen_host, cfg.insecure)
        if cfg.scheduler is not None:
            scheduler_host, _ = split_hostport(cfg.scheduler)
            if cfg.tls is None:
                tls.check_plain(f"--persys-scheduler {cfg.scheduler}", scheduler_host, cfg.insecure)
            if cfg.advertise is not None:
                split_hostport(cfg.advertise)
            elif listen_host in ("0.0.0.0", "::", ""):
                raise ValueError(f"--persys {cfg.listen} is every address, which a scheduler cannot dial: "
                                 f"give --persys-advertise HOST:PORT")
        self.cfg = cfg
        self.host = host
        self.state = state
        self.agent = Agent(host, state, reconcile_every=cfg.reconcile)
        self.server: grpc.aio.Server | None = None
        self.registrar: Registrar | None = None
        self.address = cfg.listen  # with the real port once listening
        self.observe = observe

    async def start(self) -> None:
        await self.agent.start()
        server = grpc.aio.server(options=protos.server_options(share=64))  # (schedulers: a few)
        server.add_generic_rpc_handlers((protos.handler(protos.agent().service("AgentService"), self.agent,
                                                        self.observe),))
        host, _ = split_hostport(self.cfg.listen)
        try:
            if self.cfg.tls is not None:
                port = server.add_secure_port(self.cfg.listen, tls.server_credentials(self.cfg.tls))
            else:
                port = server.add_insecure_port(self.cfg.listen)
        except RuntimeError as e:
            port, why = 0, str(e)
        else:
            why = "address in use or not this machine's"
        if not port:
            await self.agent.close()
            raise OSError(f"persys: cannot listen on {self.cfg.listen}: {why}")
        await server.start()
        self.server = server
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("persys AgentService on %s (%s)", self.address, "mTLS" if self.cfg.tls else "plain")
        if self.cfg.scheduler is not None:
            self.registrar = Registrar(self.agent, self.host, self.cfg.scheduler, self.cfg.advertise or self.address,
                                       state=str(self.state),
                                       credentials=tls.channel_credentials(self.cfg.tls) if self.cfg.tls else None)
            await self.registrar.start()

    async def stop(self) -> None:
        if self.registrar is not None:
            await self.registrar.stop()
        if self.server is not None:
            await self.server.stop(1.0)
        await self.agent.close()
