"""The scheduler's web page and its JSON API (docs/web.8.md): the dashboard and the policy builder.

The page is static files shipped in the package (static/: HTML, CSS and JS, no build step);
everything it shows and does goes through /api, and every change there takes the path its 9P
file takes: a ctl command through ``Scheduler.command``, a policy through ``Scheduler.set_policy``
(a follower replica forwards both to the leader, as it does for 9P), with the writers list of
the 9P tree checked first (auth.py).  Reads are free from loopback; checks and simulations of a
policy not yet written change nothing and count as reads.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import re
import sys
import sysconfig
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..policy import PolicyError, compile_policy, detect_kind, platform_source
from ..policy.loader import MAX_POLICY
from ..sched.plans import CommandError
from ..sched.state import stamp
from .auth import Auth, AuthError, loopback
from .http import streaming

if TYPE_CHECKING:
    from ..sched.service import Scheduler

STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png",
         ".svg": "image/svg+xml"}
STREAMS = 32  # log streams served at once (each is a loop of cheap looks at the log)
STREAM_POLL = 0.2  # seconds between a stream's looks at the log: a new line is sent within this
TAIL = 200  # log lines a stream starts with
LIMIT = 5000  # placements /api/state sends unless told otherwise
BODY_MAX = 1 << 20  # bytes of a request's body (sched_app's client_max_size)
_LINE = re.compile(r"^line (\d+):")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers={"Cache-Control": "no-store"})


async def _nothing() -> web.Response:
    return web.Response(status=204)


def _ok(value: dict[str, Any]) -> web.Response:
    return web.json_response(value, headers={"Cache-Control": "no-store"})


def policy_error(message: str) -> dict[str, Any]:
    """A refusal as the page shows it: the words, and the line they name (in the YAML, or in the Lua)."""
    text = message.removeprefix("policy refused, the old one stays: ").removeprefix("policy refused: ")
    m = _LINE.match(text)
    return {"error": message, "line": int(m.group(1)) if m else None,
            "in": "lua" if "(in the compiled Lua)" in text or "compiled to bad Lua" in text else "source"}


def examples_dir() -> Path | None:
    """examples/policies of a checkout, or share/fornax-sched/examples/policies where installed."""
    here = Path(__file__).resolve()
    candidates = [here.parent.parent.parent / "examples" / "policies"]
    for scheme in (sysconfig.get_default_scheme(), "posix_user"):
        try:
            candidates.append(Path(sysconfig.get_path("data", scheme)) / "share" / "fornax-sched" / "examples"
                              / "policies")
        except KeyError:
            continue
    candidates.append(Path(sys.prefix) / "share" / "fornax-sched" / "examples" / "policies")
    return next((p for p in candidates if p.is_dir()), None)


def templates() -> list[dict[str, str]]:
    """The template library: the platform policy to clone, spread, pack, and the shipped examples."""
    out = [
        {"name": "spread", "kind": "rules", "about": "the built-in default: the least loaded node", "source":
         "# Text rules: run by the scheduler's core, no Lua.\nspread\n"},
        {"name": "pack", "kind": "rules", "about": "fill the most loaded node that has room first", "source":
         "# Text rules: run by the scheduler's core, no Lua.\npack\n"},
    ]
    try:
        out.append({"name": "platform.lua", "kind": "lua", "source": platform_source(),
                    "about": "the platform policy: the reference to clone, and the fallback of every policy"})
    except OSError:
        pass
    where = examples_dir()
    if where is not None:
        for path in sorted(where.iterdir()):
            if path.suffix in (".lua", ".yaml", ".yml", ".rules") and path.is_file():
                try:
                    text = path.read_text()
                except (OSError, UnicodeDecodeError):
                    continue
                first = next((ln.lstrip("#- ").strip() for ln in text.splitlines() if ln.strip()), "")
                first = first.removeprefix(f"{path.name}:").strip()
                out.append({"name": path.name, "kind": detect_kind(text), "source": text, "about": first})
    return out


def state_of(sched: Scheduler, query: Any) -> dict[str, Any]:
    """What the dashboard shows, in one answer (the page asks once, then renders every row at once)."""
    from .sched_app import health

    rows, groups = sched.status_rows()
    name, node, status = query.get("name", ""), query.get("node", ""), query.get("status", "")
    if name or node or status:
        rows = [r for r in rows if (not name or fnmatch.fnmatchcase(r["name"], name) or name in r["name"])
                and (not node or r["node"] == node) and (not status or r["status"] == status)]
    try:
        limit = max(0, int(query.get("limit", LIMIT)))
    except ValueError:
        limit = LIMIT
    p = sched.policies
    v = p.active
    return {
        "health": health(sched), "mode": sched.mode_text().strip(),
        "nodes": sched.node_rows(), "placements": rows[:limit], "total": len(rows), "groups": groups,
        "drift": {"open": [d.row() for d in sched.drift.entries.values() if d.resolved is None],
                  "resolved": [d.row() for d in sched.drift.entries.values() if d.resolved is not None],
                  "passes": sched.drift.passes, "last": stamp(sched.drift.last) if sched.drift.last else None},
        "policy": {"label": p.label(), "version": v.n if v else 0, "kind": v.kind if v else "rules",
                   "health": p.health()},
        "leader": sched.leader, "leading": sched.leading, "replicated": sched.replicated,
        "store": {"kind": sched.store.kind, "where": sched.store.where, "cluster": sched.store.cluster},
    }


def policy_of(sched: Scheduler) -> dict[str, Any]:
    p = sched.policies
    active = p.active.n if p.active else 0
    return {"source": sched.policy_text(), "lua": p.lua_text(), "status": p.status_text(), "label": p.label(),
            "version": active, "kind": p.active.kind if p.active else "rules",
            "history": [{"n": n, "at": stamp(v.at), "kind": v.kind, "by": v.by, "title": v.title(),
                         "active": n == active} for n, v in sorted(p.versions.items(), reverse=True)]}


def compiled(text: str) -> dict[str, Any]:
    """The syntax check and the YAML's Lua, as the policy file would compile them (no sandbox)."""
    try:
        c = compile_policy(text)
    except PolicyError as e:
        return {"ok": False, "kind": detect_kind(text), **policy_error(str(e))}
    lua = c.lua if c.kind != "rules" else "-- Text rules run in the scheduler's core: no Lua runs.\n"
    return {"ok": True, "kind": c.kind, "name": c.name, "lua": lua}


