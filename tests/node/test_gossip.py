"""Gossip: the datagram codec, the PeerTable on a fake clock, and real sockets on loopback.

Every socket test uses explicit peers on 127.0.0.1 with broadcast off: nothing
here sends anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fornax_sched.node.gossip import (
    Announce,
    Event,
    Gossip,
    Heartbeat,
    Leave,
    ParseError,
    Peers,
    PeerTable,
    SelfInfo,
    UnknownVerb,
    decode,
    format_message,
    pack_peers,
    parse,
    parse_hostport,
)

from ..helpers import run

# ---------------------------------------------------------------- codec

ids = st.from_regex(r"[0-9a-f]{1,64}", fullmatch=True)
words = st.text(st.characters(codec="utf-8").filter(lambda c: c.isprintable() and not c.isspace()),
                min_size=1, max_size=60)
uints = st.integers(0, 2**64 - 1)
loads = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
udp = st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535))
messages = st.one_of(
    st.builds(Announce, ids, words, words, uints, uints, uints, uints),
    st.builds(Heartbeat, ids, loads, uints, uints),
    st.builds(Leave, ids),
    st.builds(Peers, st.lists(st.tuples(ids, udp), min_size=1, max_size=8).map(tuple)),
)



@given(messages)
def test_any_valid_message_round_trips(m: Any) -> None:
    text = format_message(m)
    assert parse(text) == m
    assert decode(text.encode()) == m
    assert parse(text + "\n") == m
    assert format_message(parse(text)) == text


def test_examples_from_the_fornax_design() -> None:
    a = parse("ANNOUNCE a7f3b2c1 tcp!127.0.0.1!5641 fornax-01 4 268435456 134217728 2")
    assert a == Announce("a7f3b2c1", "tcp!127.0.0.1!5641", "fornax-01", 4, 268435456, 134217728, 2)
    assert parse("HEARTBEAT a7f3b2c1 0.52 134217728 2") == Heartbeat("a7f3b2c1", 0.52, 134217728, 2)
    assert parse("LEAVE A7F3B2C1") == Leave("a7f3b2c1")  # ids are kept in lower case
    assert format_message(Heartbeat("ab", 1e-05, 0, 0)) == "HEARTBEAT ab 0.00001 0 0"  # never an exponent
    assert format_message(Heartbeat("ab", 3.0, 1, 2)) == "HEARTBEAT ab 3.0 1 2"
    # Extra trailing fields are ignored, for a later Fornax that adds one.
    assert parse("LEAVE ab future-field") == Leave("ab")


@pytest.mark.parametrize("text", [
    "", "   ", "ANNOUNCE", "ANNOUNCE ab tcp!x name 1 2 3", "ANNOUNCE xyz tcp!x n 1 2 3 4",
    "ANNOUNCE ab tcp!x n -1 2 3 4", "ANNOUNCE ab tcp!x n 1.5 2 3 4", "ANNOUNCE ab tcp!x n 1 2 3 99999999999999999999",
    "ANNOUNCE ab tcp!x n +1 2 3 4", "ANNOUNCE ab tcp!x n 1_0 2 3 4", "ANNOUNCE ab tcp!x n \u0663 2 3 4",
    "ANNOUNCE ab tcp!x n\x00 1 2 3 4", "HEARTBEAT ab", "HEARTBEAT ab 1e5 1 2", "HEARTBEAT ab -1 1 2",
    "HEARTBEAT ab nan 1 2", "HEARTBEAT ab inf 1 2", "HEARTBEAT ab " + "9" * 400 + " 1 2", "LEAVE", "LEAVE g",
    "announce ab x y 1 2 3 4", "PEERS ab", "PEERS ab udp!1.2.3.4!0", "PEERS ab tcp!1.2.3.4!5",
    "PEERS ab udp!1.2.3.400!5", "PEERS ab udp!1.2.3.4!5 cd", "LEAVE " + "a" * 65, "X" * 2000,
])
def test_malformed_text_is_a_parse_error(text: str) -> None:
    with pytest.raises(ParseError):
        parse(text)


def test_unknown_verb_is_its_own_parse_error() -> None:
    with pytest.raises(UnknownVerb):
        parse("GOSSIP ab")


@given(st.binary(max_size=1200))
def test_random_bytes_only_ever_fail_to_parse(data: bytes) -> None:
    try:
        m = decode(data)
    except ParseError:
        return
    assert parse(format_message(m)) == m


tokens = st.one_of(st.sampled_from(["ANNOUNCE", "HEARTBEAT", "LEAVE", "PEERS", "udp!127.0.0.1!9"]),
                   ids, words, st.text(max_size=20), uints.map(str), st.integers().map(str), loads.map(repr))


@given(st.lists(tokens, max_size=12), st.sampled_from([" ", "  ", "\t", "\n"]))
def test_near_valid_text_parses_or_fails_cleanly(toks: list[str], sep: str) -> None:
    try:
        m = parse(sep.join(toks))
    except ParseError:
        return
    assert parse(format_message(m)) == m


@given(st.lists(st.tuples(ids, udp), min_size=1, max_size=60))
def test_pack_peers_fits_every_entry_in_datagrams(entries: list[tuple[str, tuple[str, int]]]) -> None:
    packed = pack_peers(entries)
    assert [e for m in packed for e in m.entries] == entries
    for m in packed:
        assert len(format_message(m).encode()) <= 1024


def test_format_refuses_invalid_fields() -> None:
    for bad in [Announce("ab", "tcp!x", "has space", 1, 2, 3, 4), Announce("zz", "a", "n", 1, 2, 3, 4),
                Announce("ab", "a", "n", -1, 2, 3, 4), Heartbeat("ab", float("nan"), 1, 2),
                Heartbeat("ab", -0.5, 1, 2), Peers(())]:
        with pytest.raises(ValueError):
            format_message(bad)


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:9711") == ("127.0.0.1", 9711)
    assert parse_hostport("udp!127.0.0.1!9711") == ("127.0.0.1", 9711)
    for bad in ["127.0.0.1", ":9711", "127.0.0.1:x", "127.0.0.1:70000"]:
        with pytest.raises(ValueError):
            parse_hostport(bad)


# ---------------------------------------------------------------- PeerTable, fake clock

SELF = "5e1f"
A = ("127.0.0.1", 9801)
B = ("127.0.0.1", 9802)


def announce(node: str = "a1", name: str = "fornax-01", addr: str = "tcp!127.0.0.1!5641") -> str:
    return f"ANNOUNCE {node} {addr} {name} 4 1073741824 536870912 1"


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def test_peer_goes_suspect_dead_removed_on_the_default_timers() -> None:
    t = PeerTable(SELF)
    assert kinds(t.observe(announce(), A, 0.0)) == ["joined"]
    (p,) = t.peers()
    assert (p.id, p.name, p.addr, p.cpus, p.mem_total, p.mem_free, p.containers) == (
        "a1", "fornax-01", "tcp!127.0.0.1!5641", 4, 1 << 30, 1 << 29, 1)
    assert (p.status, p.source, p.last_seen, p.since) == ("online", A, 0.0, 0.0)
    assert t.tick(14.9) == []
    ev = t.tick(15.0)
    assert kinds(ev) == ["suspect"] and ev[0].peer.status == "suspect"
    assert t.tick(29.9) == [] and t.peers()[0].status == "suspect"
    assert kinds(t.tick(30.0)) == ["dead"]
    assert t.peers()[0].since == 30.0
    assert t.tick(89.9) == [] and t.peers()[0].status == "dead"
    ev = t.tick(90.0)
    assert kinds(ev) == ["removed"] and ev[0].peer.id == "a1"
    assert t.peers() == []


def test_late_tick_emits_every_missed_transition_in_order() -> None:
    t = PeerTable(SELF)
    t.observe(announce(), A, 0.0)
    ev = t.tick(200.0)
    assert kinds(ev) == ["suspect", "dead", "removed"]
    assert [e.peer.since for e in ev] == [15.0, 30.0, 30.0]


def test_heartbeat_keeps_alive_and_brings_back_online() -> None:
    t = PeerTable(SELF)
    t.observe(announce(), A, 0.0)
    t.observe("HEARTBEAT a1 0.25 1000 3", A, 10.0)
    assert t.tick(20.0) == []
    p = t.peers()[0]
    assert (p.load, p.mem_free, p.containers, p.last_seen) == (0.25, 1000, 3, 10.0)
    assert kinds(t.tick(25.0)) == ["suspect"]
    assert kinds(t.tick(40.0)) == ["dead"]
    ev = t.observe("HEARTBEAT a1 0.5 1000 3", B, 50.0)  # a restarted node, same id, new port
    assert kinds(ev) == ["online"]
    p = t.peers()[0]
    assert (p.status, p.since, p.source) == ("online", 50.0, B)
    assert t.tick(64.0) == []
    # ANNOUNCE from a suspect peer brings it back too.
    assert kinds(t.tick(65.0)) == ["suspect"]
    assert kinds(t.observe(announce(), B, 66.0)) == ["online"]


def test_restart_after_removal_is_a_join_again() -> None:
    t = PeerTable(SELF)
    t.observe(announce(), A, 0.0)
    assert kinds(t.tick(90.0)) == ["suspect", "dead", "removed"]
    assert kinds(t.observe(announce(), A, 95.0)) == ["joined"]


def test_restart_with_a_new_id_leaves_the_old_one_to_the_timers() -> None:
    t = PeerTable(SELF)
    t.observe(announce("a1"), A, 0.0)
    assert kinds(t.observe(announce("a2"), A, 5.0)) == ["joined"]
    t.observe("HEARTBEAT a2 0 1 1", A, 30.0)
    assert [(e.kind, e.peer.id) for e in t.tick(31.0)] == [("suspect", "a1"), ("dead", "a1")]
    t.observe("HEARTBEAT a2 0 1 1", A, 80.0)
    assert [(e.kind, e.peer.id) for e in t.tick(91.0)] == [("removed", "a1")]
    assert [p.id for p in t.peers()] == ["a2"]


def test_leave_removes_at_once() -> None:
    t = PeerTable(SELF)
    t.observe(announce(), A, 0.0)
    ev = t.observe("LEAVE a1", A, 1.0)
    assert kinds(ev) == ["left"] and ev[0].peer.status == "left"
    assert t.peers() == [] and t.tick(100.0) == []
    assert t.observe("LEAVE a1", A, 2.0) == []  # unknown by now: nothing
    assert kinds(t.observe(announce(), A, 3.0)) == ["joined"]


def test_own_datagrams_are_ignored() -> None:
    t = PeerTable(SELF)
    for text in [announce(SELF), announce(SELF.upper()), f"HEARTBEAT {SELF} 1.0 1 1", f"LEAVE {SELF}"]:
        assert t.observe(text, A, 0.0) == []
    assert t.peers() == [] and t.sources() == [] and t.take_answers() == []
    assert t.stats.own == 4


def test_malformed_and_unknown_are_counted_and_ignored() -> None:
    t = PeerTable(SELF)
    t.observe(announce(), A, 0.0)
    assert t.observe(b"\xff\xfe", A, 1.0) == []
    assert t.observe("HEARTBEAT a1 lots 1 2", A, 1.0) == []
    assert t.observe("PING a1", A, 1.0) == []
    assert (t.stats.malformed, t.stats.unknown_verb, t.stats.received) == (2, 1, 4)
    assert t.peers()[0].last_seen == 0.0  # a bad datagram is not a sign of life


@given(st.lists(st.one_of(st.binary(max_size=200), st.lists(tokens, max_size=9).map(" ".join),
                          messages.map(format_message)), max_size=30))
def test_table_survives_any_datagrams(datagrams: list[Any]) -> None:
    t = PeerTable(SELF)
    for i, d in enumerate(datagrams):
        t.observe(d, A if i % 2 else B, float(i))
        t.tick(float(i))
        t.take_answers()
    t.tick(1e9)
    assert t.peers() == []


def test_heartbeat_before_announce_is_unannounced_and_asked() -> None:
    t = PeerTable(SELF)
    assert t.observe("HEARTBEAT b2 0.1 1 1", B, 0.0) == []
    assert t.peers() == [] and t.stats.unannounced == 1
    assert t.sources() == [B]  # we still write to it...
    assert t.take_answers() == [B]  # ...and send it our ANNOUNCE, which it answers
    t.observe("HEARTBEAT b2 0.1 1 1", B, 1.0)
    assert t.take_answers() == []  # at most once per holdoff (5 s)
    t.observe("HEARTBEAT b2 0.1 1 1", B, 5.0)
    assert t.take_answers() == [B]
    assert kinds(t.observe(announce("b2"), B, 6.0)) == ["joined"]
    t.tick(60.0)  # an unannounced contact expires after dead_after silence
    t.observe("HEARTBEAT c3 0.1 1 1", A, 61.0)
    t.tick(200.0)
    assert t.sources() == []


def test_answers_new_peers_and_holds_back_repeats() -> None:
    t = PeerTable(SELF)
    t.observe(announce("a1"), A, 0.0)
    assert t.take_answers() == [A] and t.take_relay()
    t.observe(announce("a1"), A, 1.0)  # answered it 1 s ago
    assert t.take_answers() == [] and not t.take_relay()
    t.announced(10.0)
    t.observe(announce("a1"), A, 12.0)  # we announced to everyone 2 s ago
    assert t.take_answers() == []
    t.observe(announce("a1"), A, 16.0)  # an online peer announcing again: maybe restarted, answer
    assert t.take_answers() == [A]
    t.tick(40.0)
    t.announced(40.0)
    t.observe(announce("a1"), A, 41.0)  # it was dead: answer even though we just announced
    assert t.take_answers() == [A] and t.take_relay()


def test_name_change_is_an_update() -> None:
    t = PeerTable(SELF)
    t.observe(announce(name="old"), A, 0.0)
    ev = t.observe(announce(name="new"), A, 1.0)
    assert kinds(ev) == ["updated"] and ev[0].peer.name == "new"
    assert t.observe(announce(name="new"), A, 2.0) == []


def test_peers_hints_are_trusted_only_from_online_peers() -> None:
    t = PeerTable(SELF)
    hint = f"PEERS c3 udp!127.0.0.1!9803 a1 udp!127.0.0.1!9801 {SELF} udp!127.0.0.1!9800"
    t.observe(hint, B, 0.0)  # B is nobody we know
    assert t.sources() == [] and t.stats.untrusted == 1
    t.observe(announce("a1"), A, 0.0)
    t.observe(announce("b2"), B, 0.0)
    t.take_answers()
    t.observe(hint, B, 1.0)
    assert t.take_answers() == [("127.0.0.1", 9803)]  # not a1 (online already), not ourselves
    assert ("127.0.0.1", 9803) in t.sources()
    assert [p.id for p in t.peers()] == ["a1", "b2"]  # a hint is no peer
    t.observe(hint, B, 2.0)
    assert t.take_answers() == []  # a repeated hint is not announced to again
    assert sorted(t.online_entries()) == [("a1", A), ("b2", B)]
    t.observe("HEARTBEAT a1 0 1 1", A, 29.0)
    t.observe("HEARTBEAT b2 0 1 1", B, 29.0)
    t.tick(32.0)  # 30 s since the last hint
    assert ("127.0.0.1", 9803) not in t.sources()


def test_timer_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        PeerTable(SELF, suspect_after=20, dead_after=10)
    with pytest.raises(ValueError):
        PeerTable(SELF, suspect_after=0)


# ---------------------------------------------------------------- real sockets on loopback

FAST: dict[str, Any] = dict(interval=0.1, suspect_after=0.5, dead_after=1.0, remove_after=2.0)
LOCAL = "127.0.0.1"



class Node:
    """A Gossip with a recorded event list and a mutable self description."""

    def __init__(self, node_id: str, name: str, *, port: int = 0, peers: list[tuple[str, int]] | None = None,
                 **kw: Any) -> None:
        self.info = SelfInfo(id=node_id, name=name, addr=f"tcp!{LOCAL}!{5600 + int(node_id, 16) % 100}", cpus=2,
                             mem_total=1 << 30, mem_free=1 << 29, containers=0, load=0.5)
        self.events: list[tuple[float, str, str]] = []
        self.g = Gossip(lambda: self.info, listen=(LOCAL, port), peers=peers or [], broadcast=None,
                        on_event=lambda e: self.events.append((time.monotonic(), e.kind, e.peer.id)),
                        **{**FAST, **kw})

    def online(self) -> set[str]:
        return {p.id for p in self.g.peers() if p.status == "online"}

    def kinds_for(self, node_id: str) -> list[str]:
        return [k for _, k, i in self.events if i == node_id]


async def until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for cond; return the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def chain() -> tuple[Node, Node, Node]:
    """A knows B, B knows C, C knows nobody."""
    c = Node("c3", "fornax-03")
    await c.g.start()
    b = Node("b2", "fornax-02", peers=[(LOCAL, c.g.port)])
    await b.g.start()
    a = Node("a1", "fornax-01", peers=[(LOCAL, b.g.port)])
    await a.g.start()
    return a, b, c


def everyone_sees_everyone(*nodes: Node) -> bool:
    ids = {n.info.id for n in nodes}
    return all(n.online() == ids - {n.info.id} for n in nodes)


def test_three_nodes_on_a_chain_of_peers_all_find_each_other() -> None:
    async def main() -> None:
        t0 = time.monotonic()
        a, b, c = await chain()
        await until(lambda: everyone_sees_everyone(a, b, c), 0.5, "all three see each other")
        assert time.monotonic() - t0 < 0.5
        p = {x.id: x for x in c.g.peers()}["a1"]
        assert (p.name, p.addr, p.cpus, p.mem_total, p.mem_free, p.source) == (
            "fornax-01", a.info.addr, 2, 1 << 30, 1 << 29, (LOCAL, a.g.port))
        await until(lambda: {x.id: x for x in c.g.peers()}["a1"].load == 0.5, 0.5, "heartbeat carries load")
        # A rename reaches the peers.
        a.info.name = "fornax-renamed"
        a.g.announce()
        await until(lambda: {x.id: x.name for x in c.g.peers()}["a1"] == "fornax-renamed", 0.5, "rename")
        assert "updated" in c.kinds_for("a1")
        for n in (a, b, c):
            assert n.g.stats.malformed == 0
            assert n.kinds_for("a1" if n is not a else "b2")[0] == "joined"
            await n.g.stop()

    run(main())


def test_killed_node_goes_suspect_dead_removed_and_returns_on_restart() -> None:
    async def main() -> None:
        a, b, c = await chain()
        await until(lambda: everyone_sees_everyone(a, b, c), 0.5, "all three see each other")
        port = c.g.port
        await c.g.stop(leave=False)  # kill -9: no LEAVE
        killed = time.monotonic()
        await until(lambda: all(n.kinds_for("c3")[-1:] == ["removed"] for n in (a, b)), 4.0, "c3 removed")
        for n in (a, b):
            assert n.kinds_for("c3") == ["joined", "suspect", "dead", "removed"]
            t = {k: at - killed for at, k, i in n.events if i == "c3"}
            assert 0.3 <= t["suspect"] <= 0.8, t
            assert 0.8 <= t["dead"] <= 1.3, t
            assert 2.8 <= t["removed"] <= 3.4, t
            assert "c3" not in {p.id for p in n.g.peers()}

        # The same node (same id, same port, a new process) knowing nobody comes back.
        c2 = Node("c3", "fornax-03", port=port)
        await c2.g.start()
        took = await until(lambda: everyone_sees_everyone(a, b, c2), 1.0, "c3 back")
        assert took < 0.5
        for n in (a, b):
            assert n.kinds_for("c3")[-1] == "joined"

        # Killed again and back before it is removed: dead, then online.
        await c2.g.stop(leave=False)
        await until(lambda: all(n.kinds_for("c3")[-1:] == ["dead"] for n in (a, b)), 2.0, "c3 dead")
        c3 = Node("c3", "fornax-03", port=port)
        await c3.g.start()
        await until(lambda: everyone_sees_everyone(a, b, c3), 0.5, "c3 online again")
        for n in (a, b):
            assert n.kinds_for("c3")[-3:] == ["suspect", "dead", "online"]
        for n in (a, b, c3):
            await n.g.stop()

    run(main())


def test_leave_and_join() -> None:
    async def main() -> None:
        a, b, c = await chain()
        await until(lambda: everyone_sees_everyone(a, b, c), 0.5, "all three see each other")
        b.g.leave()
        assert not b.g.joined
        await until(lambda: "b2" not in a.online() | c.online(), 0.3, "b2 gone")
        for n in (a, c):
            assert n.kinds_for("b2")[-1] == "left"
        await asyncio.sleep(0.6)  # longer than suspect_after: a left node stays quiet
        assert all("b2" not in {p.id for p in n.g.peers()} for n in (a, c))
        assert b.g.port and b.g.stats.received > 0  # still up and listening
        b.g.join()
        await until(lambda: everyone_sees_everyone(a, b, c), 0.5, "b2 back")
        for n in (a, c):
            assert n.kinds_for("b2")[-1] == "joined"
        # A clean stop says LEAVE: the others forget it at once.
        await b.g.stop()
        await until(lambda: all(n.kinds_for("b2")[-1] == "left" for n in (a, c)), 0.3, "b2 left on stop")
        for n in (a, c):
            await n.g.stop()

    run(main())


def test_garbage_and_own_datagrams_do_not_disturb_a_node() -> None:
    async def main() -> None:
        a = Node("a1", "fornax-01")
        await a.g.start()
        b = Node("b2", "fornax-02", peers=[(LOCAL, a.g.port)])
        await b.g.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for junk in [b"", b"\xff" * 50, b"ANNOUNCE", b"HEARTBEAT zz 1 1 1", b"X" * 1500, b"PING a1"]:
                s.sendto(junk, (LOCAL, a.g.port))
            s.sendto(b"ANNOUNCE a1 x y 1 1 1 1", (LOCAL, a.g.port))  # a1 is a itself
            s.sendto(b"PEERS e5 udp!127.0.0.1!9", (LOCAL, a.g.port))  # from nobody a knows
        await until(lambda: a.g.stats.malformed >= 5 and a.g.stats.own >= 1 and a.g.stats.untrusted >= 1,
                    1.0, "junk counted")
        assert a.g.stats.unknown_verb == 1
        await until(lambda: a.online() == {"b2"} and b.online() == {"a1"}, 0.5, "a and b still see each other")
        assert (LOCAL, 9) not in a.g.table.sources()
        for n in (a, b):
            await n.g.stop()

    run(main())


def test_self_listed_as_peer_hears_itself_and_ignores_it() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOCAL, 0))
            port = s.getsockname()[1]
        n = Node("d4", "fornax-04", port=port, peers=[(LOCAL, port)])
        await n.g.start()
        await until(lambda: n.g.stats.own >= 2, 0.5, "own datagrams heard")
        assert n.g.peers() == [] and n.events == []
        await n.g.stop()

    run(main())
