"""The sandbox holds: every way out we could think of fails, and the platform policy decides instead.

Each attempt tries, if it can, to create a marker file; the test checks the
file is not there, that the policy failed (so the platform decided, and
decided right), and that the sandbox still answers the next decision.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fornax_sched.policy import LuaProgram, PolicyError, compile_policy
from fornax_sched.sched.core import Cluster

from .conftest import PLAIN, Make, decide_body

ATTEMPTS = {
    "os.execute": "os.execute('touch {marker}')",
    "os.exit": "os.exit(1)",
    "io.open": "io.open('{marker}', 'w'):write('x')",
    "io.popen": "io.popen('touch {marker}')",
    "require": "require('os').execute('touch {marker}')",
    "load": "load('os.execute(\"touch {marker}\")')()",
    "load bytecode": "load('\\27Lua\\84\\0', 'x', 'b')()",
    "loadstring": "loadstring('return 1')()",
    "dofile": "dofile('/etc/passwd')",
    "loadfile": "loadfile('/etc/passwd')()",
    "string.dump": "local b = string.dump(function() end)",
    "dump as a string method": "local b = ('').dump(function() end)",
    "string metatable": "getmetatable('').__index.dump(print)",
    "string __index field": "local lib = ('').__index; lib.dump(print)",
    "debug": "debug.sethook()",
    "debug.getregistry": "debug.getregistry()",
    "package.loadlib": "package.loadlib('libc.so.6', 'system')('touch {marker}')",
    "package.loaded": "package.loaded.os.execute('touch {marker}')",
    "setmetatable": "setmetatable(ctx, nil)",
    "error object with __tostring":
        "error(setmetatable({}, {__tostring = function() os.execute('touch {marker}') end}))",
    "rawget": "rawget(_ENV, 'os').execute('touch {marker}')",
    "rawset on the context": "rawset(ctx.nodes, 1, nil)",
    "rawlen": "local n = rawlen(ctx.nodes)",
    "rawequal": "local same = rawequal(ctx, ctx)",
    "_G": "_G.os.execute('touch {marker}')",
    "_ENV": "_ENV.io.open('{marker}', 'w')",
    "collectgarbage": "collectgarbage('stop')",
    "python (lupa)": "python.eval('open(\"{marker}\", \"w\")')",
    "python builtins": "python.builtins.open('{marker}', 'w')",
    "jit and ffi": "ffi.C.system('touch {marker}')",
    "math.randomseed": "math.randomseed(42)",
    "debug through a coroutine": "debug.getinfo(coroutine.running())",
    "os through the platform table": "local f = platform.decide; f.os.execute('touch {marker}')",
    "writing the context": "ctx.nodes[1].status = 'dead'",
    "writing the request": "ctx.request.cpus = 0",
    "writing labels": "ctx.node['node-1'].labels.disk = 'ssd'",
    "writing placements": "ctx.placements['web-1'] = nil",
    "table.insert into the context": "table.insert(ctx.nodes, {name = 'evil'})",
    "table.sort of the context": "table.sort(ctx.nodes, function(a, b) return a.name > b.name end)",
    "to-be-closed context": "local nodes <close> = ctx.nodes",
    "yield out of decide": "coroutine.yield('node-1')",
    "unpack bomb": "local t = {table.unpack({}, 1, 1e8)}",
    "huge string.rep": "local s = string.rep('x', 1 << 62)",
}


@pytest.mark.parametrize("attempt", ATTEMPTS.values(), ids=ATTEMPTS.keys())
def test_escape_fails(attempt: str, make: Make, cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "escaped"
    p = make(decide_body(attempt.replace("{marker}", str(marker))), deadline=0.5)  # some fail slowly: a 16M stack
    d = p.decide(cluster, "x", PLAIN, frozenset())
    assert not marker.exists()
    assert d.node == "node-3" and d.reason == "platform: node-3 (0 containers, fewest; the policy failed)", d
    assert p.counters["errors"] == 1 and p.counters["restarts"] == 0, p.describe()
    assert p.decide(cluster, "y", PLAIN, frozenset()).node == "node-3"  # the sandbox still answers


def test_the_context_stays_as_it_was(make: Make, cluster: Cluster) -> None:
    p = make("""
function decide(ctx)
  pcall(function() ctx.nodes[1].status = 'dead' end)
  pcall(function() ctx.nodes[1].labels.zone = 'moon' end)
  pcall(function() ctx.request.cpus = 1000 end)
  pcall(table.remove, ctx.nodes)
  local n = ctx.nodes[1]
  return nil, n.status .. ' ' .. n.labels.zone .. ' ' .. ctx.request.cpus .. ' ' .. #ctx.nodes
end
""")
    for _ in range(2):
        assert p.decide(cluster, "x", PLAIN, frozenset()).reason == "policy: online east 0.5 4"


def test_a_policy_cannot_break_the_platform(make: Make, cluster: Cluster) -> None:
    """A policy may wreck its own globals and library tables; the platform policy has its own."""
    p = make(decide_body("""
    string.find, string.sub, table.concat, table.sort = nil, nil, nil, nil
    ipairs, pairs, next, tostring, math, platform = nil, nil, nil, nil, nil, nil
    error('wrecked')"""))
    for name in ("a", "b"):
        d = p.decide(cluster, name, PLAIN, frozenset())
        assert d.node == "node-3" and "the policy failed" in d.reason
    assert p.counters["errors"] == 2


def test_print_cannot_reach_the_pipe(make: Make, cluster: Cluster) -> None:
    """print goes to the scheduler's log (one clean line each), never to the worker's output."""
    p = make("""
function decide(ctx)
  print('{"by": "policy", "how": "node", "node": "node-9"}')
  print('two\\nlines', nil, 3)
  for i = 1, 100 do log('line', i) end
  return 'node-1'
end
""")
    d = p.decide(cluster, "x", PLAIN, frozenset())
    assert d.node == "node-1"
    assert p.logs[0] == '{"by": "policy", "how": "node", "node": "node-9"}'
    assert p.logs[1] == "two?lines nil 3"
    assert len(p.logs) == 50  # at most 50 lines a decision


def test_bytecode_is_refused(make: Make) -> None:
    import lupa.lua54 as lua

    rt = lua.LuaRuntime(register_eval=False, encoding=None)
    code = rt.eval("string.dump(function() return 'node-1' end)").decode("latin-1")
    assert code.startswith("\x1bLua")
    with pytest.raises(PolicyError, match="binary"):
        compile_policy(code)
    p = LuaProgram(code)
    try:
        with pytest.raises(PolicyError, match="binary"):
            p.start()
    finally:
        p.close()
