"""The ``fornax-node`` command (fornax-node(8)).

The daemon is imported only when it is to run, so ``--version`` and
``--help`` answer at once.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from .. import __version__
from .. import exitcodes as X
from ..units import SizeError, parse_size


def _hostport(text: str, default_port: int = 9710) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        return text.strip(), default_port
    try:
        return host or "0.0.0.0", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad address {text!r}: want HOST:PORT") from None


def _peers(text: str) -> list[tuple[str, int]]:
    return [_hostport(p) for p in text.split(",") if p.strip()]


def _labels(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        k, sep, v = item.partition("=")
        if not sep or not k or not v:
            raise argparse.ArgumentTypeError(f"bad label {item!r}: want key=value")
        out[k.strip()] = v.strip()
    return out


def _size(text: str) -> int:
    try:
        return parse_size(text, "--mem")
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fornax-node",
                                description="A Fornax node: runs containers, exports /cluster over 9P.")
    p.add_argument("--version", action="version", version=f"fornax-node {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="run the node daemon in the foreground")
    s.add_argument("--name", required=True, help="node name, e.g. fornax-01")
    s.add_argument("--listen", default="tcp!127.0.0.1!564", help="9P address (default %(default)s)")
    s.add_argument("--images", type=Path, required=True, help="directory of images, one directory per name")
    s.add_argument("--state", type=Path, default=None, help="state directory (default ~/.local/state/fornax-node/NAME)")
    s.add_argument("--cpus", type=int, default=None, help="CPUs to offer (default: this machine's)")
    s.add_argument("--mem", type=_size, default=None, help="memory to offer, e.g. 4G (default: this machine's)")
    s.add_argument("--labels", type=_labels, default={}, help="k=v,... labels for placement rules")
    s.add_argument("--peers", type=_peers, default=[], help="gossip addresses of peers, HOST:PORT,...")
    s.add_argument("--gossip", type=_hostport, default=("0.0.0.0", 9710),
                   help="where to listen for gossip, HOST:PORT (default 0.0.0.0:9710)")
    s.add_argument("--broadcast", default=None,
                   help="broadcast address for gossip (default 255.255.255.255 when no --peers; 'off' for none)")
    s.add_argument("--interval", type=float, default=5.0, help="gossip interval, seconds (default 5)")
    s.add_argument("--suspect", type=float, default=15.0, help="seconds of silence before suspect (default 15)")
    s.add_argument("--dead", type=float, default=30.0, help="seconds of silence before dead (default 30)")
    s.add_argument("--remove", type=float, default=60.0, help="seconds after dead before forgetting (default 60)")
    s.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL at stop (default 5)")
    s.add_argument("--writers", default="", help="users besides the owner who may write ctl files, comma-separated")
    s.add_argument("--advertise", default=None, help="9P address peers should dial, if not --listen")
    s.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="serve /health and /metrics (Prometheus) there (default: off)")
    s.add_argument("--persys", default=None, metavar="HOST:PORT",
                   help="also serve Persys' AgentService over gRPC there (see persys-agent(8))")
    s.add_argument("--persys-reconcile", type=float, default=10.0, metavar="S",
                   help="seconds between the agent's reconcile passes, 0 for none (default 10)")
    s.add_argument("--persys-scheduler", default=None, metavar="HOST:PORT",
                   help="register with this Persys AgentControl (RegisterNode, then Heartbeat)")
    s.add_argument("--persys-advertise", default=None, metavar="HOST:PORT",
                   help="the AgentService address the scheduler should dial, if not --persys")
    s.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="CA of the Persys mTLS (PEM), with --tls-cert and --tls-key")
    s.add_argument("--tls-cert", default=None, metavar="FILE", help="this node's certificate for Persys mTLS (PEM)")
    s.add_argument("--tls-key", default=None, metavar="FILE", help="its private key (PEM)")
    s.add_argument("--insecure", action="store_true",
                   help="allow plain gRPC (no --tls-*) off loopback")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import asyncio
    import logging

    from .daemon import NodeConfig, serve_forever
    from .runtime import ContainerError

    logging.basicConfig(level=max(logging.WARNING - 10 * args.verbose, logging.DEBUG),
                        format="%(asctime)s fornax-node %(name)s: %(message)s")
    if args.broadcast is None:
        broadcast = None if args.peers else "255.255.255.255"
    else:
        broadcast = None if args.broadcast == "off" else args.broadcast
    state = args.state or Path.home() / ".local/state/fornax-node" / args.name
    from ..web.http import config_of

    try:
        http = config_of(args.http, None).listen
    except ValueError as e:
        print(f"fornax-node: {e}", file=sys.stderr)
        return 2
    persys = None
    if args.persys_scheduler and not args.persys:
        print("fornax-node: --persys-scheduler needs --persys HOST:PORT (the AgentService it registers)",
              file=sys.stderr)
        return 2
    if args.persys:
        from ..persys import tls
        from ..persys.node import PersysConfig, split_hostport

        for opt, value in (("--persys", args.persys), ("--persys-scheduler", args.persys_scheduler),
                           ("--persys-advertise", args.persys_advertise)):
            try:
                if value is not None:
                    split_hostport(value)
            except ValueError as e:
                print(f"fornax-node: {opt}: {e}", file=sys.stderr)
                return 2
        try:
            files = tls.load(args.tls_ca, args.tls_cert, args.tls_key)
        except tls.TLSError as e:
            print(f"fornax-node: {e}", file=sys.stderr)
            return 2
        persys = PersysConfig(listen=args.persys, reconcile=args.persys_reconcile, scheduler=args.persys_scheduler,
                              advertise=args.persys_advertise, tls=files, insecure=args.insecure)
    cfg = NodeConfig(
        name=args.name, listen=args.listen, images=args.images, state=state, cpus=args.cpus, mem=args.mem,
        labels=args.labels, gossip=args.gossip, peers=args.peers, broadcast=broadcast, interval=args.interval,
        suspect_after=args.suspect, dead_after=args.dead, remove_after=args.remove,
        writers=[w for w in args.writers.split(",") if w], grace=args.grace, advertise=args.advertise,
        persys=persys, http=http,
    )
    try:
        asyncio.run(serve_forever(cfg))
    except KeyboardInterrupt:
        return X.INTERRUPTED
    except OSError as e:
        # A taken address is its own status (4): fornax-sched up, say, must not start it again and again.
        where = f"{args.listen} (9P), {args.gossip[0]}:{args.gossip[1]} (gossip)" + (
            f", {args.persys} (Persys gRPC)" if args.persys else "") + (f" or {http} (HTTP)" if http else "")
        if e.errno == errno.EADDRINUSE:
            print(f"fornax-node {args.name}: cannot listen on {where}: {e.strerror}", file=sys.stderr)
            return X.IN_USE
        print(f"fornax-node {args.name}: {e}", file=sys.stderr)
        return X.REFUSED
    except (ContainerError, ValueError) as e:
        print(f"fornax-node {args.name}: {e}", file=sys.stderr)
        return X.REFUSED
    return X.OK


if __name__ == "__main__":
    sys.exit(main())
