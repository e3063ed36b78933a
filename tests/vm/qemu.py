"""Boot the real Linux v9fs client in QEMU (TCG) and run a shell script in it.

The guest is the Debian kernel plus a busybox initramfs built by ``build.sh``.
Its only network is QEMU's user netdev with ``restrict=on``: the guest cannot
reach anything except the ``guestfwd`` forwards given here, each of which
QEMU connects to a port on 127.0.0.1 when it starts. So the 9P server must
already listen on the host port, and each forward carries ONE connection,
i.e. one mount per forward per boot (use several guest addresses or ports
for several mounts).

Example::

    run = run_guest(
        "mkdir /mnt/a && mount -t 9p -o trans=tcp,port=564,version=9p2000.L,"
        "aname=/srv 10.0.2.100 /mnt/a && ls /mnt/a",
        [("10.0.2.100", 564, server_port)],
        cache_dir=Path("/tmp/fornax-vm"),
    )
    assert run.returncode == 0, run.output + "\\n".join(run.dmesg_9p)
"""

from __future__ import annotations

import gzip
import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Forward",
    "GuestError",
    "GuestRun",
    "default_cache_dir",
    "ensure_built",
    "make_cpio",
    "run_guest",
]

HERE = Path(__file__).resolve().parent
BUILD_SH = HERE / "build.sh"
GUEST_NET = ipaddress.ip_network("10.0.2.0/24")
# Addresses taken by slirp (gateway, DNS) and the guest itself.
RESERVED = {ipaddress.ip_address(a) for a in ("10.0.2.0", "10.0.2.2", "10.0.2.3", "10.0.2.15", "10.0.2.255")}

BEGIN = "@@FORNAX-VM-TEST-BEGIN@@\n"
END_RE = re.compile(r"\n@@FORNAX-VM-TEST-END rc=(\d+)@@\n")
DMESG_RE = re.compile(r"@@FORNAX-VM-DMESG-BEGIN@@\n(.*?)@@FORNAX-VM-DMESG-END@@", re.S)

Forward = tuple[str, int, int]
"""(guest_ip, guest_port, host_port): guest connections to guest_ip:guest_port
are carried to 127.0.0.1:host_port."""


class GuestError(RuntimeError):
    """The guest never got to run the script (build, QEMU start or boot failed)."""


@dataclass(frozen=True)
class GuestRun:
    """Result of one boot-run-poweroff cycle."""

    output: str
    """stdout and stderr of /test.sh, interleaved as written (partial on timeout)."""
    returncode: int | None
    """Exit status of /test.sh; None if it did not finish (timeout, guest crash)."""
    dmesg_9p: list[str] = field(default_factory=list)
    """Kernel log lines mentioning 9p/v9fs, e.g. '9pnet: ... server reported unknown error'."""
    console: str = ""
    """Whole serial console plus QEMU's own messages, for debugging."""
    duration: float = 0.0
    """Seconds from QEMU start to exit."""
    timed_out: bool = False
    """True if QEMU was killed after ``timeout`` seconds."""

    @property
    def ok(self) -> bool:
        """True if the script ran to completion with exit status 0."""
        return self.returncode == 0


def default_cache_dir() -> Path:
    """$FORNAX_VM_CACHE, else ~/.cache/fornax-sched-vm."""
    env = os.environ.get("FORNAX_VM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fornax-sched-vm"


_built: set[Path] = set()


def ensure_built(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Run build.sh once per process; return (vmlinux, base initramfs)."""
    cache = Path(cache_dir or default_cache_dir()).resolve()
    if cache not in _built:
        proc = subprocess.run(["bash", str(BUILD_SH), str(cache)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise GuestError(f"build.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        _built.add(cache)
    return cache / "vmlinux", cache / "base.cpio.gz"


def make_cpio(files: Mapping[str, bytes], mode: int = 0o755) -> bytes:
    """Return a gzip'd newc cpio archive holding ``files`` (path -> content),
    with their parent directories, all owned by root."""
    entries: dict[str, tuple[int, bytes]] = {}
    for path, data in files.items():
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), (0o040755, b""))
        entries["/".join(parts)] = (0o100000 | mode, data)

    out = bytearray()

    def add(name: str, fmode: int, data: bytes, ino: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, fmode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.extend(b"\0" * (-len(out) % 4) + data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, (fmode, data)) in enumerate(sorted(entries.items()), start=1):
        add(name, fmode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return gzip.compress(bytes(out), mtime=0)


def _netdev(forwards: Iterable[Forward]) -> str:
    opts = ["user", "id=n0", "restrict=on"]
    seen_ports: set[int] = set()
    for guest_ip, guest_port, host_port in forwards:
        addr = ipaddress.ip_address(guest_ip)
        if addr not in GUEST_NET or addr in RESERVED:
            raise ValueError(f"guest address {guest_ip} must be a free address in {GUEST_NET}")
        for port in (guest_port, host_port):
            if not 0 < int(port) < 65536:
                raise ValueError(f"bad port {port}")
        # QEMU names each forward's chardev "guestfwd.tcp.<guest_port>": two
        # forwards with the same guest port fail even on different addresses.
        if int(guest_port) in seen_ports:
            raise ValueError(f"guest port {guest_port} used twice; QEMU needs distinct guest ports")
        seen_ports.add(int(guest_port))
        opts.append(f"guestfwd=tcp:{addr}:{int(guest_port)}-tcp:127.0.0.1:{int(host_port)}")
    return ",".join(opts)


def run_guest(
    script: str,
    forwards: Iterable[Forward] = (),
    *,
    cache_dir: Path | None = None,
    timeout: float = 60.0,
    files: Mapping[str, bytes] | None = None,
) -> GuestRun:
    """Boot the guest, run ``script`` with /bin/sh as /test.sh, power off.

    ``forwards`` lists (guest_ip, guest_port, host_port); every host port must
    already be listening on 127.0.0.1. ``files`` adds extra files to the guest
    (absolute path -> bytes, made executable). Raises GuestError if the script
    never started; a script that hangs returns with ``timed_out`` set.
    """
    vmlinux, base = ensure_built(cache_dir)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise GuestError("qemu-system-x86_64 not found")
    netdev = _netdev(forwards)
    extra = make_cpio({**(files or {}), "/test.sh": script.encode()})

    with tempfile.TemporaryDirectory(prefix="fornax-vm-") as tmp:
        initrd = Path(tmp) / "initrd.gz"
        with open(initrd, "wb") as f, open(base, "rb") as b:
            shutil.copyfileobj(b, f)
            f.write(extra)  # Linux unpacks concatenated initramfs archives in order
        cmd = [
            qemu, "-accel", "tcg", "-m", "512", "-smp", "1",
            "-nographic", "-vga", "none", "-no-reboot",
            "-kernel", str(vmlinux), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile=",
        ]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timed_out = False
        try:
            raw, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            raw, _ = proc.communicate()
        duration = time.monotonic() - start

    console = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    begin = console.find(BEGIN)
    if begin < 0:
        why = "timed out" if timed_out else f"exited with {proc.returncode}"
        raise GuestError(f"guest never ran the script (QEMU {why} after {duration:.1f}s):\n{console[-4000:]}")
    body = console[begin + len(BEGIN) :]
    end = END_RE.search(body)
    dmesg = DMESG_RE.search(body)
    return GuestRun(
        output=body[: end.start()] if end else body,
        returncode=int(end.group(1)) if end else None,
        dmesg_9p=dmesg.group(1).splitlines() if dmesg else [],
        console=console,
        duration=duration,
        timed_out=timed_out,
    )
