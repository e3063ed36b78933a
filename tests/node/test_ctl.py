"""The node's ctl language: what parses, and the words a writer sees when it does not."""

from __future__ import annotations

import pytest

from fornax_sched.node.ctl import CtlError, parse


def test_run_with_args_and_limits() -> None:
    c = parse("run web 8081 mem=64M cpu=0.5 name=front\n")
    assert (c.verb, c.image, c.args, c.name) == ("run", "web", ["8081"], "front")
    assert c.limits.mem == 64 << 20 and c.limits.cpus == 0.5


def test_options_only_at_the_end_and_double_dash() -> None:
    c = parse("run hello mem=1M extra")
    assert c.args == ["mem=1M", "extra"] and c.limits.mem is None
    c = parse("run hello -- mem=1M")
    assert c.args == ["mem=1M"] and c.limits.mem is None
    c = parse("run hello 'two words' cpu=2")
    assert c.args == ["two words"] and c.limits.cpus == 2


@pytest.mark.parametrize("text, message", [
    ("", "empty command"),
    ("frobnicate", "unknown command 'frobnicate'"),
    ("run", "usage: run IMAGE"),
    ("run ../etc", "bad image name"),
    ("run hello mem=12Q", "12Q"),
    ("run hello cpu=lots", "bad cpu limit 'lots'"),
    ("run hello cpu=0", "must be above 0"),
    ("run hello mem=1M mem=2M", "mem= given twice"),
    ("stop", "usage: stop ID"),
    ("name", "usage: name NAME"),
    ("name a/b", "bad node name"),
    ("label zone", "bad label"),
    ("join now", "usage: join"),
    ("run hello 'unclosed", "cannot parse"),
])
def test_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(CtlError, match=message.replace("(", r"\(")):
        parse(text)


def test_simple_verbs() -> None:
    assert parse("join").verb == "join"
    assert parse("leave\n").verb == "leave"
    assert parse("name fornax-07").target == "fornax-07"
    assert (parse("stop 12").verb, parse("stop 12").target) == ("stop", "12")
    c = parse("label zone=east")
    assert (c.target, c.value) == ("zone", "east")
