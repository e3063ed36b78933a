"""A logging TCP proxy for 9P, to see what the kernel and a server say.

    python tests/vm/proxy9p.py LISTEN_PORT TARGET_PORT [LOG]

Listens on 127.0.0.1:LISTEN_PORT (0: any free port, printed as
``listening on PORT``), relays each connection to 127.0.0.1:TARGET_PORT and
writes one line per message to LOG (default stderr): direction, connection
number and the message decoded with fornax_sched's codec in the dialect that
Tversion/Rversion settled on (raw hex if it does not decode). A debugging
aid for the QEMU tests; no test depends on it.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from typing import TextIO

from fornax_sched.fs.codec import CODECS


class _Dialect:
    def __init__(self) -> None:
        self.codec = CODECS["9P2000"]


def _describe(frame: bytes, dialect: _Dialect) -> str:
    try:
        msg = dialect.codec.decode(frame)
    except Exception as e:  # noqa: BLE001 - a debugging aid shows whatever it got
        return f"undecodable ({e}): {frame.hex()}"
    name = type(msg).__name__
    if name == "Rversion" and getattr(msg, "version", "") in CODECS:
        dialect.codec = CODECS[msg.version]
    text = repr(msg)
    return text if len(text) < 400 else text[:400] + f"... ({len(frame)} bytes)"


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: str,
                dialect: _Dialect, log: TextIO) -> None:
    try:
        while True:
            head = await reader.readexactly(4)
            (size,) = struct.unpack("<I", head)
            body = await reader.readexactly(size - 4)
            frame = head + body
            print(f"{tag} {_describe(frame, dialect)}", file=log, flush=True)
            writer.write(frame)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(listen_port: int, target_port: int, log: TextIO) -> None:
    count = 0

    async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        n = count
        sreader, swriter = await asyncio.open_connection("127.0.0.1", target_port)
        dialect = _Dialect()
        await asyncio.gather(
            _pump(creader, swriter, f"c{n} ->", dialect, log),
            _pump(sreader, cwriter, f"c{n} <-", dialect, log),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    listen_port, target_port = int(sys.argv[1]), int(sys.argv[2])
    log = open(sys.argv[3], "w") if len(sys.argv) > 3 else sys.stderr  # noqa: SIM115
    asyncio.run(serve(listen_port, target_port, log))


if __name__ == "__main__":
    main()
