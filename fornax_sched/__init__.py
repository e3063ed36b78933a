"""fornax-sched: a Plan 9-style cluster scheduler that is a 9P file server."""

__version__ = "0.1.0"  # the one place it is written (setup.cfg reads it)
