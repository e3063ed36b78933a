"""The policy worker: runs Lua policies in a process of its own, so that the
scheduler can kill it when a policy runs too long, even inside one C call.

Started by fornax_sched.policy.engine as ``python -P worker.py`` and driven
over standard input and output, one JSON object a line each way.  It imports
nothing from fornax_sched, so it starts fast; the Lua side is sandbox.lua,
next to this file.

  {"op": "init", "platform": SRC, "policy": SRC|null, "deadline": S, "count": N, "memory": BYTES}
      -> {"ok": true, "defined": "decide score"} | {"ok": false, "kind": K, "error": WHY}
  {"op": "sync", "full": B, "nodes": [NODE, ...], "gone": [NAME, ...]}
      -> {"ok": true, "nodes": N, "containers": M}
  {"op": "decide", "c": NAME, "r": REQUEST, "x": [NODE, ...], "who": "policy"|"platform", + sync fields}
      -> {"by": "policy"|"platform"|"none", "how": "node"|"none", "node": .., "why": .., "looked": N,
          "fail": KIND, "fail_why": .., "platform_fail": .., "log": [LINE, ...]}

A reply {"crash": WHY} means the worker could not do what was asked; the
scheduler then kills it and starts another.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

# The sandbox's copy of the cluster costs about this much Lua memory (measured
# with room to spare); the policy's own cap comes on top.
BASE_BYTES = 4 << 20
NODE_BYTES = 4 << 10
CONTAINER_BYTES = 3 << 9  # 1.5K: a placement's view costs about 0.9K


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the scheduler goes, even mid-call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    def __init__(self) -> None:
        import lupa.lua54 as lua

        self.lua = lua
        self.rt = lua.LuaRuntime(register_eval=False, register_builtins=False, max_memory=0)
        src = Path(__file__).with_name("sandbox.lua").read_text()
        self.h = self.rt.execute(src)
        self.memory = 64 << 20

    def table(self, value: Any) -> Any:
        return self.rt.table_from(value, recursive=True)

    def limit(self) -> None:
        nodes, containers = self.h.stats()
        self.rt.set_max_memory(BASE_BYTES + nodes * NODE_BYTES + containers * CONTAINER_BYTES + self.memory)

    def init(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.memory = int(msg["memory"])
        # Against anything that allocates outside Lua's allocator: a bound on the whole process.
        cap = (2 << 30) + 4 * self.memory
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        self.limit()
        ok, kind, why = self.h.init(msg["platform"], msg.get("policy"), float(msg["deadline"]), int(msg["count"]))
        self.rt.set_max_memory(0)
        if ok:
            return {"ok": True, "defined": why or ""}
        return {"ok": False, "kind": kind, "error": why}

    def sync(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.rt.set_max_memory(0)  # the mirror is the scheduler's data, not the policy's
        nodes, containers = self.h.sync(bool(msg.get("full")), self.table(msg.get("nodes") or []),
                                        self.table(msg.get("gone") or []))
        return {"ok": True, "nodes": nodes, "containers": containers}

    def decide(self, msg: dict[str, Any]) -> dict[str, Any]:
        if msg.get("full") or msg.get("nodes") or msg.get("gone"):
            self.sync(msg)
        args = (msg["c"], self.table(msg["r"]), self.table(msg["x"]))
        self.limit()
        try:
            reply = self.h.decide(*args, msg["who"])
            fail = None
        except self.lua.LuaMemoryError:
            # The policy's own memory left none for the sandbox: drop the policy's state
            # (reloading it) and let the platform decide.
            self.rt.set_max_memory(0)
            self.h.reload()
            self.limit()
            reply = self.h.decide(*args, "platform")
            fail = "memory"
        finally:
            self.rt.set_max_memory(0)
        out: dict[str, Any] = {}
        for key in ("by", "how", "node", "why", "looked", "fail", "fail_why", "platform_fail"):
            value = reply[key]
            if value is not None:
                out[key] = value
        log = reply["log"]
        out["log"] = list(log.values()) if log is not None else []
        if fail is not None:
            out["fail"], out["fail_why"] = fail, "ran out of memory"
        return out


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    worker = Worker()
    ops = {"init": worker.init, "sync": worker.sync, "decide": worker.decide}
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            return
        try:
            msg = json.loads(line)
            reply = ops[msg["op"]](msg)
        except Exception as e:  # any failure here is reported; the scheduler restarts us
            reply = {"crash": f"{type(e).__name__}: {e}"[:500]}
        data = (json.dumps(reply) + "\n").encode()
        while data:
            data = data[os.write(1, data):]


if __name__ == "__main__":
    main()
