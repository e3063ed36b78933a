"""The scheduler's log in memory: bounded in lines and in line length, read at byte offsets.

The log file serves reads straight from here, so a reader holds no copy
of it: a thousand readers cost nothing more than one.  Offsets are
absolute: they count every byte since the scheduler started, so the end
only grows and a follower (``tail -f``) finds its place again; lines
dropped from the front are skipped.
"""

from __future__ import annotations

import bisect
import time

LINE_MAX = 500  # characters of one line (a refused command is quoted in part)


_CONTROL = {c: "?" for c in range(32) if c != 9}
_CONTROL[127] = "?"


def capped(line: str, limit: int = LINE_MAX) -> str:
    """One line, at most ``limit`` characters: control characters replaced, the end cut with '...'."""
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return line if line.isprintable() else line.translate(_CONTROL)


class LogBook:
    def __init__(self, keep: int = 10_000) -> None:
        self.keep = keep
        self._lines: list[bytes] = []
        self._offsets: list[int] = []  # absolute offset of each line's first byte
        self._end = 0  # absolute offset just past the last line
        self.changed = int(time.time())  # when the last line came (the log file's mtime)

    def add(self, text: str) -> None:
        data = (capped(text, LINE_MAX + 40) + "\n").encode()
        self._lines.append(data)
        self._offsets.append(self._end)
        self._end += len(data)
        self.changed = int(time.time())
        if len(self._lines) > 2 * self.keep:  # drop in bulk: cheap, and at most 2x keep held
            cut = len(self._lines) - self.keep
            del self._lines[:cut]
            del self._offsets[:cut]

    @property
    def start(self) -> int:
        """The absolute offset of the first line kept (the zero of a reader that opens now)."""
        if len(self._lines) > self.keep:
            return self._offsets[len(self._lines) - self.keep]
        return self._offsets[0] if self._offsets else self._end

    @property
    def end(self) -> int:
        return self._end

    def read(self, offset: int, count: int) -> bytes:
        """Up to ``count`` bytes from absolute ``offset`` (from the first kept line if that is gone)."""
        offset = max(offset, self.start)
        if offset >= self._end or count <= 0:
            return b""
        i = bisect.bisect_right(self._offsets, offset) - 1
        out = bytearray(self._lines[i][offset - self._offsets[i]:])
        i += 1
        while len(out) < count and i < len(self._lines):
            out += self._lines[i]
            i += 1
        return bytes(out[:count])

    def tail(self, n: int) -> list[str]:
        kept = self._lines[-min(n, self.keep):] if n else []
        return [b.decode(errors="replace").rstrip("\n") for b in kept]

    def text(self) -> str:
        return b"".join(self._lines[-self.keep:]).decode(errors="replace")
