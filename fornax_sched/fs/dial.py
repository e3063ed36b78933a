"""Plan 9 dial strings: ``tcp!host!port``, ``unix!/path``, and ``host:port``."""

from __future__ import annotations

import socket
from collections import namedtuple

DEFAULT_PORT = 564
TYPE_CHECKING = False  # (neither typing nor dataclasses: each is a tenth of a shell command's start-up)
if TYPE_CHECKING:
    from typing import NamedTuple

    class _Address(NamedTuple):
        net: str  # "tcp" or "unix"
        host: str = ""
        port: int = 0
        path: str = ""
else:
    _Address = namedtuple("Address", "net host port path", defaults=("", 0, ""))


class Address(_Address):
    __slots__ = ()

    def __str__(self) -> str:
        if self.net == "unix":
            return f"unix!{self.path}"
        return f"tcp!{self.host}!{self.port}"


def parse(dial: str, default_port: int = DEFAULT_PORT) -> Address:
    """Parse a dial string; raise ValueError with the reason if it is not one."""
    s = dial.strip()
    if not s:
        raise ValueError("empty address")
    if "!" in s:
        parts = s.split("!")
        net = parts[0]
        if net == "unix":
            if len(parts) != 2 or not parts[1]:
                raise ValueError(f"bad unix address {dial!r}: want unix!/path")
            return Address("unix", path=parts[1])
        if net not in ("tcp", "net"):
            raise ValueError(f"unsupported network {net!r} in {dial!r}: use tcp or unix")
        if len(parts) not in (2, 3) or not parts[1]:
            raise ValueError(f"bad address {dial!r}: want tcp!host!port")
        host = parts[1]
        port = _port(parts[2], dial) if len(parts) == 3 else default_port
        return Address("tcp", "0.0.0.0" if host == "*" else host, port)
    if s.startswith("/") or s.startswith("./"):
        return Address("unix", path=s)
    if s.startswith("["):  # [::1]:564
        host, _, rest = s[1:].partition("]")
        port = _port(rest.lstrip(":"), dial) if rest else default_port
        return Address("tcp", host, port)
    host, sep, port_s = s.rpartition(":")
    if not sep:
        return Address("tcp", s, default_port)
    if not host:
        raise ValueError(f"bad address {dial!r}: want host:port")
    return Address("tcp", host, _port(port_s, dial))


def _port(text: str, dial: str) -> int:
    try:
        port = int(text)
    except ValueError:
        try:
            return socket.getservbyname(text, "tcp")
        except OSError:
            raise ValueError(f"bad port {text!r} in {dial!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range in {dial!r}")
    return port

