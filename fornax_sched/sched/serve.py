"""``fornax-sched serve``: the scheduler as a 9P file server (docs/serve.8.md)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import getpass
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import exitcodes
from ..fs.server import Server
from ..policy import Limits
from ..signals import until_stopped
from ..units import parse_size
from ..web import http
from . import bridge, tree
from .metrics import SchedMetrics
from .service import MAX_LOOKS, Scheduler
from .store import StoreError, open_store

DEFAULT_LISTEN = "tcp!127.0.0.1!5640"
DEFAULT_HTTP = "127.0.0.1:8084"  # the Persys scheduler's metrics and health port


def store_shared(cfg: SchedConfig) -> bool:
    """Whether several replicas may share the store (etcd): then writes are forwarded between them."""
    return cfg.store.startswith("etcd")


def default_state() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fornax-sched" / "scheduler"


@dataclass
class SchedConfig:
    listen: str = DEFAULT_LISTEN
    state: Path = field(default_factory=default_state)
    nodes: list[str] = field(default_factory=list)
    sim_nodes: int = 0  # simulated nodes to make in this process (benchmarks, trying it out)
    writers: list[str] = field(default_factory=list)
    interval: float = 1.0
    max_looks: float = MAX_LOOKS  # looks at nodes a second, all together (0: no cap)
    dead: float = 10.0
    node_timeout: float = 5.0
    forget_dead: float = 86400.0  # seconds a node may stay dead before it is forgotten (0: never)
    policy_limits: Limits = field(default_factory=Limits)
    fresh: bool = False
    store: str = ""  # a store URL (sqlite:PATH, etcd://HOST:PORT,.../PREFIX); "" is DIR/sched.db
    max_connections: int | None = None  # None: the file limit less a reserve
    idle_evict: float = 5.0  # a connection idle this long may be closed to let a newcomer in at the cap
    handshake_timeout: float = 60.0
    budget: float = 1.0  # seconds of policy time one command's decisions share
    bridge: bridge.BridgeConfig = field(default_factory=lambda: bridge.BridgeConfig(control=None))  # Persys agents
    lease_ttl: float = 5.0  # seconds the leadership's lease lives (replicas on etcd)
    advertise: str = ""  # the 9P address other replicas reach this one at ("": the listening address)
    http: http.HttpConfig = field(default_factory=lambda: http.HttpConfig(None))  # /health, /metrics, the page
    http_tokens: dict[str, str] | None = None  # token -> user (--http-token-file); None: one made at start

    def store_spec(self) -> str:
        return self.store or str(self.state / "sched.db")


class SchedDaemon:
    """The store, the scheduler and its 9P server, started and stopped together."""

    def __init__(self, cfg: SchedConfig) -> None:
        self.cfg = cfg
        self.owner = getpass.getuser()
        # (commands from AgentControl carry its name; a follower forwards an agent's under it to the leader)
        self.writers = frozenset({self.owner, *cfg.writers, *([bridge.CONTROL_USER] if store_shared(cfg) else [])})
        self.sched: Scheduler | None = None
        self.server: Server | None = None
        self.replica: Any = None  # replicas.Replica, on a store several schedulers share
        self.addr = cfg.listen
        # Counted only when someone can read them (the hooks cost a little on every request).
        self.metrics = SchedMetrics() if cfg.http.listen is not None else None
        m = self.metrics
        self.bridge = bridge.Bridge(cfg.bridge, observe=m.grpc_in if m is not None else None)
        self.http: http.HttpServer | None = None
        self.http_address: str | None = None
        self.auth: Any = None  # web.auth.Auth: who may change what over HTTP

    async def start(self) -> None:
        store = await open_store(self.cfg.store_spec(), fresh=self.cfg.fresh)
        m = self.metrics
        replicated = store.kind == "etcd"  # several replicas share it, one leading; SQLite has one scheduler
        try:
            if not replicated:
                # One scheduler per state: a second one would undo the first's work.
                await store.campaign("scheduler", f"fornax-sched serve on {self.cfg.listen}", ttl=10, wait=False)
            seeds = list(self.cfg.nodes) + list(self.cfg.bridge.agents)
            if self.cfg.sim_nodes:
                from .backends import CLUSTER as SIMULATED

                for i in range(self.cfg.sim_nodes):
                    SIMULATED.add(f"sim-{i + 1:04d}")
                seeds.append("sim!sim-0001")  # the rest are found as its peers
            self.sched = Scheduler(store, seeds=seeds, interval=self.cfg.interval, max_looks=self.cfg.max_looks,
                                   dead_after=self.cfg.dead, node_timeout=self.cfg.node_timeout,
                                   forget_dead=self.cfg.forget_dead, limits=self.cfg.policy_limits,
                                   budget=self.cfg.budget,
                                   connect=bridge.connector(self.cfg.bridge, self.cfg.node_timeout,
                                                            observe=m.grpc_out if m is not None else None))
            if m is not None:
                m.watch(self.sched)
            self.sched.drift_interval = self.cfg.bridge.drift_interval
            await self.sched.start(lead=not replicated)
            await self.bridge.start(self.sched)
            self.server = Server(tree.build(self.sched, self.owner, self.writers),
                                 groups={tree.WRITERS: self.writers}, max_connections=self.cfg.max_connections,
                                 idle_minimum=self.cfg.idle_evict, handshake_timeout=self.cfg.handshake_timeout,
                                 observe=m.ninep if m is not None else None)
            listener = await self.server.listen(self.cfg.listen)
            self.addr = str(listener.address)
            if replicated:
                from .replicas import Replica

                self.replica = Replica(self.sched, self.cfg.advertise or self.addr, ttl=self.cfg.lease_ttl)
                await self.replica.start()
            await self._start_http()
        except BaseException:
            if self.http is not None:
                await self.http.close()
            await self.bridge.stop()
            if self.replica is not None:
                await self.replica.close()
            if self.server is not None:
                await self.server.close()
            if self.sched is not None:
                await self.sched.close()
            await store.close()
            raise

    async def _start_http(self) -> None:
        """Serve /health, /metrics (and the page) if wanted; a taken default address is only noted."""
        assert self.sched is not None
        if self.cfg.http.listen is None:
            return
        from ..web import sched_app
        from ..web.auth import Auth

        if self.cfg.http_tokens is not None:
            self.auth = Auth(dict(self.cfg.http_tokens), self.owner, self.writers)
        else:
            self.auth = Auth.start(self.owner, self.writers, None, self.cfg.state)
        server = http.HttpServer(sched_app.build(self.sched, self.metrics, auth=self.auth))
        try:
            self.http_address = await server.start(self.cfg.http.listen)
        except OSError as e:
            if self.cfg.http.given:
                err = OSError(f"--http {self.cfg.http.listen}: {e.strerror or e}")
                err.errno = e.errno
                raise err from None
            self.sched.note(f"HTTP not served: {self.cfg.http.listen}: {e.strerror or e} "
                            f"(give --http HOST:PORT or --http off)")
            return
        self.http = server
        self.sched.note(f"HTTP on http://{self.http_address}/ (health, metrics, the web page)")

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.server is not None:
            await self.server.close()
        await self.bridge.stop()
        if self.replica is not None:
            await self.replica.close()
        if self.sched is not None:
            await self.sched.close()
            await self.sched.store.close()


async def serve_forever(cfg: SchedConfig) -> None:
    daemon = SchedDaemon(cfg)
    await daemon.start()
    where = daemon.sched.store.where if daemon.sched is not None else cfg.store_spec()
    control = f", AgentControl {daemon.bridge.address}" if daemon.bridge.address else ""
    control += f", HTTP http://{daemon.http_address}/" if daemon.http_address else ""

    def ready() -> None:
        print(f"fornax-sched scheduler serving {daemon.addr} (state {where}{control})", flush=True)
        if daemon.http_address and daemon.auth is not None and daemon.auth.made:
            # The token is printed to whoever started the scheduler (and kept in STATE/http.token, 0600):
            # never in the log, which every reader of the file tree sees.
            print(f"fornax-sched web page http://{daemon.http_address}/#token={daemon.auth.made} "
                  f"(changes need this token; it is also in {cfg.state / 'http.token'})", flush=True)

    await until_stopped(ready)
    await daemon.stop()


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the scheduler's 9P file server",
                       description="Serve /cluster/scheduler and /cluster/nodes over 9P and schedule "
                                   "containers on the nodes it finds.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="9P address (default %(default)s: loopback)")
    p.add_argument("--state", type=Path, default=None,
                   help="state directory (default ~/.local/state/fornax-sched/scheduler)")
    p.add_argument("--store", default="", metavar="URL",
                   help="where the state lives: sqlite:PATH, or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] "
                        "(default: DIR/sched.db of --state)")
    p.add_argument("--fresh", action="store_true",
                   help="start with a new, empty store; the old store file is kept aside (sched.db.replaced-TIME)")
    p.add_argument("--sim-nodes", type=int, default=0, metavar="N",
                   help="also make N simulated nodes in this process (sim-0001 ...; 8 CPUs, 16G each): they run "
                        "nothing, for benchmarks and for trying the scheduler out")
    p.add_argument("--node", action="append", default=[], metavar="ADDR",
                   help="9P address of a node to start from (repeat); more are found through its peers")
    p.add_argument("--writers", default="",
                   help="users besides the owner who may write ctl and policy, comma-separated")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks at each node (default 1)")
    p.add_argument("--max-looks", type=float, default=MAX_LOOKS, metavar="N",
                   help=f"looks at nodes a second, all nodes together (default {MAX_LOOKS:g}; 0: no cap): past "
                        f"N x interval nodes each is looked at less often, and --dead and the suspect time "
                        f"scale by as much")
    p.add_argument("--dead", type=float, default=10.0,
                   help="seconds a node may be unreachable before its containers are placed again (default 10; "
                        "more when looks are paced: see --max-looks)")
    p.add_argument("--policy-deadline", type=float, default=50.0, metavar="MS",
                   help="milliseconds a Lua policy may take per decision (default 50)")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="9P connections at once (default: the file limit less a reserve); at the cap a newcomer "
                        "takes the place of the longest idle connection")
    p.add_argument("--idle-evict", type=float, default=5.0, metavar="S",
                   help="seconds a connection must have been idle to be closed for a newcomer at the cap (default 5)")
    p.add_argument("--handshake-timeout", type=float, default=60.0, metavar="S",
                   help="seconds a new connection has to attach (default 60)")
    p.add_argument("--node-timeout", type=float, default=5.0, metavar="S",
                   help="seconds any call to a node may take, a flush included (default 5)")
    p.add_argument("--forget-dead", type=float, default=86400.0, metavar="S",
                   help="seconds a node may stay dead before it is forgotten, as ctl forget does (default 86400, "
                        "a day; 0: never): one that answers later is found afresh")
    p.add_argument("--decide-budget", type=float, default=1.0, metavar="S",
                   help="seconds of policy time one command's decisions share; past it the platform policy "
                        "decides the rest (default 1)")
    p.add_argument("--lease-ttl", type=float, default=5.0, metavar="S",
                   help="on etcd, where several replicas share the state: seconds the leader's lease lives; a "
                        "leader gone this long is replaced (default 5)")
    p.add_argument("--advertise", default="", metavar="ADDR",
                   help="on etcd: the 9P address other replicas forward writes to (default: the listening address)")
    p.add_argument("--http", default=None, metavar="HOST:PORT|off",
                   help=f"serve /health, /metrics and the web page here (default {DEFAULT_HTTP}; a taken default "
                        f"is only a warning)")
    p.add_argument("--http-token-file", type=Path, default=None, metavar="FILE",
                   help="tokens for changes made over HTTP, 'TOKEN [USER]' a line (no user: the owner; the "
                        "writers list applies); default: a token made at start, printed and kept in "
                        "STATE/http.token")
    p.add_argument("--policy-memory", default="64M", metavar="SIZE",
                   help="memory a Lua policy may use per decision (default 64M)")
    bridge.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if not 0 <= args.sim_nodes <= 100_000:
            raise ValueError("--sim-nodes: want 0 to 100000")
        if args.max_connections is not None and args.max_connections < 1:
            raise ValueError("--max-connections: want at least 1")
        if not 0 <= args.idle_evict <= 86400 or not 0.1 <= args.handshake_timeout <= 86400:
            raise ValueError("--idle-evict: want 0 to 86400 seconds; --handshake-timeout: 0.1 to 86400")
        if not 0 <= args.max_looks <= 1_000_000:
            raise ValueError("--max-looks: want 0 to 1000000 a second (0: no cap)")
        if not 0.05 <= args.node_timeout <= 600:
            raise ValueError("--node-timeout: want 0.05 to 600 seconds")
        if not 0.01 <= args.decide_budget <= 600:
            raise ValueError("--decide-budget: want 0.01 to 600 seconds")
        if not 1 <= args.lease_ttl <= 600:
            raise ValueError("--lease-ttl: want 1 to 600 seconds")
        if not 1 <= args.policy_deadline <= 60_000:
            raise ValueError("--policy-deadline: want 1 to 60000 milliseconds")
        memory = parse_size(args.policy_memory, "--policy-memory")
        if memory < 1 << 20:
            raise ValueError("--policy-memory: want at least 1M")
        limits = Limits(deadline=args.policy_deadline / 1000, memory=memory, command=args.decide_budget)
        persys = bridge.config_of(args)
        web = http.config_of(args.http, DEFAULT_HTTP)
        tokens = None
        if args.http_token_file is not None:
            from ..web.auth import read_tokens

            tokens = read_tokens(args.http_token_file, getpass.getuser())
    except ValueError as e:
        print(f"fornax-sched serve: {e}", flush=True)
        return 2
    cfg = SchedConfig(listen=args.listen, state=args.state or default_state(), nodes=args.node,
                      writers=[w for w in args.writers.split(",") if w], interval=args.interval, dead=args.dead,
                      max_looks=args.max_looks,
                      policy_limits=limits, fresh=args.fresh, store=args.store, budget=args.decide_budget,
                      node_timeout=args.node_timeout, forget_dead=args.forget_dead,
                      max_connections=args.max_connections,
                      idle_evict=args.idle_evict, handshake_timeout=args.handshake_timeout,
                      sim_nodes=args.sim_nodes, bridge=persys, lease_ttl=args.lease_ttl, advertise=args.advertise,
                      http=web, http_tokens=tokens)
    try:
        asyncio.run(serve_forever(cfg))
    except StoreError as e:
        print(f"fornax-sched serve: {e}", flush=True)
        return 1
    except OSError as e:
        if str(e).startswith(("--control", "--http")):
            print(f"fornax-sched serve: {e}", flush=True)
            return exitcodes.IN_USE if e.errno == errno.EADDRINUSE else exitcodes.REFUSED
        # A taken address is its own status (4): fornax-sched up, say, must not start it again and again.
        print(f"fornax-sched serve: cannot listen on {cfg.listen}: {e.strerror or e}", flush=True)
        return exitcodes.IN_USE if e.errno == errno.EADDRINUSE else exitcodes.REFUSED
    return 0
