"""The command language of a node's /cluster/ctl: parsing only, no effects.

One command per write, plain words:

    join | leave | name NAME
    run IMAGE [ARG ...] [mem=SIZE] [cpu=N] [name=NAME] [label=KEY=VALUE ...] [env=KEY=VALUE ...]
    stop ID | kill ID | destroy ID
    label KEY=VALUE | unlabel KEY

Trailing ``key=value`` words with a known key are options of ``run``; ``--``
ends the arguments, so an argument that looks like an option can be passed.
``label=`` and ``env=`` may be repeated, once per key.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from .runtime import LABEL_KEY, ContainerError, Limits, check_env, check_labels, parse_size

RUN_OPTIONS = ("mem", "cpu", "name", "label", "env")
REPEATABLE = ("label", "env")  # KEY=VALUE options, once per key
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
RUN_USAGE = "run IMAGE [ARG ...] [mem=SIZE] [cpu=N] [name=NAME] [label=KEY=VALUE ...] [env=KEY=VALUE ...]"

USAGE = f"""commands:
  {RUN_USAGE}
  stop ID | kill ID | destroy ID
  name NAME | join | leave
  label KEY=VALUE | unlabel KEY
"""


class CtlError(ValueError):
    """A command that cannot be parsed: the message is what the writer sees."""


@dataclass
class Command:
    verb: str
    image: str = ""
    args: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)  # run's label= options
    env: dict[str, str] = field(default_factory=dict)  # run's env= options
    target: str = ""  # container id, node name, label key
    value: str = ""  # label value


def parse(text: str) -> Command:
    """Parse one command; raise CtlError saying what is wrong."""
    try:
        words = shlex.split(text, comments=False)
    except ValueError as e:
        raise CtlError(f"cannot parse {text.strip()!r}: {e}") from None
    if not words:
        raise CtlError("empty command; " + USAGE.splitlines()[0])
    verb, rest = words[0], words[1:]
    if verb == "run":
        return _run(rest)
    if verb in ("join", "leave"):
        _arity(verb, rest, 0)
        return Command(verb)
    if verb in ("stop", "kill", "destroy"):
        _arity(verb, rest, 1, "ID")
        return Command(verb, target=rest[0])
    if verb == "name":
        _arity(verb, rest, 1, "NAME")
        if not _NAME.match(rest[0]):
            raise CtlError(f"bad node name {rest[0]!r}: letters, digits, '.', '_' and '-', at most 63")
        return Command(verb, target=rest[0])
    if verb == "label":
        _arity(verb, rest, 1, "KEY=VALUE")
        key, sep, value = rest[0].partition("=")
        if not sep or not LABEL_KEY.fullmatch(key) or not value or " " in value:
            raise CtlError(f"bad label {rest[0]!r}: want KEY=VALUE")
        return Command(verb, target=key, value=value)
    if verb == "unlabel":
        _arity(verb, rest, 1, "KEY")
        return Command(verb, target=rest[0])
    raise CtlError(f"unknown command {verb!r}\n{USAGE}")


def _arity(verb: str, rest: list[str], n: int, what: str = "") -> None:
    if len(rest) != n:
        raise CtlError(f"usage: {verb} {what}".rstrip())


def _run(words: list[str]) -> Command:
    if not words:
        raise CtlError(f"usage: {RUN_USAGE}")
    image, rest = words[0], words[1:]
    if not _NAME.match(image):
        raise CtlError(f"bad image name {image!r}")
    options: dict[str, str] = {}
    pairs: dict[str, dict[str, str]] = {k: {} for k in REPEATABLE}
    if "--" in rest:
        cut = rest.index("--")
        args, tail = rest[:cut], rest[cut + 1 :]
        options_words, args = _split_options(args)
        args = args + tail
    else:
        options_words, args = _split_options(rest)
    for w in options_words:
        key, _, value = w.partition("=")
        if key in pairs:
            k, sep, v = value.partition("=")
            if not sep or not k:
                raise CtlError(f"bad {w!r}: want {key}=KEY=VALUE")
            if k in pairs[key]:
                raise CtlError(f"{key} {k} given twice")
            pairs[key][k] = v
            continue
        if key in options:
            raise CtlError(f"{key}= given twice")
        options[key] = value
    cmd = Command("run", image=image, args=args)
    try:
        cmd.labels = check_labels(pairs["label"])
        cmd.env = check_env(pairs["env"])
    except ContainerError as e:
        raise CtlError(str(e)) from None
    try:
        if "mem" in options:
            cmd.limits.mem = parse_size(options["mem"])
    except ContainerError as e:
        raise CtlError(str(e)) from None
    if "cpu" in options:
        try:
            cpus = float(options["cpu"])
        except ValueError:
            raise CtlError(f"bad cpu limit {options['cpu']!r}: want a number of CPUs such as 0.5 or 2") from None
        if not 0 < cpus <= 1024:
            raise CtlError(f"bad cpu limit {options['cpu']!r}: must be above 0 and at most 1024")
        cmd.limits.cpus = cpus
    if "name" in options:
        if not _NAME.match(options["name"]):
            raise CtlError(f"bad container name {options['name']!r}")
        cmd.name = options["name"]
    return cmd


def _split_options(words: list[str]) -> tuple[list[str], list[str]]:
    """Peel known key=value words off the end of the argument list."""
    i = len(words)
    while i > 0 and words[i - 1].partition("=")[0] in RUN_OPTIONS and "=" in words[i - 1]:
        i -= 1
    return words[i:], words[:i]
