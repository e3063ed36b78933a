"""The ``fornax-sched`` command: one entry point, a subcommand per job (fornax-sched(1)).

Only the subcommand being run is imported: ``fornax-sched 9p read`` must
not pay for the scheduler, YAML, Lua or SQLite (it starts in a few tens of
milliseconds; bench/cli_startup_bench.py).  The help of the others comes
from the table below.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from . import exitcodes as X

TYPE_CHECKING = False  # (not typing's: its import is a tenth of a `fornax-sched 9p read`)
if TYPE_CHECKING:
    from typing import Any

# name: (module with add_parser(sub), or MODULE:FUNCTION, the one-line help shown in `fornax-sched --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("fornax_sched.up", "start the local system in the foreground"),
    "serve": ("fornax_sched.sched.serve", "run the scheduler's 9P file server"),
    "9p": ("fornax_sched.fs.tool", "a 9P client and an in-memory 9P server"),
    "policy": ("fornax_sched.policy.cli", "check a policy file, or simulate its decisions"),
    "store": ("fornax_sched.sched.storecmd", "export a store's state to a file, import it into a store"),
    "status": ("fornax_sched.sched.listcmd:add_status", "list placements and groups"),
    "nodes": ("fornax_sched.sched.listcmd:add_nodes", "list nodes: offered, reserved, in use"),
    "logs": ("fornax_sched.sched.listcmd:add_logs", "print a placement's container output (-f: follow)"),
}


def _columns() -> int:
    """The terminal's width, as shutil.get_terminal_size says it, without importing shutil (nor bz2, lzma)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 0
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class Formatter(argparse.HelpFormatter):
    """argparse's help, given the width up front: its own default imports shutil for every parser."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class Parser(argparse.ArgumentParser):
    """The parser of every fornax-sched command (subcommands' parsers are of the same class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the top-level options take no values)."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: list[str] | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The parser; only the subcommand ``argv`` names (every one, with ``full``) is imported."""
    parser = Parser(
        prog="fornax-sched",
        description="A Plan 9-style cluster scheduler that is a 9P file server.",
        epilog="Exit status: 0 done, 1 refused (by the server or the file), 2 usage, 3 no answer "
               "(cannot connect, connection lost, timed out), 4 an address or state it needs is held by "
               "another process, 130 interrupted; see fornax-sched(1).",
    )
    parser.add_argument("--version", action="version", version=f"fornax-sched {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    words = sys.argv[1:] if argv is None else argv
    chosen = _chosen(words)
    for name, (module, text) in COMMANDS.items():
        if full or name == chosen:
            path, _, function = module.partition(":")
            add = getattr(importlib.import_module(path), function or "add_parser")
            if name == "9p" and not full:  # it too builds only the operation named (each parser costs)
                add(sub, words[words.index(name) + 1:])
            else:
                add(sub)
        elif chosen not in COMMANDS:  # the others are listed only when they are to be shown
            sub.add_parser(name, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    if not getattr(args, "quiet_start", False) or args.verbose:
        import logging

        level = logging.WARNING - 10 * args.verbose
        logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return X.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): end quietly, as cat does, and let no flush at exit complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return X.BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
