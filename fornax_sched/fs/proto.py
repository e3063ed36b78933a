"""Constants of the 9P2000 protocol family: dialects, modes, qid types, limits.

Kept apart from the codec so that the server, the client and the synthetic
tree can share them without importing each other.
"""

from __future__ import annotations

import errno

TYPE_CHECKING = False  # (not typing's: importing typing is a tenth of a shell command's start-up)
if TYPE_CHECKING:
    from typing import Final

VERSION_9P: Final = "9P2000"
VERSION_9PU: Final = "9P2000.u"
VERSION_9PL: Final = "9P2000.L"
DIALECTS: Final = (VERSION_9P, VERSION_9PU, VERSION_9PL)

NOTAG: Final = 0xFFFF
NOFID: Final = 0xFFFFFFFF
NONUNAME: Final = 0xFFFFFFFF
HEADER_SIZE: Final = 7  # size[4] type[1] tag[2]
IOHDRSZ: Final = 24  # room Twrite/Rread headers take out of msize
DEFAULT_MSIZE: Final = 131072
MIN_MSIZE: Final = 256
MAXWELEM: Final = 16

# Qid types (high byte of the stat mode).
QTDIR: Final = 0x80
QTAPPEND: Final = 0x40
QTEXCL: Final = 0x20
QTAUTH: Final = 0x08
QTTMP: Final = 0x04
QTFILE: Final = 0x00

# Permission / mode bits of stat.
DMDIR: Final = 0x80000000
DMAPPEND: Final = 0x40000000
DMEXCL: Final = 0x20000000
DMAUTH: Final = 0x08000000
DMTMP: Final = 0x04000000
# 9P2000.u special files, which synthetic trees do not make.
DMSYMLINK: Final = 0x02000000
DMLINK: Final = 0x01000000
DMDEVICE: Final = 0x00800000
DMNAMEDPIPE: Final = 0x00200000
DMSOCKET: Final = 0x00100000
DMSPECIAL: Final = DMAUTH | DMSYMLINK | DMLINK | DMDEVICE | DMNAMEDPIPE | DMSOCKET
PERM_MASK: Final = 0o777

# Plan 9 open modes.
OREAD: Final = 0
OWRITE: Final = 1
ORDWR: Final = 2
OEXEC: Final = 3
OTRUNC: Final = 0x10
ORCLOSE: Final = 0x40

# Linux open flags as they travel in Tlopen / Tlcreate.
L_O_ACCMODE: Final = 0o3
L_O_CREAT: Final = 0o100
L_O_EXCL: Final = 0o200
L_O_TRUNC: Final = 0o1000
L_O_APPEND: Final = 0o2000
L_O_DIRECTORY: Final = 0o200000

# Linux file type bits used by getattr / setattr.
S_IFDIR: Final = 0o040000
S_IFREG: Final = 0o100000

# Tgetattr / Rgetattr valid mask.
GETATTR_BASIC: Final = 0x000007FF
# Tsetattr valid mask.
SETATTR_MODE: Final = 0x001
SETATTR_UID: Final = 0x002
SETATTR_GID: Final = 0x004
SETATTR_SIZE: Final = 0x008
SETATTR_ATIME: Final = 0x010
SETATTR_MTIME: Final = 0x020
SETATTR_CTIME: Final = 0x040
SETATTR_ATIME_SET: Final = 0x080
SETATTR_MTIME_SET: Final = 0x100

# Tunlinkat flag that asks to remove a directory.
AT_REMOVEDIR: Final = 0x200

# Directory entry types in Rreaddir (Linux DT_*).
DT_DIR: Final = 4
DT_REG: Final = 8

# "don't touch" values in Twstat.
NOCHANGE_16: Final = 0xFFFF
NOCHANGE_32: Final = 0xFFFFFFFF
NOCHANGE_64: Final = 0xFFFFFFFFFFFFFFFF

STATFS_MAGIC_V9FS: Final = 0x01021997

# Errors as Plan 9 names them, chosen from the strings the Linux client maps
# to an errno (net/9p/error.c) so a legacy mount shows the right message.
ENOENT_MSG: Final = "file does not exist"
EPERM_MSG: Final = "Operation not permitted"
EIO_MSG: Final = "i/o error"
EACCES_MSG: Final = "permission denied"
EEXIST_MSG: Final = "file already exists"
ENOTDIR_MSG: Final = "not a directory"
EISDIR_MSG: Final = "Is a directory"
EBADF_MSG: Final = "fid unknown or out of range"
EINVAL_MSG: Final = "Invalid argument"
ENOTEMPTY_MSG: Final = "directory is not empty"
EOPNOTSUPP_MSG: Final = "Operation not supported"

ERRNO_OF_MESSAGE: Final = {
    ENOENT_MSG: errno.ENOENT,
    EACCES_MSG: errno.EACCES,
    EEXIST_MSG: errno.EEXIST,
    ENOTDIR_MSG: errno.ENOTDIR,
    EISDIR_MSG: errno.EISDIR,
    EBADF_MSG: errno.EBADF,
    EINVAL_MSG: errno.EINVAL,
    ENOTEMPTY_MSG: errno.ENOTEMPTY,
    EOPNOTSUPP_MSG: errno.EOPNOTSUPP,
    EPERM_MSG: errno.EPERM,
    EIO_MSG: errno.EIO,
}
