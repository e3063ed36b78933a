"""The policy worker: runs one Lua policy in a process of its own, so that the
scheduler can kill it when a policy runs too long, even inside one C call.

Started by fornax_sched.policy.engine as ``python -P worker.py`` and driven
over standard input and output, one JSON object a line each way.  It imports
nothing from fornax_sched, so it starts fast; the Lua side is sandbox.lua,
next to this file.  It says ``{"ready": true}`` once the interpreter is up,
before it is given a policy, so a worker can be started ahead of need.

Every time limit is an absolute ``end`` on CLOCK_MONOTONIC (time.monotonic,
the same clock in the scheduler's process on Linux): the time a message
waited in the pipe counts, and the scheduler kills the worker at end plus a
grace if no answer has come.

  {"op": "init", "platform": SRC, "policy": SRC|null, "end": T, "deadline": S, "load": S,
   "count": N, "memory": BYTES}
      -> {"ok": true, "defined": "decide score"} | {"ok": false, "kind": K, "error": WHY}
  {"op": "reload", "end": T}                       (after the policy ran out of memory)
      -> as init
  {"op": "sync", "full": B, "nodes": [NODE, ...], "gone": [NAME, ...]}
      -> {"ok": true, "nodes": N, "containers": M}
  {"op": "decide", "c": NAME, "r": REQUEST, "x": [NODE, ...], "end": T, + sync fields}
      -> {"how": "node"|"none", "node": .., "why": .., "looked": N, "log": [LINE, ...]}
       | {"fail": KIND, "fail_why": .., "log": [...]}

A policy of null runs the platform policy itself.  A reply {"crash": WHY}
means the worker could not do what was asked; the scheduler then kills it
and starts another.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time
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


def _no_attributes(obj: object, name: object, setting: bool) -> object:
    """lupa's attribute filter: Lua reaches no attribute of a Python object (the clock is the only one it holds)."""
    raise AttributeError("no Python attributes in the sandbox")


class Worker:
    def __init__(self) -> None:
        import lupa.lua54 as lua

        self.lua = lua
        self.rt = lua.LuaRuntime(register_eval=False, register_builtins=False, max_memory=0,
                                 attribute_filter=_no_attributes)
        src = Path(__file__).with_name("sandbox.lua").read_text()
        self.h = self.rt.execute(src)
        # The hook looks at this clock every few thousand instructions: a call
        # from Lua costs about 0.1 us, and it is the scheduler's clock.
        self.h.set_clock(time.monotonic)
        self.memory = 64 << 20

    def table(self, value: Any) -> Any:
        return self.rt.table_from(value, recursive=True)

    def limit(self) -> None:
        nodes, containers = self.h.stats()
        self.rt.set_max_memory(BASE_BYTES + nodes * NODE_BYTES + containers * CONTAINER_BYTES + self.memory)

    @staticmethod
    def _loaded(ok: bool, kind: Any, why: Any) -> dict[str, Any]:
        if ok:
            return {"ok": True, "defined": why or ""}
        return {"ok": False, "kind": kind, "error": why}

    def init(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.memory = int(msg["memory"])
        # Against anything that allocates outside Lua's allocator: a bound on the whole process.
        cap = (2 << 30) + 4 * self.memory
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        self.limit()
        try:
            ok, kind, why = self.h.init(msg["platform"], msg.get("policy"), float(msg["end"]), int(msg["count"]),
                                        float(msg["deadline"]), float(msg["load"]))
        except self.lua.LuaMemoryError:
            ok, kind, why = False, "memory", "ran out of memory"
        finally:
            self.rt.set_max_memory(0)
        return self._loaded(ok, kind, why)

    def reload(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.limit()
        try:
            ok, kind, why = self.h.reload(float(msg["end"]))
        except self.lua.LuaMemoryError:
            self.rt.set_max_memory(0)
            self.h.drop()
            ok, kind, why = False, "memory", "ran out of memory"
        finally:
            self.rt.set_max_memory(0)
        return self._loaded(ok, kind, why)

    def sync(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.rt.set_max_memory(0)  # the mirror is the scheduler's data, not the policy's
        nodes, containers = self.h.sync(bool(msg.get("full")), self.table(msg.get("nodes") or []),
                                        self.table(msg.get("gone") or []))
        return {"ok": True, "nodes": nodes, "containers": containers}

    def decide(self, msg: dict[str, Any]) -> dict[str, Any]:
        if msg.get("full") or msg.get("nodes") or msg.get("gone"):
            self.sync(msg)
        args = (msg["c"], self.table(msg["r"]), self.table(msg["x"]), float(msg["end"]))
        self.limit()
        try:
            reply = self.h.decide(*args)
        except self.lua.LuaMemoryError:
            # The policy's own memory left none for the sandbox: drop the policy's
            # state; the scheduler has it loaded again and the platform decides.
            self.rt.set_max_memory(0)
            self.h.drop()
            return {"fail": "memory", "fail_why": "ran out of memory", "log": []}
        finally:
            self.rt.set_max_memory(0)
        out: dict[str, Any] = {}
        for key in ("how", "node", "why", "looked", "fail", "fail_why"):
            value = reply[key]
            if value is not None:
                out[key] = value
        log = reply["log"]
        out["log"] = list(log.values()) if log is not None else []
        return out


def _say(reply: dict[str, Any]) -> None:
    data = (json.dumps(reply) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    worker = Worker()
    ops = {"init": worker.init, "reload": worker.reload, "sync": worker.sync, "decide": worker.decide}
    _say({"ready": True})
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
        _say(reply)


if __name__ == "__main__":
    main()
