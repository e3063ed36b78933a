"""Hold many idle 9P connections open from a process of its own.

    python holder.py tcp!HOST!PORT

Commands on stdin, one per line, each answered with one line on stdout:

    attached N   open N connections that do Tversion and Tattach, then idle   -> "ok N"
    idle N       open N connections that send nothing                          -> "ok N"
    closed       how many of each kind the server has closed                   -> "attached A idle I"
    quit

A connection the server refuses at once counts as closed.  Blocking
sockets and the standard library only, so that what the server sees is a
crowd of plain peers, not another event loop.
"""

from __future__ import annotations

import resource
import socket
import struct
import sys

from fornax_sched.fs import codec as M
from fornax_sched.fs import proto as P


def recv_frame(s: socket.socket) -> bytes:
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    (size,) = struct.unpack("<I", head)
    body = b""
    while len(body) < size - 4:
        chunk = s.recv(size - 4 - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return head + body


def attach(s: socket.socket) -> None:
    codec = M.CODECS[P.VERSION_9P]
    s.sendall(codec.encode(M.Tversion(P.NOTAG, 8192, P.VERSION_9P)))
    codec.decode(recv_frame(s))
    s.sendall(codec.encode(M.Tattach(1, 0, P.NOFID, "holder", "", P.NONUNAME)))
    reply = codec.decode(recv_frame(s))
    if not isinstance(reply, M.Rattach):
        raise ConnectionError(f"attach refused: {reply}")


def is_closed(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing to read
    except OSError:
        return True  # reset


def main() -> None:
    _, host, port = sys.argv[1].split("!")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: dict[str, list[socket.socket]] = {"attached": [], "idle": []}
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] in held:
            kind, n = words[0], int(words[1])
            for _ in range(n):
                s = socket.create_connection((host, int(port)), timeout=10)
                s.settimeout(None)  # plain blocking: MSG_DONTWAIT then really does not wait
                try:
                    if kind == "attached":
                        attach(s)
                except (ConnectionError, OSError):
                    pass  # refused at once: counts as closed
                held[kind].append(s)
            print(f"ok {n}", flush=True)
        elif words[0] == "closed":
            counts = {k: sum(map(is_closed, v)) for k, v in held.items()}
            print(f"attached {counts['attached']} idle {counts['idle']}", flush=True)
        elif words[0] == "quit":
            break
    for sockets in held.values():
        for s in sockets:
            s.close()


if __name__ == "__main__":
    main()
