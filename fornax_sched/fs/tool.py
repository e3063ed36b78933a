"""``fornax-sched 9p``: talk to any 9P server from the shell, like plan9port's 9p(1).

    fornax-sched 9p ls tcp!127.0.0.1!5640 /
    fornax-sched 9p read tcp!127.0.0.1!5640 cluster/scheduler/log
    fornax-sched 9p write -r tcp!127.0.0.1!5640 cluster/scheduler/ctl place web -- 8089
    fornax-sched 9p ramfs tcp!127.0.0.1!5640

The client operations use the blocking client and import nothing else
heavy (no asyncio, no server): a read starts and ends in a few tens of
milliseconds (bench/cli_startup_bench.py).
"""

from __future__ import annotations

import argparse
import sys

from .. import exitcodes as X
from . import proto as P

TYPE_CHECKING = False  # (not typing's: importing typing is a tenth of a shell command's start-up)
if TYPE_CHECKING:
    from typing import Any

    from .blocking import BlockingClient
    from .clientcore import FileInfo


OPS = {"read": "print a file", "ls": "list a directory", "stat": "describe a file",
       "write": "write the arguments (or stdin) to a file, as one write",
       "ramfs": "serve an in-memory writable file tree"}


def _op_named(argv: list[str]) -> str | None:
    """The operation named in the words after ``9p`` (its options -V, -a, -u and -t take a value)."""
    it = iter(argv)
    for w in it:
        if w in ("-V", "--version", "-a", "--aname", "-u", "--user", "-t", "--timeout"):
            next(it, None)
        elif not w.startswith("-"):
            return w
    return None


def add_parser(sub: Any, argv: list[str] | None = None) -> None:
    """The ``9p`` parser; with ``argv`` (the words after ``9p``) only the operation it names is built."""
    chosen = _op_named(argv) if argv is not None else None
    if chosen not in OPS:
        chosen = None
    p = sub.add_parser("9p", help="a 9P client and an in-memory 9P server",
                       description="Read, write, list and stat files on a 9P server, or serve a ramfs.")
    p.add_argument("-V", "--version", dest="dialect", default=None, choices=P.DIALECTS,
                   help="9P dialect to speak (default: 9P2000.u, whose errors carry the server's words, "
                        "else 9P2000.L)")
    p.add_argument("-a", "--aname", default="", help="attach name")
    p.add_argument("-u", "--user", default=None, help="user name to attach as")
    p.add_argument("-t", "--timeout", type=_seconds, default=10.0, help="seconds per request (default 10)")
    cmds = p.add_subparsers(dest="op", metavar="OP", required=True)
    for op, text in OPS.items():
        if chosen is not None and op != chosen:
            continue
        if op in ("write", "ramfs"):
            continue
        c = cmds.add_parser(op, help=text)
        c.add_argument("addr", help="dial string: tcp!host!port, unix!/path or host:port")
        c.add_argument("path")
        if op == "ls":
            c.add_argument("-l", action="store_true", dest="long", help="long listing")
        if op == "read":
            c.add_argument("-f", "--follow", action="store_true",
                           help="at the end, wait for more and print it as it comes (until interrupted)")
        c.set_defaults(func=_run_client, quiet_start=True)
    if chosen in (None, "write"):
        _add_write(cmds)
    if chosen in (None, "ramfs"):
        _add_ramfs(cmds)


def _add_write(cmds: Any) -> None:
    w = cmds.add_parser("write", help=OPS["write"],
                        description="Every word after PATH is written as given, '--' and words that start "
                                    "with '-' included (a single leading '--' is dropped); options go before ADDR.")
    w.add_argument("-r", "--reply", action="store_true", help="read the fid back after writing (ctl replies)")
    w.add_argument("-c", "--create", action="store_true", help="create the file if it does not exist")
    w.add_argument("addr")
    w.add_argument("path")
    # REMAINDER: argparse would otherwise drop a '--' (place web -- 8089) and take words like -x as options.
    w.add_argument("data", nargs=argparse.REMAINDER, metavar="WORD", help="words to write; stdin if none")
    w.set_defaults(func=_run_client, quiet_start=True)


def _add_ramfs(cmds: Any) -> None:
    r = cmds.add_parser("ramfs", help=OPS["ramfs"])
    r.add_argument("addr", help="where to listen, e.g. tcp!127.0.0.1!5640 or unix!/tmp/ramfs.sock")
    r.add_argument("--msize", type=int, default=P.DEFAULT_MSIZE, help="largest message (default %(default)s)")
    r.add_argument("--max-connections", type=int, default=None,
                   help="connections at once (default: the file limit less a reserve)")
    r.add_argument("--handshake-timeout", type=float, default=60.0,
                   help="seconds a connection has to send Tversion and Tattach (default %(default)s)")
    r.set_defaults(func=_run_ramfs)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad timeout {text!r}: want seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"bad timeout {text!r}: want more than 0 and at most 86400 seconds")
    return value


def words(data: list[str]) -> bytes:
    """What ``write`` sends for the words of its command line: joined by spaces, with a newline."""
    if data and data[0] == "--":  # the conventional end of options, not part of the command
        data = data[1:]
    return " ".join(data).encode() + b"\n"


