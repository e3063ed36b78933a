"""Debian's chromium, driven by PyPI playwright (never `playwright install`: no browser can be
downloaded here), for the page's tests and the dashboard benchmark."""

from __future__ import annotations

import os
import shutil
from typing import Any

CHROMIUM = "/usr/bin/chromium"
# The flags seen working on this machine (shared/reference/dependencies-and-peers.md).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def missing() -> str:
    """Why the browser cannot run here ("" if it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "PyPI playwright is not installed (the test extra: ./dev test)"
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"{CHROMIUM} is missing (Debian's chromium: ./dev test installs it)"
    return ""


def launch(p: Any) -> Any:
    """A headless chromium from a ``sync_playwright()`` context."""
    return p.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
                             args=ARGS, headless=True)
