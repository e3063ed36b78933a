"""The container runtime with real processes: run, log, stop, limits, errors, a daemon crash.

Every test ends with no process of its own left (checked through /proc) and
no cgroup left behind.  A zombie counts as gone: after a daemon is killed,
its orphans are reaped by init, lazily on some machines.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fornax_sched.node import rt_cgroup
from fornax_sched.node.runtime import (
    LOST,
    SHUTDOWN,
    STOPPED,
    Container,
    ContainerError,
    Limits,
    Runtime,
    format_size,
    parse_size,
)

from ..helpers import run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "images"
PY = shlex.quote(sys.executable)

IMAGES = {
    "code": "sh -c 'echo \"bye from $FORNAX_CONTAINER on $FORNAX_NODE ($FORNAX_IMAGE)\"; exit \"$1\"' code",
    "stubborn": "sh -c \"trap '' TERM; echo stubborn; while :; do sleep 0.1; done\"",
    "hog": f"{PY} -c \"x = bytearray(300 << 20); import time; time.sleep(5)\"",
    "chatty": "sh -c 'i=0; while [ $i -lt 3000 ]; do echo \"line $i of the chatty container\"; i=$((i+1)); done'",
    "ticker": "sh -c 'i=0; while :; do echo \"tick $i\"; i=$((i+1)); sleep 0.05; done'",
    "waiter": "sh -c 'while [ ! -e \"$1\" ]; do sleep 0.02; done; echo done; exit \"$2\"' waiter",
    "selfkill": "sh -c 'kill -9 $$'",
    "idle": "sleep 60",
    "badexec": "./notanexecutable",
}



def make_images(tmp: Path) -> Path:
    images = tmp / "images"
    for name, cmd in IMAGES.items():
        (images / name).mkdir(parents=True)
        (images / name / "config").write_text(f"# {name}: a test image\n{cmd}\n")
    (images / "hello").symlink_to(EXAMPLES / "hello")
    bad = images / "badexec" / "rootfs" / "notanexecutable"
    bad.parent.mkdir()
    bad.write_bytes(b"\x7fnot an ELF, not a script\n")
    bad.chmod(0o755)
    return images


def gone(pid: int | None) -> bool:
    """No such process, or only its zombie."""
    if pid is None:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return True
    return data[data.rindex(b")") + 2:].split()[0] == b"Z"


def group_members(pgid: int | None) -> list[int]:
    """Live processes in a process group (a container's, whose pgid is its pid)."""
    out: list[int] = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            rest = data[data.rindex(b")") + 2:].split()
            if int(rest[2]) == pgid and rest[0] != b"Z":
                out.append(int(name))
    return out


async def until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def ended(rt: Runtime, cid: str, timeout: float = 5.0) -> Container:
    await until(lambda: rt.get(cid).state not in ("created", "running"), timeout, f"container {cid} to end")
    return rt.get(cid)


def cgroups_of(node: str, state: Path) -> list[str]:
    """The container groups this node has in any hierarchy (should be none after a test)."""
    try:
        b = rt_cgroup.detect(rt_cgroup.parent_name(node, str(state)))
    except rt_cgroup.BackendError:
        return []
    out = []
    for parent in {b.mem_parent, b.cpu_parent}:
        if parent and os.path.isdir(parent):
            groups = [f"{parent}/{n}" for n in os.listdir(parent) if os.path.isdir(f"{parent}/{n}")]
            if not groups:
                os.rmdir(parent)  # (detect just made it)
            out += groups
    return out


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_images(tmp_path)


@pytest.fixture
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    name = request.node.name[:40].replace("[", "-").replace("]", "")
    yield name
    assert cgroups_of(name, tmp_path / "state") == []


class Rt:
    """Runtime factory for a test: every runtime made is shut down, and nothing may be left running."""

    def __init__(self, images: Path, state: Path, node: str) -> None:
        self.images, self.state, self.node = images, state, node
        self.made: list[Runtime] = []

    async def __call__(self, **kw: Any) -> Runtime:
        kw.setdefault("grace", 0.5)
        kw.setdefault("node", self.node)
        rt = Runtime(kw.pop("images", self.images), kw.pop("state", self.state), **kw)
        self.made.append(rt)
        await rt.start()
        return rt

    async def close(self) -> None:
        pids = []
        for rt in self.made:
            pids += [p for c in rt.list() for p in (c.pid, c.monitor)]
            await rt.shutdown()
        await until(lambda: all(gone(p) for p in pids), 3, "every container and monitor to be gone")

    def run(self, main: Callable[[], Awaitable[Any]]) -> Any:
        """Run a test's main, then shut every runtime down in the same event loop (a runtime lives in one)."""
        async def both() -> Any:
            try:
                return await main()
            finally:
                await self.close()
        return run(both())


@pytest.fixture
def rts(images: Path, tmp_path: Path, node: str) -> Iterator[Rt]:
    yield Rt(images, tmp_path / "state", node)


# ------------------------------------------------------------ the basics
def test_hello_runs_and_logs(rts: Rt) -> None:
    async def main() -> None:
        rt = await rts()
        changes: list[tuple[str, str]] = []
        rt.on_change = lambda c: changes.append((c.id, c.state))
        assert "hello" in rt.images() and "code" in rt.images()
        c = await rt.run("hello", ["one", "two words"])
        assert c.state == "running" and c.id == "1" and c.pid and not gone(c.pid)
        assert c.name == "hello-1" and c.cmd[-2:] == ["one", "two words"]
        await until(lambda: b"args" in rt.log(c.id), what="hello's output")
        assert rt.log(c.id) == b"hello from fornax container 1\nargs: one two words\n"
        st = dict(line.split(" ", 1) for line in c.status().splitlines())
        assert st["id"] == "1" and st["state"] == "running" and st["image"] == "hello"
        assert int(st["pid"]) == c.pid and float(st["started"]) > 0 and "exit_code" not in st
        # its own session and process group; stdin is /dev/null
        assert os.getsid(c.pid) == c.pid and os.getpgid(c.pid) == c.pid
        assert os.readlink(f"/proc/{c.pid}/fd/0") == "/dev/null"
        assert f"FORNAX_CONTAINER={c.id}".encode() in Path(f"/proc/{c.pid}/environ").read_bytes()
        t = time.monotonic()
        c = await rt.stop(c.id)
        assert time.monotonic() - t < 1.0, "hello must end promptly on SIGTERM"
        assert (c.state, c.signal, c.reason) == ("stopped", signal.SIGTERM, "stopped by request")
        assert gone(c.pid) and group_members(c.pid) == []
        assert changes == [("1", "running"), ("1", "stopped")]
        st = dict(line.split(" ", 1) for line in c.status().splitlines())
        assert st["state"] == "stopped" and "finished" in st and st["signal"] == "15"
    rts.run(main)


def test_web_example_serves_on_loopback(rts: Rt) -> None:
    async def main() -> None:
        rt = await rts(images=EXAMPLES)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        c = await rt.run("web", [str(port)])

        def get() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return b"".join(iter(lambda: conn.recv(4096), b""))

        deadline = time.monotonic() + 10
        while True:
            try:
                reply = await asyncio.to_thread(get)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, rt.log(c.id)
                await asyncio.sleep(0.05)
        assert reply.startswith(b"HTTP/1.0 200") and b"hello from a fornax container" in reply
        c = await rt.stop(c.id)
        assert c.state == "stopped" and c.signal == signal.SIGTERM
        assert f"port {port}".encode() in rt.log(c.id)
    rts.run(main)


def test_exit_codes(rts: Rt) -> None:
    async def main() -> None:
        rt = await rts()
        ok = await rt.run("code", ["0"], name="fine")
        bad = await rt.run("code", ["3"])
        killed = await rt.run("selfkill")
        ok, bad, killed = [await ended(rt, c.id) for c in (ok, bad, killed)]
        assert (ok.state, ok.exit_code, ok.reason, ok.name) == ("exited", 0, "", "fine")
        assert rt.log(ok.id) == f"bye from {ok.id} on {rt.node} (code)\n".encode()
        assert (bad.state, bad.exit_code, bad.reason) == ("failed", 3, "exit code 3")
        assert (killed.state, killed.signal, killed.reason) == ("failed", 9, "killed by signal 9")
        assert "exit_code 3" in bad.status()
        # stopping an ended container changes nothing
        assert (await rt.stop(ok.id)).state == "exited"
    rts.run(main)


def test_stop_escalates_to_sigkill(rts: Rt) -> None:
    async def main() -> None:
        rt = await rts()
        c = await rt.run("stubborn")
        await until(lambda: b"stubborn" in rt.log(c.id), what="the trap to be set")
        t = time.monotonic()
        c = await rt.stop(c.id, grace=0.3)
        assert 0.3 <= time.monotonic() - t < 2
        assert (c.state, c.signal) == ("stopped", signal.SIGKILL)
        assert c.reason == "stopped by request (killed after 0.3s grace)"
        assert gone(c.pid) and group_members(c.pid) == []
        k = await rt.kill((await rt.run("stubborn")).id)
        assert (k.state, k.signal, k.reason) == ("stopped", 9, "killed by request")
    rts.run(main)


def test_stop_while_starting_waits_for_the_start(rts: Rt) -> None:
    async def main() -> None:
        rt = await rts()
        starting = asyncio.ensure_future(rt.run("hello"))
        await asyncio.sleep(0)  # run() now waits for the monitor
        assert rt.get("1").state == "created"
        c = await rt.stop("1")
        assert (await starting) is c and c.state == "stopped" and gone(c.pid)
        starting = asyncio.ensure_future(rt.run("hello"))
        await asyncio.sleep(0)
        await rt.destroy("2")
        assert gone((await starting).pid) and [c.id for c in rt.list()] == ["1"]
    rts.run(main)


def test_a_run_whose_caller_goes_away_still_starts(rts: Rt) -> None:
    """A client that drops its connection mid-run cancels the request, not the start:
    the container must not stay "created" (the scheduler found one that did)."""
    async def main() -> None:
        rt = await rts()
        starting = asyncio.ensure_future(rt.run("hello", name="orphaned-caller"))
        await asyncio.sleep(0)
        assert rt.get("1").state == "created"
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await until(lambda: rt.get("1").state == "running", what="the start to finish")
        assert not gone(rt.get("1").pid)
    rts.run(main)


def test_command_that_cannot_be_executed_fails(rts: Rt) -> None:
    async def main() -> None:
        rt = await rts()
        c = await rt.run("badexec")
        assert c.state == "failed" and c.reason == "cannot start ./notanexecutable: Exec format error"
        assert b"Exec format error" in rt.log(c.id)
    rts.run(main)


def test_errors_change_nothing(rts: Rt, tmp_path: Path) -> None:
    def snapshot() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in sorted((tmp_path / "state").rglob("*")) if p.is_file()}

    async def main() -> None:
        rt = await rts()
        await ended(rt, (await rt.run("code", ["0"])).id)
        before, groups = snapshot(), cgroups_of(rt.node, rts.state)
        cases: list[tuple[Awaitable[Any], str]] = [
            (rt.run("nope"), f"unknown image 'nope' (images in {rts.images}: badexec, chatty, code, hello, "),
            (rt.run("../images"), "unknown image '../images'"),
            (rt.run("code", limits=Limits(mem=12)), "bad memory limit '12'"),
            (rt.run("code", limits=Limits(cpus=0)), "bad cpu limit '0'"),
            (rt.run("code", limits=Limits(cpus=-1.5)), "bad cpu limit '-1.5'"),
            (rt.run("code", name="two words"), "bad container name 'two words'"),
            (rt.run("code", labels={"bad key": "x"}), "bad label key 'bad key'"),
            (rt.run("code", labels={"k": "two words"}), "bad value 'two words' of label k"),
            (rt.run("code", labels={"k": "tab\there"}), "bad value 'tab\\there' of label k"),
            (rt.run("code", env={"FORNAX_CONTAINER": "99"}), "env FORNAX_CONTAINER: FORNAX_ variables"),
            (rt.run("code", env={"9LIVES": "x"}), "bad env name '9LIVES'"),
            (rt.run("code", env={"NUL": "a\0b"}), "bad value of env NUL: text without NUL"),
            (rt.stop("42"), "unknown container 42"),
            (rt.kill("42"), "unknown container 42"),
            (rt.destroy("42"), "unknown container 42"),
        ]
        for coro, message in cases:
            with pytest.raises(ContainerError) as e:
                await coro
            assert str(e.value).startswith(message), str(e.value)
        for fn in (rt.get, rt.log):
            with pytest.raises(ContainerError, match="^unknown container 42$"):
                fn("42")
        (rts.images / "empty").mkdir()
        (rts.images / "empty" / "config").write_text("# nothing\n")
        with pytest.raises(ContainerError, match="config has no command"):
            await rt.run("empty")
        (rts.images / "missing").mkdir()
        (rts.images / "missing" / "config").write_text("no-such-command-here x\n")
        with pytest.raises(ContainerError, match="command 'no-such-command-here' not found"):
            await rt.run("missing")
        # images() lists only what run() takes: neither of those, nor a directory without config
        (rts.images / "noconfig").mkdir()
        assert rt.images() == sorted(IMAGES.keys() | {"hello"})
        assert snapshot() == before and cgroups_of(rt.node, rts.state) == groups
        assert [c.id for c in rt.list()] == ["1"]
        with pytest.raises(ContainerError, match="unknown limits backend 'zfs'"):
            Runtime(rts.images, tmp_path / "other", limits_backend="zfs")
    rts.run(main)


