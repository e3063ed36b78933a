"""The two ways a programmable policy goes wrong, kept apart because the
scheduler answers them differently: a bad policy is refused (the old one
stays), a broken sandbox is worked around (the built-in policy decides)."""

from __future__ import annotations


class PolicyError(ValueError):
    """A policy that cannot become active; the message names the line where it can."""


class SandboxError(RuntimeError):
    """The sandbox process could not answer: it did not start, died, or was killed."""


class SandboxTimeout(SandboxError):
    """No answer within the deadline; the sandbox has been killed."""
