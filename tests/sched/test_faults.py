"""Regression tests for the faults the landed scheduler showed (issue "the scheduler's core,
rebuilt"), each through the interface where it was found: real processes, 9P, real nodes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..helpers import free_port
from .harness import SchedProc


def serve(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fornax_sched", "serve", "--listen",
                           f"tcp!127.0.0.1!{free_port()}", "--state", str(state), *extra],
                          capture_output=True, text=True, timeout=60)


def test_fault4_a_second_scheduler_on_the_same_state_refuses_to_start(tmp_path: Path) -> None:
    first = SchedProc(tmp_path / "state", []).start()
    try:
        assert first.proc is not None
        second = serve(tmp_path / "state")
        out = second.stdout + second.stderr
        assert second.returncode == 1, out
        assert "in use by another scheduler" in out and f"pid {first.proc.pid} " in out, out
    finally:
        assert first.stop() == 0
    # once the first is gone the state is free again
    again = SchedProc(tmp_path / "state", []).start()
    assert again.stop() == 0


def test_fault7_an_empty_store_file_is_refused_unless_fresh(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = SchedProc(state, []).start()
    assert first.stop() == 0
    (state / "sched.db").write_bytes(b"")  # `: > sched.db`
    for suffix in ("-wal", "-shm"):
        (state / f"sched.db{suffix}").unlink(missing_ok=True)
    refused = serve(state)
    out = refused.stdout + refused.stderr
    assert refused.returncode == 1 and "is empty (0 bytes)" in out and str(state / "sched.db") in out, out
    assert (state / "sched.db").read_bytes() == b""
    fresh = SchedProc(state, [], extra=["--fresh"]).start()
    assert fresh.stop() == 0
    assert [p.name for p in state.iterdir() if ".replaced-" in p.name]
