"""What every foreground daemon of the project waits for."""

from __future__ import annotations

import asyncio
import signal


async def until_stopped() -> None:
    """Return at the first SIGINT or SIGTERM (the daemon then shuts down cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
