"""A container's own environment variables: the rules a node holds a run to, and the scheduler
a place (so that a place the node would refuse is refused where it is written)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .units import format_size

ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ENV = 256  # variables per container
MAX_ENV_BYTES = 64 << 10  # of the run's own variables, "KEY=VALUE\0" each


def env_problem(env: Mapping[str, str]) -> str | None:
    """What is wrong with a run's variables, or None.

    FORNAX_* are refused: they are how a container learns where it runs,
    and a user's value would lie about that.
    """
    if len(env) > MAX_ENV:
        return f"too many env variables: {len(env)} (at most {MAX_ENV})"
    size = 0
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_KEY.fullmatch(k):
            return f"bad env name {k!r}: want [A-Za-z_][A-Za-z0-9_]*"
        if k.startswith("FORNAX_"):
            return f"env {k}: FORNAX_ variables are set by the node and cannot be given"
        if not isinstance(v, str) or "\0" in v:
            return f"bad value of env {k}: text without NUL"
        size += len(k.encode()) + len(v.encode(errors="surrogateescape")) + 2
    if size > MAX_ENV_BYTES:
        return f"env too large: {size} bytes (at most {format_size(MAX_ENV_BYTES)})"
    return None
