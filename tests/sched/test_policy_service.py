"""Programmable policies in the running scheduler: the policy file, its views, history, simulation, failures.

A real `fornax-sched serve` over three real node daemons; policies are
written through the 9P file as a user would, and the decisions show where
real containers go.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fornax_sched.fs import proto as P
from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error

from ..node.cluster import NodeProc, read
from .harness import SchedProc, ctl, discovered, ls, placement, running_on, scheduler_over_three

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"

LAST = """-- the last node by name that the request fits
function decide(ctx)
  for i = #ctx.nodes, 1, -1 do
    local node = ctx.nodes[i]
    if fits(node, ctx.request) then return node.name, "last by name" end
  end
  return nil, "nothing fits"
end
"""

TROUBLE = """-- decides like the platform policy, but not for some names
function decide(ctx)
  local name = ctx.request.name
  if name:find("^boom") then error("boom asked for") end
  if name:find("^slow") then while true do end end
  if name:find("^hog") then
    local s = string.rep("x", 1 << 30)
  end
  return platform.decide(ctx)
end
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[SchedProc, list[NodeProc]]]:
    with scheduler_over_three(tmp_path, every_seed=True) as c:
        asyncio.run(discovered(c[0]))
        yield c


async def write_policy(addr: str, text: str, msize: int = P.DEFAULT_MSIZE) -> str:
    async with await Client.connect(addr, version="9P2000.u", msize=msize, timeout=10) as c:
        return (await c.write_file("cluster/scheduler/policy", text.encode(), read_reply=True)).decode()


def status(text: str) -> dict[str, str]:
    return {k: v for k, _, v in (line.partition(" ") for line in text.splitlines() if line and line[0] != " ")}


