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


def enoent(what: str = "") -> P9Error:
    return P9Error(f"{proto.ENOENT_MSG}: {what}" if what else proto.ENOENT_MSG, _errno.ENOENT)


def eacces(why: str = "") -> P9Error:
    return P9Error(f"{proto.EACCES_MSG}: {why}" if why else proto.EACCES_MSG, _errno.EACCES)


def einval(why: str) -> P9Error:
    return P9Error(why, _errno.EINVAL)


def eperm(why: str) -> P9Error:
    return P9Error(why, _errno.EPERM)


def eopnotsupp(what: str) -> P9Error:
    return P9Error(f"{what}: {proto.EOPNOTSUPP_MSG.lower()}", _errno.EOPNOTSUPP)


def ebadf(why: str = proto.EBADF_MSG) -> P9Error:
    return P9Error(why, _errno.EBADF)