def names_path(message: str, path: str) -> bool:
    """Whether an error message already starts with the path it is about (the client's walk errors do)."""
    head, sep, _ = message.partition(": ")
    want = [n for n in path.split("/") if n]
    got = [n for n in head.split("/") if n]
    return bool(sep) and bool(got) and got == want[: len(got)]


def _run_client(args: argparse.Namespace) -> int:
    from .errors import P9Error

    what = f"fornax-sched 9p {args.op}"
    try:
        _client(args)
    except P9Error as e:
        text = str(e) if names_path(str(e), args.path) else f"{args.path}: {e}"
        print(f"{what}: {text}", file=sys.stderr)
        return X.REFUSED
    except (ConnectionError, TimeoutError) as e:
        # A write that timed out was flushed, which need not undo it: the scheduler's ctl commands
        # run to their end (a place of 1,000 replicas on one node takes longer than the default 10 s).
        late = "; the server may still carry the write out: look at what it did, or give -t more seconds"
        print(f"{what}: {e}{late if isinstance(e, TimeoutError) and args.op == 'write' else ''}", file=sys.stderr)
        return X.UNREACHABLE
    except ValueError as e:  # a bad dial string, or a name the protocol cannot carry
        print(f"{what}: {e}", file=sys.stderr)
        return X.USAGE
    return X.OK


def _mode_string(info: FileInfo) -> str:
    bits = "rwxrwxrwx"
    perm = "".join(b if info.mode & (1 << (8 - i)) else "-" for i, b in enumerate(bits))
    return ("d" if info.is_dir else "-") + perm


def _long(info: FileInfo) -> str:
    import time

    when = time.strftime("%b %e %H:%M", time.localtime(info.mtime))
    return f"{_mode_string(info)} {info.uid:>8} {info.gid:>8} {info.length:>10} {when} {info.name}"


def _client(args: argparse.Namespace) -> None:
    from .blocking import BlockingClient

    versions = (args.dialect,) if args.dialect else (P.VERSION_9PU, P.VERSION_9PL)
    if args.op == "write":
        data = words(args.data) if args.data else sys.stdin.buffer.read()
    with BlockingClient.connect(args.addr, version=versions, uname=args.user, aname=args.aname,
                                timeout=args.timeout) as c:
        if args.op == "read" and args.follow:
            follow(c, args.path, sys.stdout.buffer)
        elif args.op == "read":
            sys.stdout.buffer.write(c.read_file(args.path))
        elif args.op == "write":
            sys.stdout.buffer.write(c.write_file(args.path, data, create=args.create, read_reply=args.reply))
        elif args.op == "stat":
            print(_long(c.stat_path(args.path)))
        elif args.op == "ls":
            _ls(c, args.path, args.long)
        sys.stdout.flush()


FOLLOW_PAUSE = 0.25  # seconds between reads at the end of a followed file


def follow(c: BlockingClient, path: str, out: Any) -> None:
    """Print ``path`` and then whatever is added to it, until interrupted.

    At the end it reads again every FOLLOW_PAUSE seconds, at the same offset, as tail -f does
    (the scheduler's log keeps its offsets as it grows; logs/NAME asks the node again).
    """
    import time

    fid = c.walk(path)
    try:
        c.open(fid, P.OREAD)
        offset, chunk = 0, c.iounit
        while True:
            data = c.read(fid, offset, chunk)
            if data:
                offset += len(data)
                out.write(data)
                out.flush()
            else:
                time.sleep(FOLLOW_PAUSE)
    finally:
        try:
            c.clunk(fid)
        except (OSError, TimeoutError, ValueError):
            pass


def _ls(c: BlockingClient, path: str, long: bool) -> None:
    info = c.stat_path(path)
    entries = c.ls(path) if info.is_dir else [info]
    if long and c.codec.dotl:  # readdir carries no attributes: ask for them
        entries = [c.stat_path(f"{path.rstrip('/')}/{e.name}") if info.is_dir else e for e in entries]
    for e in sorted(entries, key=lambda e: e.name):
        print(_long(e) if long else e.name + ("/" if e.is_dir else ""))


def _run_ramfs(args: argparse.Namespace) -> int:
    return serve_ramfs(args.addr, args.msize, max_connections=args.max_connections,
                       handshake_timeout=args.handshake_timeout)


def serve_ramfs(addr: str, msize: int = P.DEFAULT_MSIZE, *, max_connections: int | None = None,
                handshake_timeout: float = 60.0) -> int:
    """Serve a fresh ramfs on ``addr`` until SIGINT or SIGTERM."""
    import asyncio
    import getpass

    from ..signals import until_stopped
    from .ramfs import RamFS
    from .server import Server

    async def serve() -> None:
        fs = RamFS(owner=getpass.getuser())
        server = Server(fs.root, msize=msize, max_connections=max_connections,
                        handshake_timeout=handshake_timeout)
        listener = await server.listen(addr)
        await until_stopped(lambda: print(f"ramfs: serving on {listener.address}", flush=True))
        await server.close()

    try:
        asyncio.run(serve())
    except (OSError, ValueError) as e:
        print(f"fornax-sched: cannot serve on {addr}: {e}", file=sys.stderr)
        return X.REFUSED
    return X.OK
