"""The ``fornax-sched`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import up as up_mod
from .fs import tool as ninep_tool
from .policy import cli as policy_cli
from .sched import serve as sched_serve
from .sched import storecmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fornax-sched",
        description="A Plan 9-style cluster scheduler that is a 9P file server.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    up = sub.add_parser("up", help="start the local system in the foreground",
                        description="Start the cluster on this machine, on loopback, and print how to talk to it.")
    up.add_argument("--nodes", type=int, default=3, help="how many fornax-nodes (default %(default)s)")
    up.add_argument("--images", type=Path, default=None, help="images directory (default: examples/images)")
    up.add_argument("--state", type=Path, default=None, help="state directory (default ~/.local/state/fornax-sched/up)")
    up.add_argument("--port", type=int, default=5640,
                    help="the scheduler listens on 9P port PORT, node N on PORT+N (default %(default)s)")
    up.add_argument("--gossip", type=int, default=9710, help="node N gossips on port GOSSIP+N (default %(default)s)")
    up.add_argument("--dead", type=float, default=10.0,
                    help="seconds a node may be unreachable before the scheduler re-places its containers")
    up.add_argument("--restart", type=float, default=20.0,
                    help="seconds before a process that exited is started again (default %(default)s)")
    up.set_defaults(func=lambda a: up_mod.up(a.nodes, a.images, a.state, a.port, a.gossip, a.dead, a.restart))
    sched_serve.add_parser(sub)
    ninep_tool.add_parser(sub)
    policy_cli.add_parser(sub)
    storecmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
