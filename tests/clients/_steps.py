"""Step recorder shared by the driver scripts (plain stdlib: it is imported
next to a foreign ``py9p`` in the driver's own process, never by pytest).

Each step runs on its own; a failing step is recorded and the scenario goes
on, so one report shows every operation the foreign client tried.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any


class Steps:
    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one step; record {"ok": True, "value": ...} or the error it raised."""
        try:
            value = fn()
        except Exception as e:  # the error is the result we report
            self.results[name] = {
                "ok": False,
                "error": type(e).__name__,
                "detail": _plain(e.args[0]) if e.args else str(e),
                "trace": traceback.format_exc(limit=3),
            }
            return None
        self.results[name] = {"ok": True, "value": _plain(value)}
        return value

    def dump(self) -> None:
        json.dump(self.results, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")


def _plain(v: Any) -> Any:
    """Make a value JSON-able: bytes become text (latin-1 keeps every byte)."""
    if isinstance(v, bytes):
        return v.decode("latin-1")
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)
