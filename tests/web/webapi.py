"""Calling the page's /api as a browser would, for the tests and the benchmark (docs/web.8.md)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def call(base: str, path: str, body: Any = None, token: str | None = None,
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any]:
    """(status, the JSON answer) of GET (no body) or POST (a body, or ``raw`` bytes as they are)."""
    h = {"Content-Type": "application/json"} if body is not None or raw is not None else {}
    if token:
        h["X-Fornax-Token"] = token
    h.update(headers or {})
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers=h, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
