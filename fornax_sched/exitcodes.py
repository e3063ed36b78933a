"""The exit statuses every ``fornax-sched`` and ``fornax-node`` command shares (fornax-sched(1)).

A script tells "the server said no" from "there was no server" without
reading the message: retry on UNREACHABLE, report on REFUSED, fix the
command on USAGE.
"""

OK = 0
REFUSED = 1  # the server (the file, the ctl command) refused; or a daemon could not start
USAGE = 2  # a bad command line: unknown option, bad address, bad value
UNREACHABLE = 3  # no answer: cannot connect, the connection was lost, or a request timed out
IN_USE = 4  # something a daemon needs is held by another process: the address to listen on, its state
INTERRUPTED = 130  # SIGINT (Ctrl-C)
BROKEN_PIPE = 141  # whoever read our output went away (as for cat | head: 128 + SIGPIPE)