def add_routes(app: web.Application, sched: Scheduler, auth: Auth | None) -> None:
    """The page at /, its files at /static/, its API at /api/ (no ``auth``: reads only, on loopback)."""
    auth = auth or Auth({}, "-", frozenset())
    streams = [0]

    def guarded(handler: Handler, write: str = "", public: bool = False) -> Handler:
        """Host and Origin checked for every request; a change (``write``: what it writes) needs a
        writer's token; a read from off this machine needs a token too, unless it is ``public``
        (the page itself, which holds no data: it must load for its token to be given)."""
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                auth.check_host(request.headers.get("Host", ""), request.headers.get("Origin"))
                if write:
                    request["user"] = auth.writer(request.headers, write)
                else:
                    user = auth.user_of(request.headers)
                    if user is None and not public and not loopback(request.remote):
                        raise AuthError(401, "reads from off this machine need the scheduler's token too "
                                             "(the X-Fornax-Token header)")
                    request["user"] = user
                if request.method == "POST" and request.content_type != "application/json":
                    raise AuthError(415, "send JSON (Content-Type: application/json)")
            except AuthError as e:
                return _error(e.status, str(e))
            return await handler(request)

        return run

    async def body(request: web.Request, *keys: str) -> dict[str, Any]:
        try:
            value = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AuthError(400, f"the body is not JSON: {e}") from None
        except web.HTTPRequestEntityTooLarge:
            raise AuthError(413, f"the body is larger than {BODY_MAX >> 10}K") from None
        if not isinstance(value, dict):
            raise AuthError(400, f"the body must be a JSON object with {', '.join(keys)}")
        for k in keys:
            if not isinstance(value.get(k), str):
                raise AuthError(400, f"the body needs {k!r}: a string")
        return value

    def api(fn: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Handler:
        """Errors of a body or of a refused change as JSON."""
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request)
            except AuthError as e:
                return _error(e.status, str(e))
            except CommandError as e:
                return _error(422, str(e))

        return run

    async def shielded(coro: Awaitable[str]) -> str:
        """A change runs to its end even if its requester goes away (as a ctl write does)."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    # The page's few files, read once: a request for one costs no file I/O (nor a thread) on the loop.
    files = {path.name: (path.read_bytes(), TYPES.get(path.suffix, "application/octet-stream"))
             for path in sorted(STATIC.iterdir()) if path.is_file()}
    tags = {name: '"' + hashlib.sha256(data).hexdigest()[:16] + '"' for name, (data, _) in files.items()}
    safe = {"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'"}

    def served(name: str, request: web.Request) -> web.Response:
        if name not in files:
            return _error(404, f"no file {name!r} in the page")
        data, kind = files[name]
        # Asked again each time (no-cache), but answered 304 while unchanged.
        headers = {**safe, "Cache-Control": "no-cache", "ETag": tags[name]}
        if request.headers.get("If-None-Match") == tags[name]:
            return web.Response(status=304, headers=headers)
        return web.Response(body=data, content_type=kind, charset="utf-8", headers=headers)

    async def index(request: web.Request) -> web.StreamResponse:
        return served("index.html", request)

    async def static(request: web.Request) -> web.StreamResponse:
        return served(request.match_info["name"], request)

    async def get_state(request: web.Request) -> web.StreamResponse:
        out = state_of(sched, request.query)
        out["you"] = request.get("user")
        out["writers"] = sorted(auth.writers) if auth else []
        return _ok(out)

    async def get_placement(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in sched.state.records:
            return _error(404, f"no placement {name!r}")
        return _ok({"name": name, "text": sched.placement_text(name)})

    async def get_log(request: web.Request) -> web.StreamResponse:
        try:
            n = min(max(int(request.query.get("lines", TAIL)), 0), sched.book.keep)
        except ValueError:
            return _error(400, "lines: want a number")
        return _ok({"lines": sched.book.tail(n), "end": sched.book.end})

    async def stream_log(request: web.Request) -> web.StreamResponse:
        """Server-sent events: the last lines, then each new one (its id is the log's offset after it)."""
        if streams[0] >= STREAMS:
            return _error(503, f"{STREAMS} log streams are open already: close one")
        streams[0] += 1
        try:
            with streaming(request):  # (not the connection closed first when HTTP has too many)
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                                   "X-Accel-Buffering": "no"})
                await resp.prepare(request)
                book = sched.book
                last = request.headers.get("Last-Event-ID", "")
                at = min(int(last), book.end) if last.isdigit() else None  # (an id from the future: from now)
                if at is None:  # a new reader: the last lines, then where they end (the id it comes back with)
                    at = book.end
                    text = "".join(f"data: {line}\n\n" for line in book.tail(TAIL))
                    await resp.write(f"retry: 1000\n\n{text}id: {at}\n: the lines kept end here\n\n".encode())
                idle = 0.0
                while True:
                    data = book.read(at, 1 << 16)
                    cut = data.rfind(b"\n") + 1
                    if cut:
                        at = max(at, book.start) + cut
                        lines = data[:cut].decode(errors="replace").splitlines()
                        events = ("".join(f"data: {line}\n\n" for line in lines[:-1])
                                  + f"id: {at}\ndata: {lines[-1]}\n\n")
                        await resp.write(events.encode())
                        idle = 0.0
                        continue
                    if request.transport is None or request.transport.is_closing():
                        break  # the reader went away
                    await asyncio.sleep(STREAM_POLL)
                    idle += STREAM_POLL
                    if idle >= 15:  # a comment now and then: a client (or a proxy) sees the stream is alive
                        await resp.write(b": alive\n\n")
                        idle = 0.0
                return resp
        except ConnectionError:  # the reader went away while we wrote
            return web.Response(status=204)
        finally:
            streams[0] -= 1

    async def post_ctl(request: web.Request) -> web.StreamResponse:
        b = await body(request, "command")
        text = b["command"]
        if "\n" in text.strip():
            raise AuthError(400, "one command a request (as one a write of ctl)")
        answer = await shielded(sched.command(text, request["user"]))
        return _ok({"ok": True, "answer": answer})

    async def get_policy(request: web.Request) -> web.StreamResponse:
        return _ok(policy_of(sched))

    async def get_version(request: web.Request) -> web.StreamResponse:
        n = request.match_info["n"]
        v = sched.policies.versions.get(int(n)) if n.isdigit() else None
        if v is None:
            return _error(404, f"no policy version {n} (kept: "
                               f"{', '.join(f'v{k}' for k in sorted(sched.policies.versions)) or 'none'})")
        return _ok({"n": v.n, "at": stamp(v.at), "kind": v.kind, "by": v.by, "source": v.source,
                    "title": v.title()})

    def policy_body(b: dict[str, Any]) -> str:
        text = b["text"]
        if len(text.encode()) > MAX_POLICY:
            raise AuthError(413, f"the policy is larger than {MAX_POLICY >> 10}K")
        return str(text)

    async def post_compile(request: web.Request) -> web.StreamResponse:
        text = policy_body(await body(request, "text"))
        # Compiling is quick for what fits in MAX_POLICY, but Lua's parser runs in C: off the loop.
        return _ok(await asyncio.get_running_loop().run_in_executor(None, compiled, text))

    async def post_check(request: web.Request) -> web.StreamResponse:
        text = policy_body(await body(request, "text"))
        c = await asyncio.get_running_loop().run_in_executor(None, compiled, text)
        try:
            answer = await sched.check_policy(text)
        except CommandError as e:
            return _ok({**c, "ok": False, **policy_error(str(e))})
        return _ok({**c, "ok": True, "answer": answer})

    async def post_simulate(request: web.Request) -> web.StreamResponse:
        b = await body(request, "place")
        place = b["place"].strip()
        if "text" in b and b["text"] is not None:
            if not isinstance(b["text"], str):
                raise AuthError(400, "the body's 'text' must be a string (or left out: the active policy)")
            answer = await sched.simulate_policy(policy_body(b), place)
        else:  # the active policy: ctl's own simulate
            answer = await sched.command(place if place.startswith("simulate") else f"simulate {place}", "-")
        return _ok({"ok": True, "answer": answer})

    async def post_policy(request: web.Request) -> web.StreamResponse:
        text = policy_body(await body(request, "text"))
        try:
            answer = await shielded(sched.set_policy(text, request["user"]))
        except CommandError as e:  # the error, and the line it names (if it names one)
            return web.json_response(policy_error(str(e)), status=422, headers={"Cache-Control": "no-store"})
        return _ok({"ok": True, "answer": answer, "version": sched.policies.active.n if sched.policies.active else 0})

    async def post_restore(request: web.Request) -> web.StreamResponse:
        b = await body(request)
        n = b.get("version")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise AuthError(400, "the body needs 'version': a policy version, a whole number from 1")
        answer = await shielded(sched.command(f"policy restore {n}", request["user"]))
        return _ok({"ok": True, "answer": answer})

    async def get_templates(request: web.Request) -> web.StreamResponse:
        return _ok({"templates": await asyncio.get_running_loop().run_in_executor(None, templates)})

    async def not_found(request: web.Request) -> web.StreamResponse:
        return _error(404, f"no such API path: {request.method} {request.path} (see docs/web.8.md)")

    r = app.router
    r.add_get("/", guarded(index, public=True))
    r.add_get("/api/state", guarded(api(get_state)))
    r.add_get("/api/placements/{name}", guarded(api(get_placement)))
    r.add_get("/api/log", guarded(api(get_log)))
    r.add_get("/api/log/stream", guarded(stream_log))
    r.add_post("/api/ctl", guarded(api(post_ctl), "ctl"))
    r.add_get("/api/policy", guarded(api(get_policy)))
    r.add_post("/api/policy", guarded(api(post_policy), "policy"))
    r.add_get("/api/policy/history/{n}", guarded(api(get_version)))
    r.add_post("/api/policy/restore", guarded(api(post_restore), "ctl"))
    r.add_post("/api/policy/compile", guarded(api(post_compile)))
    r.add_post("/api/policy/check", guarded(api(post_check)))
    r.add_post("/api/policy/simulate", guarded(api(post_simulate)))
    r.add_get("/api/templates", guarded(api(get_templates)))
    r.add_route("*", "/api/{rest:.*}", guarded(not_found))
    r.add_get("/favicon.ico", lambda request: _nothing())
    r.add_get("/static/{name}", guarded(static, public=True))
