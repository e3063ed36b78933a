"""What every foreground daemon of the project waits for."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable


async def until_stopped(ready: Callable[[], None] | None = None) -> None:
    """Return at the first SIGINT or SIGTERM (the daemon then shuts down cleanly).

    ``ready`` (printing the "serving" line, say) runs once the signals are
    caught: whoever reads that line and sends SIGTERM gets a clean stop.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
