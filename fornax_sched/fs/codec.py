"""Sans-IO codec for 9P2000, 9P2000.u and 9P2000.L messages.

Bytes in, message objects out, and back: no sockets, no clocks.  Every
message is described once in the tables below (``name:kind`` fields); the
encoders and decoders are built from those tables when the module loads,
merging runs of fixed-width integers into one ``struct`` call so that the
hot messages (walk, open, read, write, clunk) cost one or two calls each.

Field kinds: ``1 2 4 8`` little-endian unsigned integers, ``s`` a string
(size[2] + UTF-8), ``s*`` a list of strings (count[2]), ``Q`` a qid,
``Q*`` a list of qids, ``d`` data (count[4]), ``T`` a stat (outer size[2]),
and a trailing ``?`` for a field old peers may leave out.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from collections.abc import Callable

from . import proto

TYPE_CHECKING = False  # (not typing's: importing typing is a tenth of a shell command's start-up)
if TYPE_CHECKING:
    from typing import Any, ClassVar, NamedTuple


class ProtocolError(ValueError):
    """Bytes that are not a valid 9P message of the dialect in use."""

    def __init__(self, message: str, tag: int | None = None) -> None:
        super().__init__(message)
        self.tag = tag


if TYPE_CHECKING:
    class Qid(NamedTuple):
        type: int
        version: int
        path: int
else:
    Qid = namedtuple("Qid", "type version path")


_NO_QID = Qid(0, 0, 0)


class Stat:
    """A directory entry as 9P2000 and 9P2000.u carry it.

    A plain class rather than a dataclass: importing dataclasses costs a
    shell command (fornax-sched 9p) a tenth of its start-up.
    """

    __slots__ = ("type", "dev", "qid", "mode", "atime", "mtime", "length", "name", "uid", "gid", "muid",
                 "extension", "n_uid", "n_gid", "n_muid")

    def __init__(self, type: int = 0, dev: int = 0, qid: Qid = _NO_QID, mode: int = 0,
                 atime: int = 0, mtime: int = 0, length: int = 0, name: str = "", uid: str = "", gid: str = "",
                 muid: str = "", extension: str = "", n_uid: int = proto.NONUNAME, n_gid: int = proto.NONUNAME,
                 n_muid: int = proto.NONUNAME) -> None:
        self.type, self.dev, self.qid, self.mode = type, dev, qid, mode
        self.atime, self.mtime, self.length = atime, mtime, length
        self.name, self.uid, self.gid, self.muid, self.extension = name, uid, gid, muid, extension
        self.n_uid, self.n_gid, self.n_muid = n_uid, n_gid, n_muid

    def __eq__(self, other: object) -> bool:
        if type(other) is not Stat:
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Stat(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__) + ")"


class Message:
    """Base of all message classes; ``TYPE`` is the wire type number."""

    __slots__ = ("tag",)
    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple[str, ...]]
    tag: int

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in ("tag",) + self.FIELDS)

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in ("tag",) + self.FIELDS)
        return f"{type(self).__name__}({inner})"

    __hash__ = None  # type: ignore[assignment]

    if TYPE_CHECKING:  # fields are made from the tables below; let checkers see them

        def __init__(self, tag: int = 0, *args: Any, **kwargs: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...


# name, type number, fields as 9P2000 has them, fields 9P2000.u/.L add.
_BASE: list[tuple[str, int, str, str]] = [
    ("Tversion", 100, "msize:4 version:s", ""),
    ("Rversion", 101, "msize:4 version:s", ""),
    ("Tauth", 102, "afid:4 uname:s aname:s", "n_uname:4"),
    ("Rauth", 103, "aqid:Q", ""),
    ("Tattach", 104, "fid:4 afid:4 uname:s aname:s", "n_uname:4"),
    ("Rattach", 105, "qid:Q", ""),
    ("Rerror", 107, "ename:s", "errno:4"),
    ("Tflush", 108, "oldtag:2", ""),
    ("Rflush", 109, "", ""),
    ("Twalk", 110, "fid:4 newfid:4 wnames:s*", ""),
    ("Rwalk", 111, "qids:Q*", ""),
    ("Topen", 112, "fid:4 mode:1", ""),
    ("Ropen", 113, "qid:Q iounit:4", ""),
    ("Tcreate", 114, "fid:4 name:s perm:4 mode:1", "extension:s"),
    ("Rcreate", 115, "qid:Q iounit:4", ""),
    ("Tread", 116, "fid:4 offset:8 count:4", ""),
    ("Rread", 117, "data:d", ""),
    ("Twrite", 118, "fid:4 offset:8 data:d", ""),
    ("Rwrite", 119, "count:4", ""),
    ("Tclunk", 120, "fid:4", ""),
    ("Rclunk", 121, "", ""),
    ("Tremove", 122, "fid:4", ""),
    ("Rremove", 123, "", ""),
    ("Tstat", 124, "fid:4", ""),
    ("Rstat", 125, "stat:T", ""),
    ("Twstat", 126, "fid:4 stat:T", ""),
    ("Rwstat", 127, "", ""),
]

_LINUX: list[tuple[str, int, str]] = [
    ("Rlerror", 7, "ecode:4"),
    ("Tstatfs", 8, "fid:4"),
    ("Rstatfs", 9, "type:4 bsize:4 blocks:8 bfree:8 bavail:8 files:8 ffree:8 fsid:8 namelen:4"),
    ("Tlopen", 12, "fid:4 flags:4"),
    ("Rlopen", 13, "qid:Q iounit:4"),
    ("Tlcreate", 14, "fid:4 name:s flags:4 mode:4 gid:4"),
    ("Rlcreate", 15, "qid:Q iounit:4"),
    ("Tsymlink", 16, "fid:4 name:s symtgt:s gid:4"),
    ("Rsymlink", 17, "qid:Q"),
    ("Tmknod", 18, "dfid:4 name:s mode:4 major:4 minor:4 gid:4"),
    ("Rmknod", 19, "qid:Q"),
    ("Trename", 20, "fid:4 dfid:4 name:s"),
    ("Rrename", 21, ""),
    ("Treadlink", 22, "fid:4"),
    ("Rreadlink", 23, "target:s"),
    ("Tgetattr", 24, "fid:4 request_mask:8"),
    (
        "Rgetattr",
        25,
        "valid:8 qid:Q mode:4 uid:4 gid:4 nlink:8 rdev:8 size:8 blksize:8 blocks:8"
        " atime_sec:8 atime_nsec:8 mtime_sec:8 mtime_nsec:8 ctime_sec:8 ctime_nsec:8"
        " btime_sec:8 btime_nsec:8 gen:8 data_version:8",
    ),
    (
        "Tsetattr",
        26,
        "fid:4 valid:4 mode:4 uid:4 gid:4 size:8 atime_sec:8 atime_nsec:8 mtime_sec:8 mtime_nsec:8",
    ),
    ("Rsetattr", 27, ""),
    ("Txattrwalk", 30, "fid:4 newfid:4 name:s"),
    ("Rxattrwalk", 31, "size:8"),
    ("Txattrcreate", 32, "fid:4 name:s attr_size:8 flags:4"),
    ("Rxattrcreate", 33, ""),
    ("Treaddir", 40, "fid:4 offset:8 count:4"),
    ("Rreaddir", 41, "data:d"),
    ("Tfsync", 50, "fid:4 datasync:4?"),
    ("Rfsync", 51, ""),
    ("Tlock", 52, "fid:4 type:1 flags:4 start:8 length:8 proc_id:4 client_id:s"),
    ("Rlock", 53, "status:1"),
    ("Tgetlock", 54, "fid:4 type:1 start:8 length:8 proc_id:4 client_id:s"),
    ("Rgetlock", 55, "type:1 start:8 length:8 proc_id:4 client_id:s"),
    ("Tlink", 70, "dfid:4 fid:4 name:s"),
    ("Rlink", 71, ""),
    ("Tmkdir", 72, "dfid:4 name:s mode:4 gid:4"),
    ("Rmkdir", 73, "qid:Q"),
    ("Trenameat", 74, "olddirfid:4 oldname:s newdirfid:4 newname:s"),
    ("Rrenameat", 75, ""),
    ("Tunlinkat", 76, "dirfid:4 name:s flags:4"),
    ("Runlinkat", 77, ""),
]

_DEFAULTS: dict[str, Any] = {
    "n_uname": proto.NONUNAME,
    "errno": 0,
    "extension": "",
    "datasync": 0,
}
_KIND_DEFAULTS: dict[str, Any] = {"s": "", "s*": (), "Q": Qid(0, 0, 0), "Q*": (), "d": b"", "T": None}


def _parse(spec: str) -> list[tuple[str, str]]:
    return [tuple(tok.split(":", 1)) for tok in spec.split()]  # type: ignore[misc]


def _make_class(name: str, number: int, fields: list[tuple[str, str]]) -> type[Message]:
    names = tuple(f for f, _ in fields)

    def __init__(self: Any, tag: int = 0, *args: Any, **kwargs: Any) -> None:
        self.tag = tag
        for i, (field, kind) in enumerate(fields):
            if i < len(args):
                value = args[i]
            elif field in kwargs:
                value = kwargs.pop(field)
            elif field in _DEFAULTS:
                value = _DEFAULTS[field]
            else:
                value = _KIND_DEFAULTS.get(kind.rstrip("?"), 0)
                if kind == "T":
                    value = Stat()
            setattr(self, field, value)
        if kwargs:
            raise TypeError(f"{name}: unknown fields {sorted(kwargs)}")

    ns = {"__slots__": names, "__init__": __init__, "TYPE": number, "FIELDS": names}
    return type(name, (Message,), ns)


MESSAGES: dict[str, type[Message]] = {}
for _name, _num, _spec, _ext in _BASE:
    MESSAGES[_name] = _make_class(_name, _num, _parse(_spec) + _parse(_ext))
for _name, _num, _spec in _LINUX:
    MESSAGES[_name] = _make_class(_name, _num, _parse(_spec))
globals().update(MESSAGES)


def __getattr__(name: str) -> Any:
    # Lets type checkers accept codec.Twalk and friends, made above at import.
    raise AttributeError(name)


# ---------------------------------------------------------------- encoding steps

_INT = {"1": "B", "2": "H", "4": "I", "8": "Q"}
_H = struct.Struct("<H")
_I = struct.Struct("<I")
_HDR = struct.Struct("<IBH")
_QID = struct.Struct("<BIQ")
_STAT_FIXED = struct.Struct("<HHI")  # size, type, dev (qid follows)
_STAT_MID = struct.Struct("<IIIQ")  # mode, atime, mtime, length
_STAT_NUMS = struct.Struct("<III")

if TYPE_CHECKING:
    Reader = Callable[[bytes, int], tuple[tuple[Any, ...], int]]
    Writer = Callable[[Message, list[bytes]], None]


def _read_str(b: bytes, o: int) -> tuple[str, int]:
    if o + 2 > len(b):
        raise ProtocolError("message too short for string length")
    (n,) = _H.unpack_from(b, o)
    o += 2
    end = o + n
    if end > len(b):
        raise ProtocolError("string runs past end of message")
    try:
        return b[o:end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise ProtocolError("string is not UTF-8") from None


def _enc_str(s: str) -> bytes:
    data = s.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ProtocolError("string longer than 65535 bytes")
    return _H.pack(len(data)) + data


def _read_qid(b: bytes, o: int) -> tuple[Qid, int]:
    if o + 13 > len(b):
        raise ProtocolError("message too short for qid")
    return Qid._make(_QID.unpack_from(b, o)), o + 13


def _enc_qid(q: Qid) -> bytes:
    return _QID.pack(q[0], q[1], q[2])


def decode_stat(b: bytes, o: int, dotu: bool) -> tuple[Stat, int]:
    """Decode one stat entry (with its own size[2]) at offset ``o``."""
    if o + 2 > len(b):
        raise ProtocolError("message too short for stat")
    (size,) = _H.unpack_from(b, o)
    end = o + 2 + size
    if end > len(b):
        raise ProtocolError("stat runs past end of message")
    sub = b[:end]
    try:
        _, typ, dev = _STAT_FIXED.unpack_from(sub, o)
        qid, p = _read_qid(sub, o + 8)
        mode, atime, mtime, length = _STAT_MID.unpack_from(sub, p)
    except struct.error:
        raise ProtocolError("stat too short") from None
    p += _STAT_MID.size
    name, p = _read_str(sub, p)
    uid, p = _read_str(sub, p)
    gid, p = _read_str(sub, p)
    muid, p = _read_str(sub, p)
    st = Stat(typ, dev, qid, mode, atime, mtime, length, name, uid, gid, muid)
    if dotu:
        st.extension, p = _read_str(sub, p)
        if p + 12 > end:
            raise ProtocolError("stat too short for 9P2000.u ids")
        st.n_uid, st.n_gid, st.n_muid = _STAT_NUMS.unpack_from(sub, p)
        p += 12
    if p != end:
        raise ProtocolError("stat size does not match its contents")
    return st, end


def encode_stat(st: Stat, dotu: bool) -> bytes:
    """Encode one stat entry, size[2] included."""
    q = st.qid
    body = [
        _H.pack(st.type) + _I.pack(st.dev) + _QID.pack(q[0], q[1], q[2]),
        _STAT_MID.pack(st.mode, st.atime, st.mtime, st.length),
        _enc_str(st.name),
        _enc_str(st.uid),
        _enc_str(st.gid),
        _enc_str(st.muid),
    ]
    if dotu:
        body.append(_enc_str(st.extension))
        body.append(_STAT_NUMS.pack(st.n_uid, st.n_gid, st.n_muid))
    data = b"".join(body)
    return _H.pack(len(data)) + data


def _compile(fields: list[tuple[str, str]], dotu: bool) -> tuple[list[Reader], list[Writer]]:
    """Turn a field list into reader and writer steps, merging integer runs."""
    readers: list[Reader] = []
    writers: list[Writer] = []
    i = 0
    while i < len(fields):
        name, kind = fields[i]
        if kind in _INT:
            run = []
            while i < len(fields) and fields[i][1] in _INT:
                run.append(fields[i])
                i += 1
            readers.append(_int_reader(run))
            writers.append(_int_writer(run))
            continue
        readers.append(_var_reader(kind, dotu))
        writers.append(_var_writer(name, kind, dotu))
        i += 1
    return readers, writers


def _int_reader(run: list[tuple[str, str]]) -> Reader:
    st = struct.Struct("<" + "".join(_INT[k] for _, k in run))
    size = st.size
    unpack = st.unpack_from

    def read(b: bytes, o: int) -> tuple[tuple[Any, ...], int]:
        if o + size > len(b):
            raise ProtocolError("message too short")
        return unpack(b, o), o + size

    return read


def _int_writer(run: list[tuple[str, str]]) -> Writer:
    st = struct.Struct("<" + "".join(_INT[k] for _, k in run))
    names = [n for n, _ in run]
    pack = st.pack
    if len(names) == 1:
        only = names[0]

        def write1(m: Message, out: list[bytes]) -> None:
            out.append(pack(getattr(m, only)))

        return write1

    def write(m: Message, out: list[bytes]) -> None:
        out.append(pack(*[getattr(m, n) for n in names]))

    return write


def _list_reader(item: Callable[[bytes, int], tuple[Any, int]]) -> Reader:
    """count[2] then that many items."""

    def read(b: bytes, o: int) -> tuple[tuple[Any, ...], int]:
        if o + 2 > len(b):
            raise ProtocolError("message too short")
        (n,) = _H.unpack_from(b, o)
        o += 2
        out = []
        for _ in range(n):
            x, o = item(b, o)
            out.append(x)
        return (tuple(out),), o

    return read


def _list_writer(name: str, enc: Callable[[Any], bytes]) -> Writer:
    def write(m: Message, out: list[bytes]) -> None:
        items = getattr(m, name)
        out.append(_H.pack(len(items)))
        out.extend(enc(x) for x in items)

    return write


def _var_reader(kind: str, dotu: bool) -> Reader:
    if kind == "s":
        def read_s(b: bytes, o: int) -> tuple[tuple[Any, ...], int]:
            s, o = _read_str(b, o)
            return (s,), o
        return read_s
    if kind.endswith("?"):
        inner = _int_reader([("x", kind[:-1])])

        def read_opt(b: bytes, o: int) -> tuple[tuple[Any, ...], int]:
            if o == len(b):
                return (0,), o
            return inner(b, o)
        return read_opt
    if kind == "s*":
        return _list_reader(_read_str)
    if kind == "Q":
        def read_q(b: bytes, o: int) -> tuple[tuple[Any, ...], int]:
            q, o = _read_qid(b, o)
            return (q,), o
        return read_q
    if kind == "Q*":
        return _list_reader(_read_qid)
    if kind == "d":
        def read_d(b: bytes, o: int) -> tuple[tuple[Any, ...], int]:
            if o + 4 > len(b):
                raise ProtocolError("message too short for count")
            (n,) = _I.unpack_from(b, o)
            o += 4
            if o + n > len(b):
                raise ProtocolError("data runs past end of message")
            return (b[o : o + n],), o + n
        return read_d
    if kind == "T":
        def read_t(b: bytes, o: int) -> tuple[tuple[Any, ...], int]:
            # Rstat and Twstat wrap the stat in one more size[2].
            if o + 2 > len(b):
                raise ProtocolError("message too short")
            (n,) = _H.unpack_from(b, o)
            st, end = decode_stat(b[: o + 2 + n], o + 2, dotu)
            if end != o + 2 + n:
                raise ProtocolError("stat size does not match its wrapper")
            return (st,), end
        return read_t
    raise AssertionError(kind)


def _var_writer(name: str, kind: str, dotu: bool) -> Writer:
    if kind.endswith("?"):
        return _int_writer([(name, kind[:-1])])
    if kind == "s":
        def write_s(m: Message, out: list[bytes]) -> None:
            out.append(_enc_str(getattr(m, name)))
        return write_s
    if kind == "s*":
        return _list_writer(name, _enc_str)
    if kind == "Q":
        def write_q(m: Message, out: list[bytes]) -> None:
            out.append(_enc_qid(getattr(m, name)))
        return write_q
    if kind == "Q*":
        return _list_writer(name, _enc_qid)
    if kind == "d":
        def write_d(m: Message, out: list[bytes]) -> None:
            data = getattr(m, name)
            out.append(_I.pack(len(data)))
            out.append(data)
        return write_d
    if kind == "T":
        def write_t(m: Message, out: list[bytes]) -> None:
            st = encode_stat(getattr(m, name), dotu)
            out.append(_H.pack(len(st)))
            out.append(st)
        return write_t
    raise AssertionError(kind)


class Codec:
    """Encoder and decoder for one dialect (``9P2000``, ``9P2000.u``, ``9P2000.L``)."""

    def __init__(self, dialect: str) -> None:
        if dialect not in proto.DIALECTS:
            raise ValueError(f"unknown 9P dialect {dialect!r}")
        self.dialect = dialect
        dotu = dialect != proto.VERSION_9P
        self.dotu = dialect == proto.VERSION_9PU
        self.dotl = dialect == proto.VERSION_9PL
        self._decoders: dict[int, tuple[type[Message], list[Reader], list[tuple[str, Any]]]] = {}
        self._encoders: dict[type[Message], list[Writer]] = {}
        for name, _num, spec, ext in _BASE:
            if self.dotl and name in ("Topen", "Ropen", "Tcreate", "Rcreate", "Tstat", "Rstat",
                                      "Twstat", "Rwstat", "Rerror"):
                continue
            fields = _parse(spec) + (_parse(ext) if dotu else [])
            self._add(MESSAGES[name], fields, dotu)
        if self.dotl:
            for name, _num, spec in _LINUX:
                self._add(MESSAGES[name], _parse(spec), dotu)

    def _add(self, cls: type[Message], fields: list[tuple[str, str]], dotu: bool) -> None:
        readers, writers = _compile(fields, dotu)
        # Fields this dialect does not carry (n_uname in 9P2000, ...) get their defaults.
        tail = [(f, _DEFAULTS[f]) for f in cls.FIELDS[len(fields):]]
        self._decoders[cls.TYPE] = (cls, readers, tail)
        self._encoders[cls] = writers

    def knows(self, msg_type: int) -> bool:
        return msg_type in self._decoders

    def encode(self, msg: Message) -> bytes:
        """Encode ``msg`` to one frame, size[4] included."""
        try:
            writers = self._encoders[type(msg)]
        except KeyError:
            raise ProtocolError(f"{type(msg).__name__} is not part of {self.dialect}") from None
        parts: list[bytes] = [b""]
        try:
            for w in writers:
                w(msg, parts)
            size = 7 + sum(len(p) for p in parts)
            parts[0] = _HDR.pack(size, msg.TYPE, msg.tag)
        except struct.error as e:
            raise ProtocolError(f"{type(msg).__name__}: field out of range: {e}") from None
        return b"".join(parts)

    def decode(self, frame: bytes) -> Message:
        """Decode one whole frame (size[4] included).

        Raises ProtocolError, with ``tag`` set when the header was readable,
        for anything that is not a well-formed message of this dialect.
        """
        if len(frame) < 7:
            raise ProtocolError("message shorter than its header")
        size, typ, tag = _HDR.unpack_from(frame, 0)
        if size != len(frame):
            raise ProtocolError("message size does not match frame", tag)
        entry = self._decoders.get(typ)
        if entry is None:
            raise ProtocolError(f"unknown message type {typ}", tag)
        cls, readers, tail = entry
        msg = cls.__new__(cls)
        msg.tag = tag
        values: list[Any] = []
        o = 7
        try:
            for r in readers:
                got, o = r(frame, o)
                values.extend(got)
        except ProtocolError as e:
            raise ProtocolError(f"{cls.__name__}: {e}", tag) from None
        if o != size:
            raise ProtocolError(f"{cls.__name__}: {size - o} bytes past the end of the message", tag)
        for field, value in zip(cls.FIELDS, values, strict=False):
            setattr(msg, field, value)
        for field, value in tail:
            setattr(msg, field, value)
        return msg


CODECS = {d: Codec(d) for d in proto.DIALECTS}


class Framer:
    """Splits a byte stream into frames; refuses any frame larger than ``msize``."""

    def __init__(self, msize: int) -> None:
        self.msize = msize
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> bytes | None:
        """The next whole frame, or None until more bytes arrive."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= 4:
            (size,) = _I.unpack_from(buf, pos)
            if size < 7 or size > self.msize:
                head = bytes(buf[pos : pos + 4])
                # (an HTTP or SSH peer: its first bytes read as a size past any msize; say what they are)
                hint = f": it began {head.decode()!r}, text, not 9P" if head.isascii() and head.decode().isprintable() \
                    else ""
                raise ProtocolError(f"message size {size} outside 7..{self.msize}{hint}")
            if len(buf) - pos >= size:
                self._pos = pos + size
                return bytes(buf[pos : pos + size])
        if pos:
            del buf[:pos]
            self._pos = 0
        return None


def encode_dirent(qid: Qid, offset: int, dtype: int, name: str) -> bytes:
    """One 9P2000.L readdir entry: qid[13] offset[8] type[1] name[s]."""
    return _QID.pack(qid[0], qid[1], qid[2]) + struct.pack("<QB", offset, dtype) + _enc_str(name)


def decode_dirents(data: bytes) -> list[tuple[Qid, int, int, str]]:
    """Split Rreaddir data into (qid, offset, type, name) entries."""
    out = []
    o = 0
    while o < len(data):
        qid, o = _read_qid(data, o)
        if o + 9 > len(data):
            raise ProtocolError("readdir entry too short")
        off, dtype = struct.unpack_from("<QB", data, o)
        name, o = _read_str(data, o + 9)
        out.append((qid, off, dtype, name))
    return out


def decode_stats(data: bytes, dotu: bool) -> list[Stat]:
    """Split the data of a 9P2000 directory read into stat entries."""
    out = []
    o = 0
    while o < len(data):
        st, o = decode_stat(data, o, dotu)
        out.append(st)
    return out
