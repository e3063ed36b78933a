"""The Linux kernel's v9fs client driving a real fornax-node through /cluster.

One node daemon, one boot: the guest mounts the node with 9p2000.L (the
Linux default) and with 9p2000, and does what a user would from a shell:
list the nodes and the images, run a container with a label and env by
writing ctl, read its status, the node's listing and its log, stop it, and
get an error for a bad command.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import need_binary
from ..node.cluster import NodeProc, free_port, read, status
from .qemu import GuestRun, default_cache_dir, run_guest

pytestmark = pytest.mark.vm

SCRIPT = r"""
set -u
mkdir -p /mnt/L /mnt/p9
mount -t 9p -o trans=tcp,port=564,version=9p2000.L,aname=/ 10.0.2.100 /mnt/L || exit 10
mount -t 9p -o trans=tcp,port=565,version=9p2000,uname=root,aname=/ 10.0.2.100 /mnt/p9 || exit 11
for M in L p9; do
  C=/mnt/$M/cluster
  echo "@@ $M name $(cat $C/self/name)"
  # A computed file stats as 0 bytes (its content is not rendered for a stat)
  # and still reads whole, with cat and through sendfile-free dd alike.
  echo "@@ $M size $(stat -c %s $C/self/resources) $(ls -l $C/self/resources | tr -s ' ' | cut -d' ' -f5)"
  echo "@@ $M bytes $(cat $C/self/resources | wc -c) $(dd if=$C/self/resources bs=7 2>/dev/null | wc -c)"
  echo "@@ $M nodes $(ls $C/nodes | wc -l)"
  echo "@@ $M images $(cat $C/self/images | tr '\n' ' ')"
  echo run hello name=from-$M label=mount=$M env=SECRET=xyz > $C/ctl; echo "@@ $M run-rc $?"
  ID=$(ls $C/containers | sort -n | tail -1)
  echo "@@ $M id $ID"
  echo "@@ $M state $(grep '^state ' $C/containers/$ID/status | cut -d' ' -f2)"
  echo "@@ $M cname $(grep '^name ' $C/containers/$ID/status | cut -d' ' -f2)"
  echo "@@ $M label $(grep '^label.mount ' $C/containers/$ID/status | cut -d' ' -f2)"
  echo "@@ $M envkeys $(grep '^env ' $C/containers/$ID/status | cut -d' ' -f2)"
  echo "@@ $M listed $(grep -c '^id ' $C/self/containers) $(grep -c '^label.mount ' $C/self/containers)"
  sleep 0.5
  echo "@@ $M log $(head -1 $C/containers/$ID/log)"
  echo stop > $C/containers/$ID/ctl; echo "@@ $M stop-rc $?"
  echo "@@ $M stopped $(grep '^state ' $C/containers/$ID/status | cut -d' ' -f2)"
  ERR=$(echo dance 2>&1 >$C/ctl); echo "@@ $M bad-rc $?"
  echo "@@ $M bad-msg $ERR"
  ERR=$(echo run nosuchimage 2>&1 >$C/ctl); echo "@@ $M noimage-rc $?"
  ERR=$(echo run hello env=FORNAX_NODE=x 2>&1 >$C/ctl); echo "@@ $M fornaxenv-rc $?"
done
exit 0
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProc, GuestRun, dict[str, str]]]:
    need_binary("qemu-system-x86_64")
    tmp: Path = tmp_path_factory.mktemp("node")
    node = NodeProc("fornax-vm", free_port(), free_port(socket.SOCK_DGRAM), tmp / "state").start()
    try:
        run = run_guest(SCRIPT, [("10.0.2.100", 564, node.port), ("10.0.2.100", 565, node.port)],
                        cache_dir=default_cache_dir(), timeout=120)
        seen = {}
        for line in run.output.splitlines():
            if line.startswith("@@ "):
                _, mount, key, *rest = line.split(" ", 3) + [""]
                seen[f"{mount}.{key}"] = " ".join(rest).strip()
        yield node, run, seen
    finally:
        node.stop()


@pytest.mark.parametrize("mount", ["L", "p9"])
def test_shell_drives_the_node(guest: tuple[NodeProc, GuestRun, dict[str, str]], mount: str) -> None:
    node, run, seen = guest
    assert run.returncode == 0, run.output[-3000:]
    got = {k.split(".", 1)[1]: v for k, v in seen.items() if k.startswith(mount + ".")}
    assert got["name"] == "fornax-vm"
    assert got["nodes"] == "1"
    assert got["size"] == "0 0"
    whole = len(asyncio.run(read(node.addr, "cluster/self/resources")).encode())
    # mem_free may move between reads by a digit or so; the length said 0 and the reads got it all.
    assert all(abs(int(n) - whole) < 8 for n in got["bytes"].split()), (got["bytes"], whole)
    assert got["run-rc"] == "0"
    assert got["images"] == "hello web"
    assert got["state"] == "running" and got["cname"] == f"from-{mount}"
    assert got["label"] == mount and got["envkeys"] == "SECRET"
    n = "1" if mount == "L" else "2"  # (L runs first; each run adds one container with a label)
    assert got["listed"] == f"{n} {n}"
    assert got["log"] == f"hello from fornax container {got['id']}"
    assert got["stop-rc"] == "0" and got["stopped"] == "stopped"
    assert got["bad-rc"] != "0" and got["noimage-rc"] != "0" and got["fornaxenv-rc"] != "0"
    if mount == "L":  # 9P2000.L carries an errno: EINVAL
        assert "Invalid argument" in got["bad-msg"]
    st = status(asyncio.run(read(node.addr, f"cluster/containers/{got['id']}/status")))
    assert st["state"] == "stopped" and st["name"] == f"from-{mount}" and st["label.mount"] == mount