def test_sizes() -> None:
    assert [parse_size(s) for s in ("100", "512K", "64M", "1G", "1.5G", "2g", "64MiB", "64MB")] == [
        100, 512 << 10, 64 << 20, 1 << 30, 3 << 29, 2 << 30, 64 << 20, 64 << 20]
    assert [format_size(n) for n in (268435456, 1 << 30, 1536 << 20, 1000, 4096, 0)] == [
        "256M", "1G", "1536M", "1000", "4K", "0"]
    for bad in ("12Q", "", "M", "-1M", "0", "1e3"):
        with pytest.raises(ContainerError, match="bad memory limit"):
            parse_size(bad)
    with pytest.raises(ContainerError, match=r"^bad memory limit '12Q': want bytes"):
        parse_size("12Q")


def test_log_is_bounded(rts: Rt, tmp_path: Path) -> None:
    async def main() -> None:
        rt = await rts(log_limit=4096)
        c = await ended(rt, (await rt.run("chatty")).id)
        assert c.state == "exited"
        out = rt.log(c.id)
        assert 2048 < len(out) <= 4096
        assert out.endswith(b"line 2999 of the chatty container\n")
        assert out.startswith(b"line ")  # trimmed at a line boundary
        assert (tmp_path / "state" / "containers" / c.id / "log").stat().st_size <= 4096
    rts.run(main)


