"""The Persys side of ``fornax-sched serve`` (docs/persys-bridge.8.md): its options, the agents' backend
settings, the AgentControl server and the drift loop, started and stopped with the scheduler."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..persys import tls
from ..persys.node import split_hostport
from .backends import Backend, connect
from .backends.persys import PREFIX, Options, PersysAgent, parse_address

if TYPE_CHECKING:
    from ..persys.protos import RpcObserve

log = logging.getLogger("fornax_sched.sched.bridge")

DEFAULT_CONTROL = "127.0.0.1:8085"
CONTROL_USER = "persys-control"  # who the log says wrote a command that came through AgentControl


@dataclass
class BridgeConfig:
    agents: list[str] = field(default_factory=list)  # persys!... addresses
    control: str | None = DEFAULT_CONTROL  # None: off
    control_given: bool = False  # --control was written (a taken address is then an error, not a warning)
    heartbeat_interval: int = 60
    lease_intervals: int = 3
    poll: float = 1.0
    apply_timeout: float = 45.0
    delete_timeout: float = 60.0
    grace: float = 15.0
    drift_interval: float = 30.0
    tls: tls.TLSFiles | None = None
    insecure: bool = False

    def options(self, rpc_timeout: float, observe: RpcObserve | None = None) -> Options:
        return Options(rpc_timeout=rpc_timeout, apply_timeout=self.apply_timeout, delete_timeout=self.delete_timeout,
                       poll=self.poll, grace=self.grace,
                       credentials=tls.channel_credentials(self.tls) if self.tls is not None else None,
                       observe=observe)


def agent_address(text: str) -> str:
    """``--agent HOST:PORT[,name=N,cpus=C,mem=SIZE,label.K=V]`` as the node address ``persys!HOST:PORT!...``."""
    endpoint, _, opts = text.partition(",")
    try:
        addr = f"{PREFIX}{endpoint}" + (f"!{opts}" if opts else "")
        return parse_address(addr).text()
    except ValueError as e:
        raise ValueError(f"--agent {text}: {str(e).split(': ', 1)[-1]}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Persys agents (docs/persys-bridge.8.md)")
    g.add_argument("--agent", action="append", default=[], metavar="HOST:PORT[,name=N,cpus=C,mem=SIZE]",
                   help="drive the Persys agent (AgentService) at this address (repeat); name and capacity as "
                        "given (default agent-HOST-PORT, 1 cpu, 1G)")
    g.add_argument("--control", default=None, metavar="HOST:PORT|off",
                   help=f"serve persys.control.v1.AgentControl here, for agents to register and clients to drive "
                        f"the scheduler (default {DEFAULT_CONTROL}; a taken default is only a warning)")
    g.add_argument("--heartbeat-interval", type=int, default=60, metavar="S",
                   help="heartbeat interval answered to agents (default 60); a lease is 3 intervals")
    g.add_argument("--persys-poll", type=float, default=1.0, metavar="S",
                   help="longest wait between two status looks at an applied workload (default 1)")
    g.add_argument("--apply-timeout", type=float, default=45.0, metavar="S", help="default 45")
    g.add_argument("--delete-timeout", type=float, default=60.0, metavar="S", help="default 60")
    g.add_argument("--missing-grace", type=float, default=15.0, metavar="S",
                   help="how long a workload missing on an agent is left to the agent's reconcile (default 15)")
    g.add_argument("--drift-interval", type=float, default=30.0, metavar="S",
                   help="seconds between drift comparisons (default 30; 0: none)")
    g.add_argument("--tls-ca", default=None, metavar="FILE")
    g.add_argument("--tls-cert", default=None, metavar="FILE")
    g.add_argument("--tls-key", default=None, metavar="FILE",
                   help="mTLS for AgentControl and the calls to agents (all three, PEM)")
    g.add_argument("--insecure", action="store_true", help="allow plain gRPC off loopback")


def config_of(args: argparse.Namespace) -> BridgeConfig:
    """The options checked (ValueError naming the one that is wrong)."""
    agents = [agent_address(a) for a in args.agent]
    control: str | None = DEFAULT_CONTROL if args.control is None else args.control
    if control == "off":
        control = None
    elif control is not None:
        split_hostport(control)
    if not 1 <= args.heartbeat_interval <= 3600:
        raise ValueError("--heartbeat-interval: want 1 to 3600 seconds")
    for opt, v, lo in (("--persys-poll", args.persys_poll, 0.01), ("--apply-timeout", args.apply_timeout, 0.1),
                       ("--delete-timeout", args.delete_timeout, 0.1), ("--missing-grace", args.missing_grace, 0.0)):
        if not lo <= v <= 86400:
            raise ValueError(f"{opt}: want {lo:g} to 86400 seconds")
    if not (args.drift_interval == 0 or 0.1 <= args.drift_interval <= 86400):
        raise ValueError("--drift-interval: want 0 (none) or 0.1 to 86400 seconds")
    files = tls.load(args.tls_ca, args.tls_cert, args.tls_key)
    cfg = BridgeConfig(agents=agents, control=control, control_given=args.control is not None,
                       heartbeat_interval=args.heartbeat_interval, poll=args.persys_poll,
                       apply_timeout=args.apply_timeout, delete_timeout=args.delete_timeout, grace=args.missing_grace,
                       drift_interval=args.drift_interval, tls=files, insecure=args.insecure)
    if files is None:
        for a in agents:
            host, _ = split_hostport(parse_address(a).endpoint)
            tls.check_plain(f"--agent {parse_address(a).endpoint}", host, args.insecure)
        if control is not None:
            tls.check_plain(f"--control {control}", split_hostport(control)[0], args.insecure)
    return cfg


def connector(cfg: BridgeConfig, rpc_timeout: float, observe: RpcObserve | None = None) -> Callable[[str], Backend]:
    """The scheduler's backend factory: agents with the bridge's settings (their calls told to
    ``observe``), any other kind as usual."""
    opts = cfg.options(rpc_timeout, observe)

    def make(addr: str) -> Backend:
        if addr.startswith(PREFIX):
            if cfg.tls is None:  # (an address from the store or a registration: the same rule as --agent)
                tls.check_plain(f"agent {addr}", split_hostport(parse_address(addr).endpoint)[0], cfg.insecure)
            return PersysAgent(addr, options=opts)
        return connect(addr, timeout=rpc_timeout)

    return make


class Bridge:
    """AgentControl (if wanted) and the drift loop, over a started scheduler."""

    def __init__(self, cfg: BridgeConfig, observe: RpcObserve | None = None) -> None:
        self.cfg = cfg
        self.observe = observe  # told of every AgentControl call served
        self.control: Any = None
        self.service: Any = None
        self.address: str | None = None

    async def start(self, sched: Any) -> None:
        from .control import ControlServer, ControlService

        if self.cfg.control is None:
            return
        self.service = ControlService(sched, heartbeat_interval=self.cfg.heartbeat_interval,
                                      lease_intervals=self.cfg.lease_intervals, plain=self.cfg.tls is None,
                                      insecure=self.cfg.insecure)
        server = ControlServer(self.service, self.cfg.control, tls_files=self.cfg.tls, insecure=self.cfg.insecure,
                               observe=self.observe)
        try:
            await server.start()
        except OSError as e:
            if self.cfg.control_given:
                raise
            sched.note(f"AgentControl not served: {e} (give --control HOST:PORT or --control off)")
            return
        self.control, self.address = server, server.address
        sched.note(f"AgentControl on {server.address} ({'mTLS' if self.cfg.tls else 'plain'})")

    async def stop(self) -> None:
        if self.control is not None:
            with contextlib.suppress(Exception):
                await self.control.stop()
