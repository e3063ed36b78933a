"""``fornax-sched policy check|simulate|platform``: a policy tried before it is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


def policy(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fornax_sched", "policy", *args], capture_output=True, text=True,
                          input=stdin, timeout=60)


def test_check_passes_each_example() -> None:
    for f in sorted(EXAMPLES.iterdir()):
        out = policy("check", str(f))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"{f}: ok: ") and "dry run on the sample cluster (4 nodes" in out.stdout


def test_check_names_the_line_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lua"
    bad.write_text("function decide(ctx)\n  return ctx.nodes[1].gpu.count\nend\n")
    out = policy("check", str(bad))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == f"{bad}: dry run: line 2: attempt to index a nil value (field 'gpu')\n"
    out = policy("check", "-", stdin="scheduler:\n  rules: 3\n")
    assert out.returncode == 1 and out.stderr.startswith("-: line 2: ")
    out = policy("check", str(tmp_path / "missing.lua"))
    assert out.returncode == 1 and "cannot read" in out.stderr


def test_simulate_shows_decisions() -> None:
    out = policy("simulate", str(EXAMPLES / "web-first.yaml"), "place", "db", "replicas=2", "mem=1G")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "simulate place db mem>=1G replicas=2 on the sample cluster:",
        "db-2 -> node-3: policy: node-3 (rule databases-on-ssd)",  # the sample cluster holds a db-1
        "db-3 -> node-3: policy: node-3 (rule databases-on-ssd)"]
    out = policy("simulate", "-", "place", "web", "cpu=100", stdin="pack\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].startswith("web-3 pending: no node fits cpu>=100")
    out = policy("simulate", "-", "stop", "x", stdin="pack\n")  # a usage error: status 2, as for every command
    assert out.returncode == 2 and "usage: fornax-sched policy simulate FILE place IMAGE" in out.stderr
    out = policy("simulate", "-", "place", "web", "cpu=abc", stdin="pack\n")
    assert (out.returncode, out.stderr) == (2, "fornax-sched policy simulate: bad cpu constraint 'cpu=abc': "
                                                "want a number of CPUs such as 0.5 or 2\n")
    out = policy("simulate", "-", "place", "web", stdin="frobnicate\n")  # a bad policy: refused, status 1
    assert out.returncode == 1 and out.stderr.startswith("-: "), out.stderr


def test_platform_is_readable() -> None:
    out = policy("platform")
    assert out.returncode == 0 and "function decide(ctx)" in out.stdout
    path = policy("platform", "--path").stdout.strip()
    assert Path(path).read_text() == out.stdout


def test_simulate_under_a_stalling_policy_keeps_to_the_budget(tmp_path: Path) -> None:
    """Its decisions share one command's budget (1 s): the platform policy decides the rest."""
    stall = tmp_path / "stall.lua"
    stall.write_text("function decide(ctx)\n  if ctx.request.image == 'stall' then while true do end end\nend\n")
    out = policy("simulate", str(stall), "place", "stall", "replicas=60")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 62 and lines[-1].startswith("policy budget of 1s spent after ")
    assert lines[-1].endswith(" of 60 decisions; the platform policy decided the rest")
    assert lines[-2].endswith(" containers, fewest; the command's policy budget of 1s was spent)")
