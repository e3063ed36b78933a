"""The `fornax-sched` command line as a shell user meets it, against a real scheduler process.

The scheduler runs with simulated nodes (its placements go through the
same ctl, planner and store; the nodes only run nothing), so each case
here is one real `fornax-sched` process and its exit status.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import fornax_sched
from fornax_sched import exitcodes as X

from .conftest import ROOT, spawn_serving
from .helpers import free_port, stop_process, wait_until

BIN = Path(sys.executable).parent
CTL = "/cluster/scheduler/ctl"


def fs(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fornax-sched"), *args], capture_output=True, text=True, input=stdin,
                          timeout=30, cwd=ROOT)


@pytest.fixture(scope="module")
def sched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    addr = f"tcp!127.0.0.1!{free_port()}"
    proc, _ = spawn_serving([sys.executable, "-m", "fornax_sched", "serve", "--listen", addr, "--state",
                             str(tmp_path_factory.mktemp("sched")), "--sim-nodes", "2"], "scheduler")
    try:
        yield addr
    finally:
        assert stop_process(proc) == 0


def test_the_words_after_a_double_dash_reach_the_file(sched: str) -> None:
    """`place web name=site -- 8089` is what is written: argparse used to eat the `--`."""
    r = fs("9p", "write", "-r", sched, CTL, "place", "web", "name=site", "--", "8089")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("site node=sim-000")
    placed = fs("9p", "read", sched, "/cluster/scheduler/placements/site")
    assert "args=8089\n" in placed.stdout and "image=web" in placed.stdout
    # A leading `--` ends the options and is not written; words that look like options are words.
    r = fs("9p", "write", "-r", sched, CTL, "--", "place", "web", "name=flags", "--", "-v", "--port=1")
    assert r.returncode == 0, r.stderr
    assert "args=-v --port=1\n" in fs("9p", "read", sched, "/cluster/scheduler/placements/flags").stdout
    # stdin still works, as one write
    r = fs("9p", "write", "-r", sched, CTL, stdin="place hello name=fromstdin\n")
    assert r.returncode == 0 and r.stdout.startswith("fromstdin node=")


def test_exit_statuses_and_errors_that_name_their_path(sched: str) -> None:
    missing = fs("9p", "read", sched, "/cluster/scheduler/placements/nosuch")
    assert (missing.returncode, missing.stderr) == (
        X.REFUSED, "fornax-sched 9p read: cluster/scheduler/placements/nosuch: file does not exist\n")
    top = fs("9p", "read", sched, "nosuch")  # refused at the first name of the walk: named too
    assert (top.returncode, top.stderr) == (X.REFUSED, "fornax-sched 9p read: nosuch: file does not exist\n")
    refused = fs("9p", "write", "-r", sched, CTL, "place", "nosuchimage")
    assert refused.returncode == X.REFUSED
    assert refused.stderr.startswith(f"fornax-sched 9p write: {CTL}: unknown image 'nosuchimage'")
    ro = fs("9p", "write", sched, "/cluster/nodes/sim-0001/status", "x")
    assert (ro.returncode, ro.stderr) == (
        X.REFUSED, "fornax-sched 9p write: /cluster/nodes/sim-0001/status: permission denied\n")
    port = free_port()
    down = fs("9p", "read", f"tcp!127.0.0.1!{port}", CTL)
    assert (down.returncode, down.stderr) == (
        X.UNREACHABLE, f"fornax-sched 9p read: cannot dial 9P server tcp!127.0.0.1!{port}: Connection refused\n")
    bad = fs("9p", "read", "tcp!x!y!z", CTL)
    assert (bad.returncode, bad.stderr) == (X.USAGE, "fornax-sched 9p read: bad address 'tcp!x!y!z': want "
                                                     "tcp!host!port\n")
    for argv in (["9p", "-t", "0", "read", sched, CTL], ["9p", "read", sched], ["nosuch"], []):
        r = fs(*argv)
        assert r.returncode == X.USAGE and r.stderr.startswith("usage: "), (argv, r.stderr)
    assert fs("9p", "read", sched, CTL).stdout.startswith("nodes 2 online 2")
    policy = fs("policy", "check", str(ROOT / "examples" / "policies" / "web-first.yaml"), "--scheduler",
                f"tcp!127.0.0.1!{port}")
    assert policy.returncode == X.UNREACHABLE and f"tcp!127.0.0.1!{port}" in policy.stderr, policy.stderr


def test_versions() -> None:
    for cmd, name in (("fornax-sched", "fornax-sched"), ("fornax-node", "fornax-node")):
        r = subprocess.run([str(BIN / cmd), "--version"], capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout, r.stderr) == (0, f"{name} {fornax_sched.__version__}\n", "")


def test_a_read_imports_neither_asyncio_nor_the_scheduler(sched: str) -> None:
    """What keeps `fornax-sched 9p read` quick (bench/cli_startup_bench.py measures it)."""
    probe = ("import sys\nfrom fornax_sched.cli import main\n"
             f"assert main(['9p', 'read', {sched!r}, {CTL!r}]) == 0\n"
             "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stderr.split())
    heavy = {"asyncio", "yaml", "lupa", "sqlite3", "logging", "dataclasses", "typing", "shutil", "encodings.idna",
             "fornax_sched.sched",
             "fornax_sched.policy", "fornax_sched.fs.server", "fornax_sched.fs.client"}
    assert not heavy & loaded, heavy & loaded
    assert "fornax_sched.fs.blocking" in loaded


def test_the_help_of_each_command_is_the_one_its_module_gives() -> None:
    from fornax_sched.cli import COMMANDS, build_parser

    def helps(parser: object) -> dict[str, str]:
        sub = next(a for a in parser._actions if a.dest == "command")  # type: ignore[attr-defined]
        return {c.dest: c.help for c in sub._choices_actions}

    assert helps(build_parser(["up"], full=True)) == {n: text for n, (_, text) in COMMANDS.items()}


def test_the_help_still_lists_everything() -> None:
    """Only the parsers a command line needs are built; the help still shows every command and operation."""
    top = fs("--help")
    assert top.returncode == 0 and all(f"    {name}" in top.stdout for name in ("up", "serve", "9p", "policy"))
    ops = fs("9p", "--help")
    assert ops.returncode == 0 and all(f"    {op}" in ops.stdout for op in ("read", "ls", "stat", "write", "ramfs"))
    wrong = fs("9p", "-t", "5", "nosuch")
    assert wrong.returncode == X.USAGE and "invalid choice: 'nosuch'" in wrong.stderr
    assert "WORD" in fs("9p", "-V", "9P2000", "write", "--help").stdout


def test_a_write_that_times_out_says_the_command_may_still_be_carried_out(sched: str) -> None:
    """`place ... replicas=1000` outlasts a short -t: the CLI says the write timed out, and the
    scheduler carries the command out all the same (a flushed ctl write runs to its end)."""
    r = fs("9p", "-t", "0.05", "write", "-r", sched, CTL, "place", "hello", "name=slow", "replicas=1000")
    assert r.returncode == X.UNREACHABLE, r
    assert "timed out after 0.05s" in r.stderr and "may still carry the write out" in r.stderr, r.stderr

    def placed() -> bool:
        return fs("9p", "read", sched, "/cluster/scheduler/placements/slow-1000").returncode == 0

    assert wait_until(placed, 30)
    done = fs("9p", "-t", "60", "write", "-r", sched, CTL, "remove", "slow")
    assert done.returncode == 0 and done.stdout.count("removed slow-") == 1000, done.stderr