def test_lua_and_yaml_policies_through_the_file(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    sched, nodes = cluster
    by_name = {n.name: n for n in nodes}
    a = sched.addr

    async def go() -> None:
        assert "policy v1 active: lua v1" in await write_policy(a, LAST)
        assert await read(a, "cluster/scheduler/policy") == LAST
        assert await read(a, "cluster/scheduler/policy.lua") == LAST
        st = status(await read(a, "cluster/scheduler/policy.status"))
        assert (st["version"], st["kind"], st["state"], st["defined"]) == ("1", "lua", "ok", "decide")

        reply = await ctl(a, "place hello")
        assert reply.startswith("hello-1 node=fornax-03 status=running"), reply
        assert "hello-1" in await running_on(by_name["fornax-03"])
        assert (await placement(a, "hello-1"))["reason"] == "policy: fornax-03 (last by name)"
        assert "place hello-1 (place hello): -> fornax-03: policy: fornax-03 (last by name) (policy lua v1)" in \
            await read(a, "cluster/scheduler/log")

        # simulate: the decisions, and nothing changes
        reply = await ctl(a, "simulate place hello replicas=2 name=web")
        assert reply.splitlines() == [
            "simulate place hello name=web replicas=2 (policy lua v1): nothing changed",
            "web-1 -> fornax-03: policy: fornax-03 (last by name)",
            "web-2 -> fornax-03: policy: fornax-03 (last by name)"]
        assert [e.name for e in await ls(a, "cluster/scheduler/placements")] == ["hello-1"]
        assert "pending: policy: nothing fits" in await ctl(a, "simulate place hello cpu=64")
        # the command line, against a copy of this scheduler's cluster
        policy_file = sched.state / "last.lua"
        policy_file.write_text(LAST)
        out = subprocess.run([sys.executable, "-m", "fornax_sched", "policy", "simulate", "--scheduler", a,
                              str(policy_file), "place", "hello", "replicas=2"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[1:] == ["hello-2 -> fornax-03: policy: fornax-03 (last by name)",
                                               "hello-3 -> fornax-03: policy: fornax-03 (last by name)"]

        # YAML rules: compiled to Lua, readable back
        yaml_text = (EXAMPLES / "web-first.yaml").read_text()
        assert "policy v2 active: yaml web-first v2" in await write_policy(a, yaml_text)
        assert await read(a, "cluster/scheduler/policy") == yaml_text
        lua = await read(a, "cluster/scheduler/policy.lua")
        assert "function decide(ctx)" in lua and "web-east-first" in lua
        # wrong policies, each refused with the line, the old one staying
        for bad, words in [
            ("scheduler:\n  rules:\n    - name: x\n      condition: always\n      action: {dispatch: fastest}\n",
             r"line 5: .*fastest"),
            ("function decide(ctx)\n  return\n", r"line 3: 'end' expected"),
            ("function decide(ctx)\n  return ctx.nodes[1].gpu.count\nend\n", r"dry run: line 2: .*gpu"),
            ("frobnicate\n", r"line 1: unknown rule 'frobnicate'"),
        ]:
            with pytest.raises(P9Error, match="policy refused, the old one stays: " + words):
                await write_policy(a, bad)
            assert await read(a, "cluster/scheduler/policy") == yaml_text
        assert "policy refused: line 1: unknown rule 'frobnicate'" in await read(a, "cluster/scheduler/log")

        # history: listed, readable, restored as a new version
        lines = (await ctl(a, "policy history")).splitlines()
        assert len(lines) == 2, lines
        assert lines[0].startswith("  v1 ") and " lua by " in lines[0] and lines[0].endswith(": function decide(ctx)")
        assert lines[1].startswith("* v2 ") and "yaml" in lines[1] and lines[1].endswith(": web-first")
        assert [e.name for e in await ls(a, "cluster/scheduler/history")] == ["1", "2"]
        assert await read(a, "cluster/scheduler/history/1") == LAST
        assert "policy v3 active: lua v3" in await ctl(a, "policy restore 1")
        assert "restore of v1" in (await ctl(a, "policy history")).splitlines()[-1]
        with pytest.raises(P9Error, match=r"no policy version 9 \(kept: v1, v2, v3\)"):
            await ctl(a, "policy restore 9")
        assert (await ctl(a, "place hello")).startswith("hello-2 node=fornax-03")

        # a restart brings the same policy back
        sched.stop()
        sched.start()
        await discovered(sched)
        st = status(await read(a, "cluster/scheduler/policy.status"))
        assert (st["version"], st["kind"], st["state"]) == ("3", "lua", "ok")
        assert await read(a, "cluster/scheduler/policy") == LAST
        assert (await ctl(a, "place hello")).startswith("hello-3 node=fornax-03")
        # and text rules are text rules again
        assert "policy v4 active: spread" in await write_policy(a, "spread\n")
        assert (await read(a, "cluster/scheduler/policy.lua")).startswith("-- The active policy is text rules")
        assert not (await ctl(a, "place hello")).startswith("hello-4 node=fornax-03")

    asyncio.run(go())


def test_a_policy_larger_than_one_message(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    """Written in many messages, a policy takes effect at its last (short) write, or at close."""
    sched, _ = cluster
    a = sched.addr
    msize = 1024
    iounit = msize - P.IOHDRSZ

    def padded(size: int, base: str = LAST) -> str:
        text = base
        while len(text) < size - 80:
            text += "-- padding to make the policy larger than one message\n"
        return text + "-" * (size - len(text) - 1) + "\n"

    async def go() -> None:
        big = padded(3 * iounit + 100)
        assert "policy v1 active" in await write_policy(a, big, msize=msize)
        assert await read(a, "cluster/scheduler/policy") == big
        # exactly three full messages: nothing happens until the file is closed
        exact = padded(3 * iounit, LAST.replace("last by name", "last by name, exactly"))
        assert len(exact) == 3 * iounit
        async with await Client.connect(a, version="9P2000.u", msize=msize, timeout=10) as c:
            fid = await c.walk("cluster/scheduler/policy")
            await c.open(fid, P.OWRITE | P.OTRUNC)
            for off in range(0, len(exact), iounit):
                assert await c.write(fid, off, exact[off:off + iounit].encode()) == iounit
            assert await read(a, "cluster/scheduler/policy") == big  # not yet
            await c.clunk(fid)
        assert await read(a, "cluster/scheduler/policy") == exact
        assert (await ctl(a, "place hello")).startswith("hello-1 node=fornax-03")
        assert (await placement(a, "hello-1"))["reason"] == "policy: fornax-03 (last by name, exactly)"
        # a large policy with an error: the last write fails, naming the line; the old one stays
        broken = big.replace("return nil", "return nil,,")
        with pytest.raises(P9Error, match=r"line 7: unexpected symbol near ','"):
            await write_policy(a, broken, msize=msize)
        assert await read(a, "cluster/scheduler/policy") == exact
        # writes out of order are refused
        async with await Client.connect(a, version="9P2000.u", msize=msize, timeout=10) as c:
            fid = await c.walk("cluster/scheduler/policy")
            await c.open(fid, P.OWRITE)
            with pytest.raises(P9Error, match="write the whole text in order from offset 0"):
                await c.write(fid, 50, b"pack\n")
            await c.clunk(fid)

    asyncio.run(go())


def test_a_failing_policy_falls_back_and_is_reported(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    """Errors, a policy stuck in a loop and one eating memory: the platform policy decides, the
    scheduler goes on serving, each failure is logged and counted, and five in a row are reported."""
    sched, nodes = cluster
    a = sched.addr

    async def go() -> None:
        await write_policy(a, TROUBLE)
        reply = await ctl(a, "place hello name=boom")
        assert reply.startswith("boom node=fornax-01 status=running"), reply
        assert (await placement(a, "boom"))["reason"] == \
            "platform: fornax-01 (0 containers, fewest; the policy failed)"
        log = await read(a, "cluster/scheduler/log")
        assert "lua policy failed: line 4: boom asked for; the platform policy decides" in log

        async def reader() -> int:  # the scheduler keeps answering while a policy misbehaves
            n = 0
            for _ in range(20):
                await read(a, "cluster/scheduler/ctl")
                n += 1
            return n

        slow = asyncio.create_task(ctl(a, "place hello name=slow"))
        assert await reader() == 20
        assert "status=running" in await slow
        assert "the policy timed out" in (await placement(a, "slow"))["reason"]
        assert "status=running" in await ctl(a, "place hello name=hog")
        assert "the policy ran out of memory" in (await placement(a, "hog"))["reason"]
        st = status(await read(a, "cluster/scheduler/policy.status"))
        assert (st["errors"], st["timeouts"], st["memory"], st["fallbacks"]) == ("1", "1", "1", "3")
        assert st["state"] == "ok"
        for i in range(2):
            await ctl(a, f"place hello name=boom-{i}")
        text = await read(a, "cluster/scheduler/policy.status")
        st = status(text)
        assert st["state"] == "failing" and st["last_failure"].startswith("error: line 4: boom asked for")
        assert "(failing: 5 decisions in a row)" in await read(a, "cluster/scheduler/log")
        assert "recent failures:" in text
        assert "policy lua v1 failing: 5 decisions in a row; last: error: line 4: boom asked for" in \
            await read(a, "cluster/scheduler/ctl")
        # a simulation shows the fallback but counts for nothing
        before = await read(a, "cluster/scheduler/policy.status")
        reply = await ctl(a, "simulate place hello name=boom-sim")
        assert "boom-sim -> fornax-0" in reply and "the policy failed" in reply, reply
        assert await read(a, "cluster/scheduler/policy.status") == before
        # a good decision clears it
        assert "status=running" in await ctl(a, "place hello name=fine")
        assert status(await read(a, "cluster/scheduler/policy.status"))["state"] == "ok"
        # every container placed runs exactly once
        names = {n for node in nodes for n in await running_on(node)}
        assert names == {"boom", "slow", "hog", "boom-0", "boom-1", "fine"}

    asyncio.run(go())


def test_swapping_the_policy_under_a_stream_of_places(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    """Places keep coming while the policy changes between Lua, YAML and text rules: none fails,
    and every container runs exactly once."""
    sched, nodes = cluster
    a = sched.addr
    policies = [LAST, (EXAMPLES / "web-first.yaml").read_text(), "pack\n", (EXAMPLES / "zone-spread.lua").read_text(),
                "spread\n", LAST]

    async def go() -> None:
        async def places() -> list[str]:
            async with await Client.connect(a, version="9P2000.u", timeout=20) as c:
                return [(await c.write_file("cluster/scheduler/ctl", f"place hello name=s{i}".encode(),
                                            read_reply=True)).decode() for i in range(40)]

        async def swaps() -> list[str]:
            out = []
            for text in policies:
                out.append(await write_policy(a, text))
                await asyncio.sleep(0.05)
            return out

        replies, swapped = await asyncio.gather(places(), swaps())
        assert all(" status=running" in r for r in replies), replies
        assert [s.split()[1] for s in swapped] == [f"v{i + 1}" for i in range(len(policies))]
        runs = [n for node in nodes for n in await running_on(node)]
        assert sorted(runs) == sorted(f"s{i}" for i in range(40))

    asyncio.run(go())


def test_a_size_no_policy_could_be_given_is_refused_at_place(cluster: tuple[SchedProc, list[NodeProc]]) -> None:
    """A place asking for 2^76 bytes was acknowledged as pending; the Lua sandbox could not take the
    number (OverflowError), so that decision fell to the built-in spread ("platform policy
    unavailable") and every later policy was refused by its dry run while it waited.  Sizes above
    8192T are refused where they are written; 8192T itself waits like any place too big for the
    nodes, and policies go on deciding and loading."""
    sched, _ = cluster
    a = sched.addr

    async def go() -> None:
        await write_policy(a, (EXAMPLES / "best-fit.lua").read_text())
        with pytest.raises(P9Error, match="bad mem constraint 'mem>=99999999999999999999999T': must be at most 8192T"):
            await ctl(a, "place hello name=big mem>=99999999999999999999999T")
        with pytest.raises(P9Error, match="must be at most 8192T"):
            await ctl(a, "place hello name=big mem=9007199254740993")  # 2^53 + 1: a float would round it to 2^53
        reply = await ctl(a, "place hello name=edge mem=8192T")
        assert reply.startswith("edge node=- status=pending (policy: no node fits mem>=8192T"), reply  # Lua decided
        assert "status=running" in await ctl(a, "place hello name=small")
        assert (await placement(a, "small"))["reason"].startswith("policy:"), await placement(a, "small")
        assert "policy v2 active" in await write_policy(a, (EXAMPLES / "zone-spread.lua").read_text())
        log = await read(a, "cluster/scheduler/log")
        assert "sandbox failed" not in log and "platform policy unavailable" not in log, log
        assert "place big" not in log.replace("refused 'place hello name=big", "")

    asyncio.run(go())
