"""Programmable scheduling policies: Lua in sandbox processes, YAML rules compiled to Lua.

The service makes one ``Platform`` (the platform policy's own sandbox, shared
by every policy), then for what was written to the policy file calls
``prepare_policy(text, platform=...)`` (any thread) and
``dry_run_policy(loaded, cluster)`` (the thread owning the cluster), or
``load_policy`` for both, and activates what it got; see
fornax_sched.policy.loader and the manual page policy(5).
"""

from .engine import Budget, Limits, LuaProgram, Platform, platform_path, platform_source, sample_requests
from .errors import PolicyError, SandboxError, SandboxTimeout
from .loader import (
    Compiled,
    Loaded,
    compile_policy,
    detect_kind,
    dry_run_policy,
    load_policy,
    prepare_policy,
    sample_cluster,
)
from .yamlrules import compile_yaml

__all__ = [
    "Budget", "Compiled", "Limits", "Loaded", "LuaProgram", "Platform", "PolicyError", "SandboxError",
    "SandboxTimeout", "compile_policy", "compile_yaml", "detect_kind", "dry_run_policy", "load_policy",
    "platform_path", "platform_source", "prepare_policy", "sample_cluster", "sample_requests",
]