def test_ids_are_never_reused(rts: Rt) -> None:
    async def main() -> None:
        rt = await rts()
        for _ in range(3):
            await rt.run("code", ["0"])
        await rt.destroy("3")
        await rt.destroy("2")
        with pytest.raises(ContainerError):
            rt.get("3")
        assert not (rts.state / "containers" / "3").exists()
        await rt.shutdown()
        rt2 = await rts()
        assert [c.id for c in rt2.list()] == ["1"]
        assert (await rt2.run("code", ["0"])).id == "4"
    rts.run(main)


def test_destroy_stops_and_forgets(rts: Rt) -> None:
    async def main() -> None:
        rt = await rts()
        seen: list[str] = []
        rt.on_change = lambda c: seen.append(c.state)
        c = await rt.run("hello")
        await rt.destroy(c.id)
        assert gone(c.pid) and seen == ["running", "stopped", "destroyed"]
        assert rt.list() == [] and not (rts.state / "containers" / c.id).exists()
    rts.run(main)


# ------------------------------------------------------------ limits
def _cgroup_backend_or_skip(rt: Runtime) -> None:
    if rt.backend == "rlimit":
        # A developer without root may lack a writable cgroup; CI (root) never skips.
        if os.geteuid() != 0 and os.environ.get("CI") != "true":
            pytest.skip("no writable cgroup for a non-root user here")
        pytest.fail("no writable cgroup was found (CI runs as root, where there must be one)")


