"""``fornax-sched 9p``: talk to any 9P server from the shell, like plan9port's 9p(1).

    fornax-sched 9p ls tcp!127.0.0.1!5640 /
    fornax-sched 9p read tcp!127.0.0.1!5640 cluster/scheduler/log
    echo place hello | fornax-sched 9p write tcp!127.0.0.1!5640 cluster/scheduler/ctl
    fornax-sched 9p ramfs tcp!127.0.0.1!5640
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from typing import Any

from ..signals import until_stopped
from . import proto as P
from .client import Client, FileInfo
from .errors import P9Error
from .ramfs import RamFS
from .server import Server


def add_parser(sub: Any) -> None:
    p = sub.add_parser("9p", help="a 9P client and an in-memory 9P server",
                       description="Read, write, list and stat files on a 9P server, or serve a ramfs.")
    p.add_argument("-V", "--version", dest="dialect", default=None, choices=P.DIALECTS,
                   help="9P dialect to speak (default: 9P2000.u, whose errors carry the server's words, "
                        "else 9P2000.L)")
    p.add_argument("-a", "--aname", default="", help="attach name")
    p.add_argument("-u", "--user", default=None, help="user name to attach as")
    p.add_argument("-t", "--timeout", type=float, default=10.0, help="seconds per request")
    cmds = p.add_subparsers(dest="op", metavar="OP", required=True)
    for op, text in (("read", "print a file"), ("ls", "list a directory"), ("stat", "describe a file")):
        c = cmds.add_parser(op, help=text)
        c.add_argument("addr", help="dial string: tcp!host!port, unix!/path or host:port")
        c.add_argument("path")
        if op == "ls":
            c.add_argument("-l", action="store_true", dest="long", help="long listing")
        c.set_defaults(func=_run_client)
    w = cmds.add_parser("write", help="write the arguments (or stdin) to a file, as one write")
    w.add_argument("addr")
    w.add_argument("path")
    w.add_argument("data", nargs="*", help="words to write; stdin if none")
    w.add_argument("-r", "--reply", action="store_true", help="read the fid back after writing (ctl replies)")
    w.add_argument("-c", "--create", action="store_true", help="create the file if it does not exist")
    w.set_defaults(func=_run_client)
    r = cmds.add_parser("ramfs", help="serve an in-memory writable file tree")
    r.add_argument("addr", help="where to listen, e.g. tcp!127.0.0.1!5640 or unix!/tmp/ramfs.sock")
    r.add_argument("--msize", type=int, default=P.DEFAULT_MSIZE, help="largest message (default %(default)s)")
    r.add_argument("--max-connections", type=int, default=None,
                   help="connections at once (default: the file limit less a reserve)")
    r.add_argument("--handshake-timeout", type=float, default=60.0,
                   help="seconds a connection has to send Tversion and Tattach (default %(default)s)")
    r.set_defaults(func=_run_ramfs)


def _run_client(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_client(args))
    except (P9Error, ConnectionError, TimeoutError, ValueError) as e:
        print(f"fornax-sched 9p {args.op}: {e}", file=sys.stderr)
        return 1


def _mode_string(info: FileInfo) -> str:
    bits = "rwxrwxrwx"
    perm = "".join(b if info.mode & (1 << (8 - i)) else "-" for i, b in enumerate(bits))
    return ("d" if info.is_dir else "-") + perm


def _long(info: FileInfo) -> str:
    when = time.strftime("%b %e %H:%M", time.localtime(info.mtime))
    return f"{_mode_string(info)} {info.uid:>8} {info.gid:>8} {info.length:>10} {when} {info.name}"


async def _client(args: argparse.Namespace) -> int:
    versions = (args.dialect,) if args.dialect else (P.VERSION_9PU, P.VERSION_9PL)
    async with await Client.connect(args.addr, version=versions, uname=args.user,
                                    aname=args.aname, timeout=args.timeout) as c:
        if args.op == "read":
            sys.stdout.buffer.write(await c.read_file(args.path))
        elif args.op == "write":
            data = " ".join(args.data).encode() + b"\n" if args.data else sys.stdin.buffer.read()
            reply = await c.write_file(args.path, data, create=args.create, read_reply=args.reply)
            sys.stdout.buffer.write(reply)
        elif args.op == "stat":
            print(_long(await c.stat_path(args.path)))
        elif args.op == "ls":
            info = await c.stat_path(args.path)
            entries = await c.ls(args.path) if info.is_dir else [info]
            if args.long and c.codec.dotl:  # readdir carries no attributes: ask for them
                entries = [await c.stat_path(f"{args.path.rstrip('/')}/{e.name}") if info.is_dir else e
                           for e in entries]
            for e in sorted(entries, key=lambda e: e.name):
                print(_long(e) if args.long else e.name + ("/" if e.is_dir else ""))
    return 0


def _run_ramfs(args: argparse.Namespace) -> int:
    return serve_ramfs(args.addr, args.msize, max_connections=args.max_connections,
                       handshake_timeout=args.handshake_timeout)


def serve_ramfs(addr: str, msize: int = P.DEFAULT_MSIZE, *, max_connections: int | None = None,
                handshake_timeout: float = 60.0) -> int:
    """Serve a fresh ramfs on ``addr`` until SIGINT or SIGTERM."""

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
        return 1
    return 0
