"""``fornax-sched status``, ``nodes`` and ``logs``: the scheduler's listings and a container's
output, each one read of a file the scheduler serves (see scheduler(4)).

Light on purpose: the blocking 9P client only, as ``fornax-sched 9p read``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import exitcodes as X

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_ADDR = "tcp!127.0.0.1!5640"  # serve's default --listen (serve.DEFAULT_LISTEN, not imported: it is heavy)
ADDR_HELP = "the scheduler's 9P address (default: $FORNAX_SCHED, else tcp!127.0.0.1!5640)"


def _common(p: Any) -> None:
    p.add_argument("-t", "--timeout", type=float, default=10.0, help="seconds per request (default 10)")


def _listing(sub: Any, name: str, text: str, description: str) -> None:
    """`status` and `nodes`: one read of /cluster/scheduler/NAME (NAME.json with --json)."""
    p = sub.add_parser(name, help=text, description=description)
    p.add_argument("addr", nargs="?", default=None, metavar="ADDR", help=ADDR_HELP)
    p.add_argument("--json", action="store_true", help=f"the same as JSON ({name}.json)")
    _common(p)
    p.set_defaults(func=lambda a: _show(a, name), quiet_start=True)


def add_status(sub: Any) -> None:
    _listing(sub, "status", "list placements and groups",
             "Every placement (name, image, node, status, age, why it waits or failed) "
             "and every group's wanted/running, as the scheduler's status file has them.")


def add_nodes(sub: Any) -> None:
    _listing(sub, "nodes", "list nodes: offered, reserved, in use",
             "Every node the scheduler knows: kind, status, cpu and memory offered, "
             "reserved and in use, load and containers.")


def add_logs(sub: Any) -> None:
    p = sub.add_parser("logs", help="print a placement's container output (-f: follow)",
                       description="The output of NAME's container, read through its node; with -f, go on "
                                   "printing what it writes, across restarts, until interrupted.  With no NAME, "
                                   "the scheduler's own log.")
    p.add_argument("name", nargs="?", default=None, metavar="NAME", help="a placement (none: the scheduler's log)")
    p.add_argument("addr", nargs="?", default=None, metavar="ADDR", help=ADDR_HELP)
    p.add_argument("-f", "--follow", action="store_true", help="go on printing what comes, until interrupted")
    _common(p)
    p.set_defaults(func=_logs, quiet_start=True)


def _addr(args: argparse.Namespace) -> str:
    return args.addr or os.environ.get("FORNAX_SCHED") or DEFAULT_ADDR


def _show(args: argparse.Namespace, what: str) -> int:
    path = f"cluster/scheduler/{what}" + (".json" if args.json else "")
    return _run(args, what, lambda c: sys.stdout.buffer.write(c.read_file(path)))


def _logs(args: argparse.Namespace) -> int:
    name = args.name
    if name is not None and args.addr is None and ("!" in name or ":" in name):
        name, args.addr = None, name  # an address (no placement name has '!' or ':'): the scheduler's log
    if name is not None and (not name or "/" in name or name in (".", "..")):
        print(f"fornax-sched logs: bad placement name {name!r}", file=sys.stderr)
        return X.USAGE
    path = f"cluster/scheduler/logs/{name}" if name else "cluster/scheduler/log"

    def show(c: Any) -> None:
        if args.follow:
            from ..fs.tool import follow

            follow(c, path, sys.stdout.buffer)
        else:
            sys.stdout.buffer.write(c.read_file(path))

    return _run(args, "logs", show)


def _run(args: argparse.Namespace, what: str, op: Any) -> int:
    from ..fs import proto as P
    from ..fs.blocking import BlockingClient
    from ..fs.errors import P9Error

    try:
        with BlockingClient.connect(_addr(args), version=(P.VERSION_9PU, P.VERSION_9PL),
                                    timeout=args.timeout) as c:
            op(c)
            sys.stdout.flush()
    except P9Error as e:
        text = str(e)
        if what == "logs" and args.name and any(w in text.lower() for w in ("does not exist", "no such file")):
            text = f"no placement {args.name!r} (fornax-sched status lists them)"
        print(f"fornax-sched {what}: {text}", file=sys.stderr)
        return X.REFUSED
    except (ConnectionError, TimeoutError) as e:
        print(f"fornax-sched {what}: {e}", file=sys.stderr)
        return X.UNREACHABLE
    except ValueError as e:
        print(f"fornax-sched {what}: {e}", file=sys.stderr)
        return X.USAGE
    return X.OK
