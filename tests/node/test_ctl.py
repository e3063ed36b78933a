"""The node's ctl language: what parses, and the words a writer sees when it does not."""

from __future__ import annotations

import re

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
    ("run hello label=zone", "bad 'label=zone': want label=KEY=VALUE"),
    ("run hello label==east", "bad 'label==east'"),
    ("run hello label=zone=", "bad value '' of label zone"),
    ("run hello 'label=zone=two words'", "bad value 'two words' of label zone"),
    ("run hello label=-zone=east", "bad label key '-zone'"),
    ("run hello label=zone=a label=zone=b", "label zone given twice"),
    ("run hello env=GREETING", "bad 'env=GREETING': want env=KEY=VALUE"),
    ("run hello env=1X=y", "bad env name '1X'"),
    ("run hello env=A-B=y", "bad env name 'A-B'"),
    ("run hello env=FORNAX_NODE=elsewhere", "env FORNAX_NODE: FORNAX_ variables are set by the node"),
    ("run hello env=A=1 env=A=2", "env A given twice"),
    ("run hello " + " ".join(f"label=k{i}=v" for i in range(65)), "too many labels: 65 (at most 64)"),
    ("run hello label=k=" + "v" * 256, "at most 255"),
    ("run hello env=BIG=" + "x" * (64 << 10), "env too large"),
])
def test_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(CtlError, match=re.escape(message)):
        parse(text)


def test_simple_verbs() -> None:
    assert parse("join").verb == "join"
    assert parse("leave\n").verb == "leave"
    assert parse("name fornax-07").target == "fornax-07"
    assert (parse("stop 12").verb, parse("stop 12").target) == ("stop", "12")
    c = parse("label zone=east")
    assert (c.target, c.value) == ("zone", "east")


def test_run_labels_and_env() -> None:
    c = parse("run web 8081 mem=64M label=owner=fornax-sched label=rev=7 'env=GREETING=hello world' "
              "env=EMPTY= name=front env=URL=http://x/?a=b")
    assert c.args == ["8081"] and c.name == "front" and c.limits.mem == 64 << 20
    assert c.labels == {"owner": "fornax-sched", "rev": "7"}
    assert c.env == {"GREETING": "hello world", "EMPTY": "", "URL": "http://x/?a=b"}
    # a label value is one word of printable characters: '=' and unicode included
    assert parse("run hello label=a/b.c_d-e=x=y label=city=Zürich").labels == {"a/b.c_d-e": "x=y", "city": "Zürich"}
    # an env value is any text without NUL, newlines too
    assert parse("run hello 'env=MULTI=one\ntwo'").env == {"MULTI": "one\ntwo"}
    # only trailing words are options; after "--" they are arguments
    c = parse("run hello label=a=1 extra")
    assert c.args == ["label=a=1", "extra"] and c.labels == {}
    c = parse("run hello label=a=1 -- env=B=2 label=c=3")
    assert c.args == ["env=B=2", "label=c=3"] and c.labels == {"a": "1"} and c.env == {}
    assert parse("run hello env=fornax_lower=ok").env == {"fornax_lower": "ok"}  # (names are case-sensitive)
