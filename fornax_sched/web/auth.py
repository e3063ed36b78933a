"""Who may do what over HTTP (docs/web.8.md): reads free on loopback, changes by token and writers list.

A browser sends cookies to any site that asks, so a cookie proves nothing about who wrote a
request: a change must carry its token in a header (``X-Fornax-Token``, or ``Authorization:
Bearer``), which no other site can make a browser send without a CORS preflight we never
allow.  A DNS rebinding attack reaches us under the attacker's host name, so the Host header
must name this machine (an IP address, localhost or its own names); a request whose Origin is
not that host is another site's and is refused.  Each token belongs to a user, and that user
must be one of the writers (the same list as the 9P tree's), so a token file can give read-only
or per-user access.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

HEADER = "X-Fornax-Token"
TOKEN_FILE = "http.token"  # in the state directory: the token made at start, for the owner to read
MIN_TOKEN = 16  # characters of a token given in a file


class AuthError(Exception):
    """A refused request: the HTTP status and the words of the JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_tokens(text: str, owner: str, where: str) -> dict[str, str]:
    """``TOKEN [USER]`` a line (``#`` comments; no user: the owner); ValueError naming the line."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if len(words) > 2:
            raise ValueError(f"{where}:{n}: want TOKEN [USER]")
        token, user = words[0], words[1] if len(words) == 2 else owner
        if len(token) < MIN_TOKEN or not token.isprintable():
            raise ValueError(f"{where}:{n}: a token is at least {MIN_TOKEN} printable characters")
        if token in out:
            raise ValueError(f"{where}:{n}: the same token twice")
        out[token] = user
    if not out:
        raise ValueError(f"{where}: no token in it")
    return out


def read_tokens(path: Path, owner: str) -> dict[str, str]:
    """The tokens of a ``--http-token-file``; ValueError saying what is wrong with it."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--http-token-file: cannot read {path}: {e}") from None
    return parse_tokens(text, owner, f"--http-token-file {path}")


@dataclass
class Auth:
    """The tokens (token -> user) and the writers; ``made`` is the token made at start, if any."""

    tokens: dict[str, str]
    owner: str
    writers: frozenset[str]
    made: str | None = None
    hosts: frozenset[str] = field(default_factory=lambda: _own_names())

    @classmethod
    def start(cls, owner: str, writers: frozenset[str], token_file: Path | None, state: Path) -> Auth:
        """The tokens of ``token_file``, or one made now (the owner's), kept in STATE/http.token (0600)."""
        if token_file is not None:
            return cls(read_tokens(token_file, owner), owner, writers)
        token = secrets.token_urlsafe(24)
        path = state / TOKEN_FILE
        try:
            state.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(token + "\n")
        except OSError:
            pass  # printed at start all the same; the file is a convenience
        return cls({token: owner}, owner, writers, made=token)

    def user_of(self, headers: Mapping[str, str]) -> str | None:
        """The user whose token the request carries; None if it carries none; AuthError if a wrong one."""
        given = headers.get(HEADER) or ""
        if not given:
            bearer = headers.get("Authorization") or ""
            if bearer[:7].lower() == "bearer ":
                given = bearer[7:].strip()
        if not given:
            return None
        for token, user in self.tokens.items():
            if hmac.compare_digest(token.encode(), given.encode()):
                return user
        raise AuthError(401, f"the token in {HEADER} is not one of this scheduler's (it prints its token at start, "
                             f"and keeps it in its state directory as {TOKEN_FILE})")

    def writer(self, headers: Mapping[str, str], what: str) -> str:
        """The user a change is made for, if the request may make it; AuthError why not."""
        user = self.user_of(headers)
        if user is None:
            raise AuthError(401, f"{what}: a change needs the scheduler's token in the {HEADER} header "
                                 f"(it prints it at start, and keeps it in its state directory as {TOKEN_FILE})")
        if user not in self.writers:
            who = ", ".join(sorted(self.writers))
            raise AuthError(403, f"permission denied: {user} may not write {what}; the writers are {who} "
                                 f"(start the scheduler with --writers to add users)")
        return user

    def check_host(self, host: str, origin: str | None) -> None:
        """AuthError unless Host names this machine and Origin (if sent) is that same host."""
        name = _hostname(host)
        if not name or not (_is_ip(name) or name in self.hosts):
            raise AuthError(403, f"Host {host!r} is not a name of this scheduler (a guard against DNS "
                                 f"rebinding): use its address, e.g. http://127.0.0.1:PORT/")
        if origin is not None and origin != "null" and origin.rstrip("/") not in (f"http://{host}", f"https://{host}"):
            raise AuthError(403, f"Origin {origin!r} is another site's: changes come only from the scheduler's "
                                 "own page (a guard against cross-site request forgery)")
        if origin == "null":
            raise AuthError(403, "Origin 'null' (a sandboxed or local page) may not use the scheduler's API")


def loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _hostname(host: str) -> str:
    """The name in a Host header, without the port; lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _own_names() -> frozenset[str]:
    names = {"localhost", "localhost.localdomain"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    return frozenset(names)
