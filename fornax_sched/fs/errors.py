"""The one error type a file tree raises: a message plus the errno it means."""

from __future__ import annotations

import errno as _errno

from . import proto


class P9Error(Exception):
    """An error answered to the client.

    ``message`` goes out in Rerror (9P2000, 9P2000.u); ``errno`` goes out in
    9P2000.u Rerror and in 9P2000.L Rlerror, where it is all the client sees.
    """

    def __init__(self, message: str, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        return self.message


# The standard refusals carry exactly a string from the table of Linux's 9P
# client (net/9p/error.c), so that a 9P2000 mount, which gets no errno, still
# shows the right error; Plan 9 clients read the same words.


def enoent() -> P9Error:
    return P9Error(proto.ENOENT_MSG, _errno.ENOENT)


def eacces() -> P9Error:
    return P9Error(proto.EACCES_MSG, _errno.EACCES)


def einval(why: str) -> P9Error:
    return P9Error(why, _errno.EINVAL)


def eperm(message: str = proto.EPERM_MSG) -> P9Error:
    """Operation not permitted; ``message`` only when it is also a table string."""
    return P9Error(message, _errno.EPERM)


def eopnotsupp(what: str) -> P9Error:
    return P9Error(f"{what}: {proto.EOPNOTSUPP_MSG.lower()}", _errno.EOPNOTSUPP)


def ebadf(why: str = proto.EBADF_MSG) -> P9Error:
    return P9Error(why, _errno.EBADF)