@pytest.mark.parametrize("backend", ["auto", "rlimit"])
def test_memory_limit_exceeded_fails(rts: Rt, backend: str) -> None:
    async def main() -> None:
        rt = await rts(limits_backend=backend)
        if backend == "auto":
            _cgroup_backend_or_skip(rt)
        c = await rt.run("hog", limits=Limits(mem=64 << 20))
        c = await ended(rt, c.id, 10)
        assert (c.state, c.reason) == ("failed", "memory limit 64M exceeded"), (c.status(), rt.log(c.id))
        assert "mem 64M" in c.status()
        if backend == "auto":
            assert c.signal == signal.SIGKILL  # the OOM killer
        else:
            assert c.exit_code == 1 and b"MemoryError" in rt.log(c.id)
        # under the limit the same image runs
        ok = await rt.run("hog", limits=Limits(mem=512 << 20))
        await asyncio.sleep(0.5)
        assert rt.get(ok.id).state == "running"
        await rt.kill(ok.id)
    rts.run(main)


def test_cgroup_limits_are_in_place(rts: Rt) -> None:
    async def main() -> None:
        rt = await rts()
        _cgroup_backend_or_skip(rt)
        c = await rt.run("hello", limits=Limits(mem=64 << 20, cpus=0.5))
        await until(lambda: b"hello" in rt.log(c.id))
        mem = c.cgroups[0]
        assert int(Path(mem, "cgroup.procs").read_text().split()[0]) == c.pid
        if rt.backend == "cgroup1":
            assert Path(mem, "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
            if len(c.cgroups) > 1:
                assert Path(c.cgroups[1], "cpu.cfs_quota_us").read_text().strip() == "50000"
        else:
            assert Path(mem, "memory.max").read_text().strip() == str(64 << 20)
        # (its first pages, before it joined, are charged to the daemon's group: wait for more)
        await until(lambda: rt.mem_used() > 0, 3, "memory charged to the container")
        assert rt.mem_used() < 64 << 20
        await rt.stop(c.id)
        assert not any(os.path.exists(d) for d in c.cgroups)
    rts.run(main)


def test_rlimit_backend_says_cpu_is_not_limited(rts: Rt) -> None:
    async def main() -> None:
        rt = await rts(limits_backend="rlimit")
        c = await rt.run("hello", limits=Limits(mem=64 << 20, cpus=0.5))
        assert "cpu limit 0.5 not enforced" in c.note and "note cpu limit 0.5" in c.status()
        await until(lambda: b"hello from" in rt.log(c.id))
        assert rt.log(c.id).startswith(b"fornax: cpu limit 0.5 not enforced")
        data_limit = [ln for ln in Path(f"/proc/{c.pid}/limits").read_text().splitlines()
                      if ln.startswith("Max data size")][0]
        assert str(64 << 20) in data_limit
        assert rt.mem_used() > 0
    rts.run(main)


# ------------------------------------------------------------ survive a daemon crash
DAEMON_A = textwrap.dedent("""
    import asyncio, json, socket, sys
    from pathlib import Path
    from fornax_sched.node.runtime import Runtime

    async def main():
        images, state, node, tmp = sys.argv[1:5]
        # a listening socket made before the runtime: no monitor may keep it open
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        rt = Runtime(Path(images), Path(state), node=node, grace=0.5)
        await rt.start()
        out = {"port": lsock.getsockname()[1]}
        for key, image, args in [("ticker", "ticker", []), ("ends", "waiter", [tmp + "/go-ends", "7"]),
                                 ("later", "waiter", [tmp + "/go-later", "5"]), ("lost", "hello", [])]:
            c = await rt.run(image, args)
            out[key] = {"id": c.id, "pid": c.pid, "monitor": c.monitor}
        print(json.dumps(out), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def _sockets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if link.startswith("socket:"):
            out.append(link)
    return out


def test_daemon_killed_and_restarted(rts: Rt, images: Path, tmp_path: Path, node: str) -> None:
    state = tmp_path / "state"
    a = subprocess.Popen([sys.executable, "-c", DAEMON_A, str(images), str(state), node, str(tmp_path)],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert a.stdout is not None
        info = json.loads(a.stdout.readline())
    finally:
        a.kill()  # SIGKILL: what a crash looks like
        a.wait()
    containers = [info[k] for k in ("ticker", "ends", "later", "lost")]
    try:
        _daemon_killed_and_restarted(rts, images, tmp_path, node, info)
    finally:  # on failure, leave nothing running (their monitors then clean up and end)
        for c in containers:
            if not gone(c["pid"]):
                os.killpg(c["pid"], signal.SIGKILL)


def _daemon_killed_and_restarted(rts: Rt, images: Path, tmp_path: Path, node: str, info: dict[str, Any]) -> None:
    state = tmp_path / "state"
    ticker, ends, later, lost = (info[k] for k in ("ticker", "ends", "later", "lost"))

    # no monitor keeps a socket of the daemon: its listening port can be bound again at once, and
    # (once each has sent its report) monitors hold no socket at all
    with socket.socket() as s:
        s.bind(("127.0.0.1", info["port"]))
    monitors: list[int] = [c["monitor"] for c in (ticker, ends, later, lost)]
    run(until(lambda: not any(_sockets(m) for m in monitors), 2, "monitors to hold no socket"))

    # while nobody watches: one container ends (its monitor writes the exit), one is lost with its monitor
    (tmp_path / "go-ends").touch()
    exit_file = state / "containers" / ends["id"] / "exit"
    run(until(exit_file.exists, 5, "the monitor to write the exit file"))
    os.kill(lost["monitor"], signal.SIGKILL)
    os.killpg(lost["pid"], signal.SIGKILL)
    run(until(lambda: gone(lost["pid"]) and gone(lost["monitor"]), 5, "the lost container to die"))

    async def main() -> None:
        b = Runtime(images, state, node=node, grace=0.5)
        rts.made.append(b)
        lines = await b.start()
        assert sorted(lines) == sorted([
            f"container {ends['id']} (waiter-{ends['id']}) ended while the node was down: failed, exit code 7",
            f"container {lost['id']} (hello-{lost['id']}) {LOST}",
        ])
        e, lo = b.get(ends["id"]), b.get(lost["id"])
        assert (e.state, e.exit_code, e.reason) == ("failed", 7, "exit code 7")
        assert b.log(e.id) == b"done\n"
        assert (lo.state, lo.reason) == ("failed", LOST)

        t = b.get(ticker["id"])
        assert (t.state, t.pid) == ("running", ticker["pid"])
        n = len(b.log(t.id))
        await until(lambda: len(b.log(t.id)) > n + 20, 3, "the adopted container's log to grow")

        changes: list[Container] = []
        b.on_change = changes.append
        assert b.get(later["id"]).state == "running"
        (tmp_path / "go-later").touch()
        la = await ended(b, later["id"])
        assert (la.state, la.exit_code, la.reason) == ("failed", 5, "exit code 5")
        assert [(c.id, c.state) for c in changes] == [(later["id"], "failed")]

        # an adopted container stops like any other, and a third daemon finds it stopped
        t = await b.stop(t.id)
        assert t.state == "stopped" and gone(t.pid)
        await b.shutdown()
        c3 = await rts()
        assert {c.id: c.state for c in c3.list()} == {
            ticker["id"]: "stopped", ends["id"]: "failed", later["id"]: "failed", lost["id"]: "failed"}
    rts.run(main)


def test_shutdown_leaves_no_process(rts: Rt, node: str) -> None:
    async def main() -> None:
        rt = await rts(grace=0.3)
        cs = [await rt.run("hello"), await rt.run("stubborn"), await rt.run("ticker"),
              await rt.run("hello", limits=Limits(mem=32 << 20))]
        forker = rt._forker.pid
        await until(lambda: b"stubborn" in rt.log(cs[1].id))
        t = time.monotonic()
        await rt.shutdown()
        assert time.monotonic() - t < 2
        assert all(c.state == "stopped" for c in rt.list())
        for c in cs:
            assert gone(c.pid) and group_members(c.pid) == []
        await until(lambda: all(gone(c.monitor) for c in cs) and gone(forker), 2, "monitors to be reaped")
        assert cgroups_of(node, rts.state) == []
    rts.run(main)


def test_shutdown_is_not_a_user_stop(rts: Rt) -> None:
    """A scheduler re-places what the node's shutdown stopped, never what a user stopped:
    the two reasons differ, and a later daemon reads the same ones."""
    async def main() -> None:
        rt = await rts(grace=0.3)
        by_user = await rt.stop((await rt.run("hello")).id)
        hello, stubborn = await rt.run("hello"), await rt.run("stubborn")
        await until(lambda: b"stubborn" in rt.log(stubborn.id), what="the trap to be set")
        starting = asyncio.ensure_future(rt.run("ticker"))  # still starting when shutdown begins
        await asyncio.sleep(0)
        shut = asyncio.ensure_future(rt.shutdown())
        await asyncio.sleep(0)
        with pytest.raises(ContainerError, match="^the node is shutting down$"):
            await rt.run("hello")  # nothing may start that the shutdown would not stop
        ticker = await starting
        await shut
        reasons = {c.id: (c.state, c.reason) for c in rt.list()}
        assert reasons == {
            by_user.id: ("stopped", STOPPED),
            hello.id: ("stopped", SHUTDOWN),
            stubborn.id: ("stopped", f"{SHUTDOWN} (killed after 0.3s grace)"),
            ticker.id: ("stopped", SHUTDOWN),
        }
        assert gone(ticker.pid) and gone(stubborn.pid)
        rt2 = await rts()
        assert {c.id: (c.state, c.reason) for c in rt2.list()} == reasons
    rts.run(main)


def test_labels_and_env(rts: Rt) -> None:
    """Labels are kept with the container (across adoption), shown in status; env reaches the
    process after the node's FORNAX_* and wins over the daemon's; its values are not kept."""
    async def main() -> None:
        rt = await rts()
        labels = {"owner": "fornax-sched", "fornax.rev": "7"}
        env = {"GREETING": "hello world", "EMPTY": "", "HOME": "/nowhere", "MULTI": "one\ntwo"}
        c = await rt.run("hello", labels=labels, env=env, name="labelled")
        environ = Path(f"/proc/{c.pid}/environ").read_bytes().split(b"\0")
        for k, v in env.items():
            assert environ.count(f"{k}={v}".encode()) == 1
        assert sum(1 for e in environ if e.startswith(b"HOME=")) == 1  # the daemon's HOME is replaced
        last_fornax = max(i for i, e in enumerate(environ) if e.startswith(b"FORNAX_"))
        assert min(environ.index(f"{k}={v}".encode()) for k, v in env.items()) > last_fornax
        assert f"FORNAX_CONTAINER={c.id}".encode() in environ
        lines = c.status().splitlines()
        assert lines[-3:] == ["env EMPTY,GREETING,HOME,MULTI", "label.fornax.rev 7", "label.owner fornax-sched"]
        assert lines[lines.index("backend " + rt.backend) + 1] == "env EMPTY,GREETING,HOME,MULTI"
        record = (rts.state / "containers" / c.id / "container.json").read_bytes()
        assert b"hello world" not in record and b"/nowhere" not in record
        plain = await rt.run("hello")
        assert not any(k.startswith(("env", "label.")) for k in plain.status().split())

        await rt.detach()  # the daemon goes away; the next one adopts
        rt2 = await rts()
        a = rt2.get(c.id)
        assert (a.state, a.pid, a.labels, a.status()) == ("running", c.pid, labels, c.status())
        await rt2.stop(a.id)
        await rt2.shutdown()
        rt3 = await rts()
        assert rt3.get(c.id).labels == labels and rt3.get(c.id).status().endswith("label.owner fornax-sched\n")
    rts.run(main)


def test_start_overhead(rts: Rt, capsys: pytest.CaptureFixture[str]) -> None:
    """p50 of run() (returns with a pid) against asyncio.create_subprocess_exec of the same command."""
    async def main() -> tuple[float, float]:
        rt = await rts()
        ours, bare = [], []
        for _ in range(50):
            t = time.perf_counter()
            c = await rt.run("idle")
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            p = await asyncio.create_subprocess_exec("sleep", "60", start_new_session=True)
            bare.append(time.perf_counter() - t)
            p.kill()
            await p.wait()
            await rt.kill(c.id)
        return statistics.median(ours), statistics.median(bare)

    ours, bare = rts.run(main)
    with capsys.disabled():
        print(f"\nstart p50: run() {ours * 1e3:.2f} ms, create_subprocess_exec {bare * 1e3:.2f} ms, "
              f"overhead {(ours - bare) * 1e3:.2f} ms")
