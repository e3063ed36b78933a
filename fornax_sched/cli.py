"""The ``fornax-sched`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

from .fs import tool as ninep_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fornax-sched",
        description="A Plan 9-style cluster scheduler that is a 9P file server.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    up = sub.add_parser("up", help="start the local system in the foreground",
                        description="Start everything on this machine, on loopback, and print how to talk to it.")
    up.add_argument("--listen", default="tcp!127.0.0.1!5640", help="9P address (default %(default)s)")
    up.set_defaults(func=_up)
    ninep_tool.add_parser(sub)
    return parser


def _up(args: argparse.Namespace) -> int:
    # The scheduler and its nodes are not built yet; until they are, the
    # system is the 9P file service itself: a ramfs to mount and explore.
    print(f"""fornax-sched is up: a 9P file service (ramfs) on {args.listen}
  talk to it:   fornax-sched 9p write -c {args.listen} /hello hi there
                fornax-sched 9p read {args.listen} /hello
  mount it:     mount -t 9p -o trans=tcp,port={args.listen.rsplit('!', 1)[-1]},version=9p2000.L 127.0.0.1 /mnt
  stop it:      Ctrl-C
""", flush=True)
    return ninep_tool.serve_ramfs(args.listen)


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
