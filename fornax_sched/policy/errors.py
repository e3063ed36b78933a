"""The two ways a programmable policy goes wrong, kept apart because the
scheduler answers them differently: a bad policy is refused (the old one
stays), a broken sandbox is worked around (the platform policy decides)."""

from __future__ import annotations

MAX_REASON = 500  # characters of a refusal kept


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """text as one line: its first line (a traceback after it dropped), what is not printable as '?', cut to limit."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0].strip() if lines else "refused, for no reason given"
    first = "".join(ch if ch.isprintable() else "?" for ch in first)
    return first if len(first) <= limit else first[: limit - 3] + "..."


class PolicyError(ValueError):
    """A policy that cannot become active.

    The message is always one line, naming the line of the policy where
    there is one (``line 3: ...``): 9P clients show it whole.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(one_line(reason))


class SandboxError(RuntimeError):
    """The sandbox process could not answer: it did not start, died, or was killed."""


class SandboxTimeout(SandboxError):
    """No answer within the deadline; the sandbox has been killed."""
