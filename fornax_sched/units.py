"""Sizes as people write them: 512K, 64M, 1G (powers of 1024)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# The largest size taken: exact as a double (JSON numbers in the web page, Lua's floats) and far
# from overflowing Lua's 64-bit integers when summed over a node's containers (a policy is given
# sizes as Lua numbers: 2^70 bytes stopped every Lua decision).  8192T: no machine has that much.
MAX_SIZE = 1 << 53
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


class SizeError(ValueError):
    """A size that cannot be read; the message says what was wrong (``reason``: without the size)."""

    def __init__(self, what: str, text: object, reason: str) -> None:
        super().__init__(f"bad {what} {text!r}: {reason}")
        self.reason = reason


def parse_size(text: str, what: str = "size", allow_zero: bool = False) -> int:
    """Bytes in "100", "512K", "64M", "1G", "1.5G" (a trailing B or iB is allowed).

    Zero is refused unless ``allow_zero``: a limit of nothing is a mistake,
    while a reading such as a full node's ``mem_free 0`` is not; more than
    MAX_SIZE is refused too.  A whole number is read exactly, however long; one with
    a fraction in floating point, as the Lua sandbox's ``size`` reads it.
    """
    m = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise SizeError(what, text, "want bytes or a size such as 512K, 64M or 1G")
    digits, unit = m.group(1), _UNITS[m.group(2).lower()]
    n = int(float(digits) * unit) if "." in digits else int(digits) * unit
    if n < 0 or (n == 0 and not allow_zero):
        raise SizeError(what, text, "must be above zero")
    if n > MAX_SIZE:
        raise SizeError(what, text, f"must be at most {format_size(MAX_SIZE)}")
    return n


def format_size(n: int) -> str:
    """The shortest exact form: 268435456 -> "256M", 1000 -> "1000"."""
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def human_size(n: int) -> str:
    """A size for a person's eyes, two digits or one and a tenth: 25275990016 -> "24G", 1610612736 -> "1.5G"."""
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult:
            v = n / mult
            return f"{v:.1f}{unit}" if v < 10 and n % mult else f"{round(v)}{unit}"
    return str(n)
