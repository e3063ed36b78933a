"""Programmable scheduling policies: Lua in a sandbox process, YAML rules compiled to Lua.

The service calls ``load_policy(text, cluster)`` with what was written to
the policy file and, if that returns, activates what it got; see
fornax_sched.policy.loader and the manual page policy(5).
"""

from .engine import Limits, LuaProgram, platform_path, platform_source, sample_requests
from .errors import PolicyError, SandboxError, SandboxTimeout
from .loader import Compiled, Loaded, compile_policy, detect_kind, load_policy, sample_cluster
from .yamlrules import compile_yaml

__all__ = [
    "Compiled", "Limits", "Loaded", "LuaProgram", "PolicyError", "SandboxError", "SandboxTimeout",
    "compile_policy", "compile_yaml", "detect_kind", "load_policy", "platform_path", "platform_source",
    "sample_cluster", "sample_requests",
]
