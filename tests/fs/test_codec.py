"""The codec: every message of every dialect round-trips; garbage never crashes it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fornax_sched.fs import codec as M
from fornax_sched.fs import proto as P
from fornax_sched.fs.codec import CODECS, Framer, ProtocolError, Qid, Stat

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
qids = st.builds(Qid, u8, u32, u64)


def stats(dotu: bool) -> st.SearchStrategy[Stat]:
    ext = (text, u32, u32, u32) if dotu else (st.just(""), st.just(P.NONUNAME), st.just(P.NONUNAME),
                                              st.just(P.NONUNAME))
    return st.builds(Stat, u16, u32, qids, u32, u32, u32, u64, text, text, text, text, *ext)


KIND = {"1": u8, "2": u16, "4": u32, "8": u64, "s": text, "Q": qids, "d": st.binary(max_size=300),
        "s*": st.lists(text, max_size=16).map(tuple), "Q*": st.lists(qids, max_size=16).map(tuple)}


def message_strategy(dialect: str) -> st.SearchStrategy[M.Message]:
    codec = CODECS[dialect]
    dotu = dialect != P.VERSION_9P
    options = []
    for name, cls in M.MESSAGES.items():
        if not codec.knows(cls.TYPE) or codec._decoders[cls.TYPE][0] is not cls:
            continue
        fields = [f for f, _ in codec._decoders[cls.TYPE][2]]
        spec = [(f, k) for f, k in _spec_of(name) if f not in fields]
        if not dotu:
            spec = [(f, k) for f, k in spec if f not in ("n_uname", "errno", "extension")]
        kwargs = {f: (stats(dialect == P.VERSION_9PU) if k == "T" else KIND[k.rstrip("?")]) for f, k in spec}
        options.append(st.builds(cls, u16, **kwargs))
    return st.one_of(options)


def _spec_of(name: str) -> list[tuple[str, str]]:
    for n, _num, spec, ext in M._BASE:
        if n == name:
            return M._parse(spec) + M._parse(ext)
    for n, _num, spec in M._LINUX:
        if n == name:
            return M._parse(spec)
    raise KeyError(name)


@pytest.mark.parametrize("dialect", P.DIALECTS)
@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_every_message_round_trips(dialect: str, data: st.DataObject) -> None:
    codec = CODECS[dialect]
    msg = data.draw(message_strategy(dialect))
    frame = codec.encode(msg)
    assert struct.unpack_from("<I", frame)[0] == len(frame)
    assert codec.decode(frame) == msg


def test_every_type_is_covered() -> None:
    """Each dialect knows the messages it should, and no others."""
    assert CODECS[P.VERSION_9P].knows(M.Topen.TYPE)
    assert not CODECS[P.VERSION_9P].knows(M.Tlopen.TYPE)
    assert CODECS[P.VERSION_9PL].knows(M.Treaddir.TYPE)
    assert not CODECS[P.VERSION_9PL].knows(M.Rerror.TYPE)
    # 18 messages shared with 9P2000 (no open, create, stat, wstat, Rerror) + 39 of .L
    assert len([c for c in M.MESSAGES.values() if CODECS[P.VERSION_9PL].knows(c.TYPE)]) == 18 + 39


@pytest.mark.parametrize("dialect", P.DIALECTS)
@settings(max_examples=1500, deadline=None)
@given(blob=st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(dialect: str, blob: bytes) -> None:
    frame = struct.pack("<I", len(blob) + 4) + blob
    try:
        CODECS[dialect].decode(frame)
    except ProtocolError:
        pass


@pytest.mark.parametrize("dialect", P.DIALECTS)
@settings(max_examples=800, deadline=None)
@given(data=st.data())
def test_mutated_messages_never_crash_the_decoder(dialect: str, data: st.DataObject) -> None:
    codec = CODECS[dialect]
    frame = bytearray(codec.encode(data.draw(message_strategy(dialect))))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(4, max(4, len(frame) - 1)))
        if i < len(frame):
            frame[i] = data.draw(u8)
    cut = data.draw(st.integers(7, len(frame)))
    frame = frame[:cut]
    frame[0:4] = struct.pack("<I", len(frame))
    try:
        codec.decode(bytes(frame))
    except ProtocolError:
        pass


def test_errors_name_the_message_and_keep_the_tag() -> None:
    codec = CODECS[P.VERSION_9P]
    frame = codec.encode(M.Twalk(7, 1, 2, ("a",)))[:-1]
    frame = struct.pack("<I", len(frame)) + frame[4:]
    with pytest.raises(ProtocolError) as e:
        codec.decode(frame)
    assert e.value.tag == 7 and "Twalk" in str(e.value)
    with pytest.raises(ProtocolError, match="unknown message type 99") as e:
        codec.decode(struct.pack("<IBH", 7, 99, 3))
    assert e.value.tag == 3


def test_framer_splits_and_refuses_oversized() -> None:
    codec = CODECS[P.VERSION_9P]
    a, b = codec.encode(M.Tclunk(1, 5)), codec.encode(M.Tclunk(2, 6))
    f = Framer(8192)
    f.feed(a + b[:3])
    assert f.next_frame() == a and f.next_frame() is None
    f.feed(b[3:])
    assert f.next_frame() == b and f.buffered() == 0
    f.feed(struct.pack("<I", 9000))
    with pytest.raises(ProtocolError, match="outside 7..8192$"):
        f.next_frame()
    for text in (b"HTTP/1.1 400 Bad Request\r\n", b"GET / HTTP/1.1\r\n", b"SSH-2.0-OpenSSH_9.2\r\n"):
        f = Framer(8192)  # a peer that speaks a text protocol says so, not only a size
        f.feed(text)
        with pytest.raises(ProtocolError, match=f"it began '{text[:4].decode()}', text, not 9P"):
            f.next_frame()


def test_linux_fsync_without_datasync_decodes() -> None:
    """Old kernels send Tfsync with the fid alone."""
    frame = struct.pack("<IBHI", 11, M.Tfsync.TYPE, 4, 9)
    assert CODECS[P.VERSION_9PL].decode(frame) == M.Tfsync(4, 9, 0)


def test_stat_of_9p2000u_carries_numeric_ids() -> None:
    st_ = Stat(qid=Qid(P.QTDIR, 1, 2), mode=P.DMDIR | 0o755, name="d", uid="u", gid="g", muid="m",
               n_uid=1000, n_gid=100, n_muid=1000)
    frame = CODECS[P.VERSION_9PU].encode(M.Rstat(1, st_))
    assert CODECS[P.VERSION_9PU].decode(frame).stat == st_
    with pytest.raises(ProtocolError):  # the same bytes are not a 9P2000 stat
        CODECS[P.VERSION_9P].decode(frame)
