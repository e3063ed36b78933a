"""The scheduler's ctl and policy languages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fornax_sched.sched.lang import LangError, format_place, parse_command, parse_place, parse_policy
from fornax_sched.sched.model import Affinity, AntiAffinity, Condition, NodeFacts, Policy, Request


def test_place_with_every_constraint() -> None:
    c = parse_command("place web cpu>=2 mem>=128M zone=east node=fornax-0* node!=fornax-03 "
                      "anti-affinity=web-* name=web replicas=3 -- --port 8080\n")
    assert c.verb == "place" and c.request == Request(
        image="web", args=("--port", "8080"), name="web", replicas=3, cpus=2.0, mem=128 << 20,
        labels=(("zone", "east"),), include=("fornax-0*",), exclude=("fornax-03",), avoid=("web-*",))


def test_place_round_trips_through_its_text() -> None:
    req = parse_command("place hello mem>=64M ssd=yes node!=old-* env:A=1 'env:B=x y' env:C= env=prod "
                        "-- 'two words'").request
    assert req is not None
    again = parse_command(format_place(req)).request
    assert again == req


@pytest.mark.parametrize("text, message", [
    ("", "empty command"),
    ("launch hello", "unknown command 'launch'"),
    ("place", "usage: place IMAGE"),
    ("place ../x", "bad image"),
    ("place hello cpu>=lots", "bad cpu constraint 'cpu>=lots'"),
    ("place hello cpu>=0", "must be above 0"),
    ("place hello mem>=12Q", "bad mem constraint 'mem>=12Q'"),
    ("place hello cpu<=2", "unknown constraint 'cpu<=2'"),
    ("place hello gpu", "unknown constraint 'gpu'"),
    ("place hello replicas=0", "bad replicas '0'"),
    ("place hello replicas=2 replicas=3", "replicas given twice"),
    ("place hello node=a/b", "bad name pattern"),
    ("migrate web-1 fornax-01", "usage: migrate CONTAINER FROM TO"),
    ("evacuate", "usage: evacuate NODE"),
    ("rebalance many", "bad moves 'many'"),
    ("scale web", "usage: scale NAME REPLICAS"),
    ("cordon a b", "usage: cordon NODE"),
    ("place hello 'unclosed", "cannot parse"),
    ("forget", "usage: forget NODE"),
    ("forget a b", "usage: forget NODE"),
    ("place hello env:A", "bad env 'env:A': want env:KEY=VALUE"),
    ("place hello env:A=1 env:A=2", "env A given twice"),
    ("place hello env:FORNAX_NODE=x", "FORNAX_ variables are set by the node"),
    ("place hello env:a-b=1", "bad env name 'a-b'"),
])
def test_command_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(LangError, match=message.replace("(", r"\(")):
        parse_command(text)


def test_other_verbs() -> None:
    assert parse_command("migrate web-1 fornax-01 fornax-02").targets == ["web-1", "fornax-01", "fornax-02"]
    assert parse_command("evacuate fornax-02").targets == ["fornax-02"]
    assert parse_command("rebalance").count == 0 and parse_command("rebalance 5").count == 5
    assert (parse_command("scale web 4").targets, parse_command("scale web 4").count) == (["web"], 4)
    for verb in ("stop", "start", "remove", "cordon", "uncordon"):
        assert parse_command(f"{verb} x-1").verb == verb


def test_policy_lines() -> None:
    p = parse_policy("# prefer big nodes, keep web apart\npack\naffinity cpu>=2 mem>=128M zone=east\n"
                     "anti-affinity web-* spread\n\n")
    assert p == Policy("pack", (
        Affinity((Condition("cpu", amount=2), Condition("mem", amount=128 << 20),
                  Condition("label", key="zone", value="east"))),
        AntiAffinity("web-*"),
    ))
    assert parse_policy(p.text()) == p
    assert parse_policy("") == Policy("spread", ())


@pytest.mark.parametrize("text, message", [
    ("spread\nfancy", "line 2: unknown rule 'fancy'"),
    ("spread\npack", "line 2: a second base policy"),
    ("affinity", "line 1: affinity needs conditions"),
    ("spread\n\naffinity cpu>=x", "line 3: bad cpu constraint"),
    ("anti-affinity", "line 1: usage: anti-affinity GLOB"),
    ("anti-affinity web-* pack", "line 1: usage"),
    ("spread now", "line 1: spread takes nothing"),
])
def test_policy_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(LangError, match=message):
        parse_policy(text)


def test_request_filters() -> None:
    req = parse_place(["web", "zone=east", "node=fornax-*", "node!=fornax-03"])
    assert req.allows(NodeFacts("fornax-01", 2, 1 << 30, {"zone": "east"}))
    assert not req.allows(NodeFacts("fornax-03", 2, 1 << 30, {"zone": "east"}))
    assert not req.allows(NodeFacts("other", 2, 1 << 30, {"zone": "east"}))
    assert not req.allows(NodeFacts("fornax-02", 2, 1 << 30, {"zone": "west"}))


@given(st.text(max_size=80))
def test_any_text_is_a_command_or_a_clear_error(text: str) -> None:
    try:
        parse_command(text)
    except LangError as e:
        assert str(e)
    try:
        parse_policy(text)
    except LangError as e:
        assert str(e)


def test_cpu_and_mem_need_no_shell_quoting() -> None:
    # `echo place hello cpu>=2 > ctl` is a redirection in sh and rc; cpu=2 is the same constraint.
    assert parse_command("place hello cpu=2 mem=64M").request == parse_command("place hello cpu>=2 mem>=64M").request


# Characters where splitting at white space and splitting as a shell would can part ways.
_TRICKY = " \t\r\n\x0b\x0c\x1c\x1f\x85\xa0\u2003'\"\\#ab=-"


@given(st.text(alphabet=st.sampled_from(_TRICKY), max_size=40) | st.text(max_size=40))
def test_words_are_split_as_a_shell_splits_them(text: str) -> None:
    """The fast split of plain commands gives shlex's words, whatever the text holds."""
    import shlex

    from fornax_sched.sched.lang import _words

    try:
        want = shlex.split(text)
    except ValueError:
        with pytest.raises(LangError):
            _words(text)
        return
    assert _words(text) == want


def test_env_is_given_not_a_constraint() -> None:
    """env:KEY=VALUE goes to the container; env=VALUE is still a node label named env."""
    req = parse_command("place hello env:A=1 'env:B=x y' env=prod").request
    assert req is not None
    assert req.env == (("A", "1"), ("B", "x y")) and req.labels == (("env", "prod"),)
    assert "env:" not in req.constraints()
    from fornax_sched.sched.state import request_from_json, request_to_json

    assert request_from_json(request_to_json(req)) == req
    plain = parse_command("place hello").request
    assert plain is not None and "env" not in request_to_json(plain)  # (rows without env read as before)
