"""The scheduler's two small languages, parsed into model objects; no effects.

ctl, one command per write::

    place IMAGE [CONSTRAINT ...] [-- ARG ...]
    migrate CONTAINER FROM TO | evacuate NODE | rebalance [MOVES]
    stop NAME | start NAME | remove NAME      (NAME: a container, or a group: all its replicas)
    cordon NODE | uncordon NODE | scale NAME REPLICAS
  join ADDR                                  (follow the node at ADDR too: tcp!HOST!PORT, persys!HOST:PORT...)
  forget NODE | forget ADDR                  (a dead node: drop it; a join not reached yet: stop trying)
  simulate place IMAGE [CONSTRAINT ...]      (what place would decide; nothing changes)
  policy history | policy restore VERSION

CONSTRAINT is ``cpu>=N``, ``mem>=SIZE`` (or ``cpu=N``, ``mem=SIZE``, which
need no quoting in a shell), ``KEY=VALUE`` (a node label some node has;
``label:KEY=VALUE`` for one no node has yet, to wait for it),
``node=GLOB`` / ``node!=GLOB`` (node names to use / avoid),
``anti-affinity=GLOB`` (no node already running a container whose name
matches), ``name=NAME`` and ``replicas=N``.  ``env:KEY=VALUE`` gives the
container a variable (the node's rules: fornax_sched.environ).  Words after
``--`` are passed to the image's command.

policy, one rule a line (``#`` comments)::

    spread | pack
    affinity COND ...          # COND: cpu>=N | mem>=SIZE | KEY=VALUE
    anti-affinity GLOB [spread]
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from ..environ import env_problem
from ..units import SizeError, parse_size
from .model import Affinity, AntiAffinity, Condition, Policy, Request

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
GLOB = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,64}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")
MAX_REPLICAS = 1000
RESTARTS = ("never", "on-failure", "always")  # restart= of a place
MAX_COMMAND = 16384  # characters of one ctl command

USAGE = """commands:
  place IMAGE [cpu>=N] [mem>=SIZE] [KEY=VALUE] [label:KEY=VALUE] [node=GLOB] [node!=GLOB] [anti-affinity=GLOB]
              [name=NAME] [replicas=N] [restart=always|on-failure|never] [env:KEY=VALUE] [-- ARG ...]
  migrate CONTAINER FROM TO | evacuate NODE | rebalance [MOVES]
  stop NAME | start NAME | remove NAME      (NAME: a container, or a group: all its replicas)
  cordon NODE | uncordon NODE | scale NAME REPLICAS
  join ADDR                                  (follow the node at ADDR too: tcp!HOST!PORT, persys!HOST:PORT...)
  simulate place IMAGE [CONSTRAINT ...]      (what place would decide; nothing changes)
  policy history | policy restore VERSION
  recover                                    (in recovery mode: write the last known state back to the store)
"""


class LangError(ValueError):
    """Text that is not a command or a policy: the message says what is wrong."""


@dataclass
class Command:
    verb: str
    request: Request | None = None  # place
    targets: list[str] = field(default_factory=list)  # containers, nodes
    count: int = 0  # rebalance moves, scale replicas, policy version
    user: str = ""  # who wrote it (set by the service)
    marked: tuple[str, ...] = ()  # label keys written label:KEY=VALUE (no node need have them yet)


_ARITY = {
    "migrate": ("CONTAINER FROM TO", 3), "evacuate": ("NODE", 1), "stop": ("NAME", 1),
    "start": ("NAME", 1), "remove": ("NAME", 1), "cordon": ("NODE", 1), "uncordon": ("NODE", 1),
}


def parse_command(text: str) -> Command:
    """Parse one ctl command; raise LangError saying what is wrong."""
    if len(text) > MAX_COMMAND:  # (and splitting a huge line into words would hold the server)
        raise LangError(f"command too long: {len(text)} characters (at most {MAX_COMMAND})")
    words = _words(text)
    if not words:
        raise LangError("empty command\n" + USAGE)
    verb, rest = words[0], words[1:]
    if verb == "place":
        req, marked = parse_place_marked(rest)
        return Command("place", request=req, marked=marked)
    if verb in _ARITY:
        what, n = _ARITY[verb]
        if len(rest) != n:
            raise LangError(f"usage: {verb} {what}")
        roles = {"CONTAINER": "container", "FROM": "source node", "TO": "target node", "NODE": "node",
                 "NAME": "container or group"}
        for w, role in zip(rest, what.split(), strict=True):
            if not NAME.match(w):
                raise LangError(f"{verb}: {w!r} is not a {roles[role]} name (letters, digits, '.', '_' and '-', "
                                f"at most 63); usage: {verb} {what}")
        return Command(verb, targets=rest)
    if verb == "join":
        if len(rest) != 1 or not rest[0].isprintable() or len(rest[0]) > 512:
            raise LangError("usage: join ADDR (a node's address: tcp!HOST!PORT, or persys!HOST:PORT[!...])")
        return Command(verb, targets=rest)
    if verb == "forget":
        if len(rest) != 1 or not rest[0].isprintable() or len(rest[0]) > 512:
            raise LangError("usage: forget NODE (a dead node) | forget ADDR (a join not reached yet)")
        return Command(verb, targets=rest)
    if verb == "recover":
        if rest:
            raise LangError("usage: recover")
        return Command(verb)
    if verb == "rebalance":
        if len(rest) > 1:
            raise LangError("usage: rebalance [MOVES]")
        return Command(verb, count=_count(rest[0], "moves", 1, 10000) if rest else 0)
    if verb == "scale":
        if len(rest) != 2:
            raise LangError("usage: scale NAME REPLICAS")
        _name(rest[0], "name")
        return Command(verb, targets=[rest[0]], count=_count(rest[1], "replicas", 0, MAX_REPLICAS))
    if verb == "simulate":
        if not rest or rest[0] != "place":
            raise LangError("usage: simulate place IMAGE [CONSTRAINT ...]")
        req, marked = parse_place_marked(rest[1:])
        return Command(verb, request=req, marked=marked)
    if verb == "policy":
        if rest == ["history"]:
            return Command(verb, targets=["history"])
        if len(rest) == 2 and rest[0] == "restore":
            return Command(verb, targets=["restore"], count=_count(rest[1].removeprefix("v"), "version", 1, 10**9))
        raise LangError("usage: policy history | policy restore VERSION")
    raise LangError(f"unknown command {verb!r}\n{USAGE}")


def parse_place(words: list[str]) -> Request:
    return parse_place_marked(words)[0]


def parse_place_marked(words: list[str]) -> tuple[Request, tuple[str, ...]]:
    """A place's request, and the label keys marked ``label:KEY=VALUE`` (meant even if no node has them)."""
    if not words:
        raise LangError("usage: place IMAGE [CONSTRAINT ...] [-- ARG ...]")
    image = _name(words[0], "image")
    rest = words[1:]
    args: list[str] = []
    if "--" in rest:
        cut = rest.index("--")
        rest, args = rest[:cut], rest[cut + 1 :]
    cpus, mem, replicas, name, restart = 0.0, 0, 1, "", "never"
    labels: list[tuple[str, str]] = []
    include: list[str] = []
    exclude: list[str] = []
    avoid: list[str] = []
    marked: list[str] = []
    env: dict[str, str] = {}
    seen: set[str] = set()
    for w in rest:
        if w.startswith("env:"):  # what the container is given, not where it goes
            key, eq, value = w[len("env:"):].partition("=")
            if not eq:
                raise LangError(f"bad env {w!r}: want env:KEY=VALUE")
            if key in env:
                raise LangError(f"env {key} given twice")
            env[key] = value
            continue
        explicit = w.startswith("label:")
        if explicit:
            w = w[len("label:"):]
        key, op, value = _split(w)
        if explicit:
            if op != "=" or not LABEL_KEY.match(key) or not value or " " in value:
                raise LangError(f"bad label constraint {'label:' + w!r}: want label:KEY=VALUE")
            labels.append((key, value))
            marked.append(key)
            continue
        if key in ("cpu", "mem", "name", "replicas", "restart") and key in seen:
            raise LangError(f"{key} given twice")
        seen.add(key)
        if key == "cpu" and op in (">=", "="):  # cpu=N: the same, and no quoting in a shell
            cpus = _cpus(value, w)
        elif key == "mem" and op in (">=", "="):
            mem = _size(value, w)
        elif key == "node" and op in ("=", "!="):
            (include if op == "=" else exclude).append(_glob(value, w))
        elif key == "anti-affinity" and op == "=":
            avoid.append(_glob(value, w))
        elif key == "name" and op == "=":
            name = _name(value, "container name")
        elif key == "replicas" and op == "=":
            replicas = _count(value, "replicas", 1, MAX_REPLICAS)
        elif key == "restart" and op == "=":
            if value not in RESTARTS:
                raise LangError(f"bad restart policy {w!r}: want restart=always, restart=on-failure or restart=never")
            restart = value
        elif op == "=" and LABEL_KEY.match(key) and key not in ("cpu", "mem"):
            if not value or " " in value:
                raise LangError(f"bad label constraint {w!r}: want KEY=VALUE")
            labels.append((key, value))
        else:
            raise LangError(f"unknown constraint {w!r}: want cpu>=N (or cpu=N), mem>=SIZE (or mem=SIZE), "
                            "KEY=VALUE, node=GLOB, "
                            "node!=GLOB, anti-affinity=GLOB, name=NAME, replicas=N, restart=POLICY "
                            "or env:KEY=VALUE (arguments go after --)")
    why = env_problem(env)
    if why is not None:
        raise LangError(why)
    return Request(image=image, args=tuple(args), name=name, replicas=replicas, cpus=cpus, mem=mem,
                   labels=tuple(labels), include=tuple(include), exclude=tuple(exclude),
                   avoid=tuple(avoid), restart=restart, env=tuple(env.items())), tuple(marked)


def parse_policy(text: str) -> Policy:
    """Parse a policy file; errors name the line.  An empty policy is ``spread``."""
    base: str | None = None
    rules: list[Affinity | AntiAffinity] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            words = _words(line)
            head, rest = words[0], words[1:]
            if head in ("spread", "pack"):
                if rest:
                    raise LangError(f"{head} takes nothing after it")
                if base is not None:
                    raise LangError(f"a second base policy ({head}; {base} came first)")
                base = head
            elif head == "affinity":
                if not rest:
                    raise LangError("affinity needs conditions: cpu>=N, mem>=SIZE or KEY=VALUE")
                rules.append(Affinity(tuple(_condition(w) for w in rest)))
            elif head == "anti-affinity":
                if not rest or len(rest) > 2 or (len(rest) == 2 and rest[1] != "spread"):
                    raise LangError("usage: anti-affinity GLOB [spread]")
                rules.append(AntiAffinity(_glob(rest[0], rest[0])))
            else:
                raise LangError(f"unknown rule {head!r}: want spread, pack, affinity or anti-affinity")
        except LangError as e:
            raise LangError(f"line {number}: {e}") from None
    return Policy(base or "spread", tuple(rules))


# ---------------------------------------------------------------- pieces


# What makes shell-like splitting differ from splitting at white space: quotes, escapes, and
# characters str.split takes for white space but shlex does not (non-ASCII ones aside).
_SHELL_LIKE = re.compile(r"[\"'\\\x0b\x0c\x1c-\x1f]")


def _words(text: str) -> list[str]:
    """The command's words, split as a shell would (quotes and backslashes as in sh)."""
    if text.isascii() and _SHELL_LIKE.search(text) is None:
        return text.split()  # (the same words; shlex takes most of a place's parsing otherwise)
    try:
        return shlex.split(text)
    except ValueError as e:
        raise LangError(f"cannot parse {text.strip()!r}: {e}") from None


def _split(word: str) -> tuple[str, str, str]:
    for op in (">=", "!=", "="):
        key, sep, value = word.partition(op)
        if sep and key:
            return key, op, value
    return word, "", ""


def _condition(word: str) -> Condition:
    key, op, value = _split(word)
    if key == "cpu" and op == ">=":
        return Condition("cpu", amount=_cpus(value, word))
    if key == "mem" and op == ">=":
        return Condition("mem", amount=_size(value, word))
    if op == "=" and LABEL_KEY.match(key) and value:
        return Condition("label", key=key, value=value)
    raise LangError(f"bad condition {word!r}: want cpu>=N, mem>=SIZE or KEY=VALUE")


def _name(word: str, what: str) -> str:
    if not NAME.match(word):
        raise LangError(f"bad {what} {word!r}: letters, digits, '.', '_' and '-', at most 63")
    return word


def _glob(word: str, whole: str) -> str:
    if not GLOB.match(word):
        raise LangError(f"bad name pattern in {whole!r}")
    return word


def _cpus(value: str, whole: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise LangError(f"bad cpu constraint {whole!r}: want a number of CPUs such as 0.5 or 2") from None
    if not 0 < n <= 4096:
        raise LangError(f"bad cpu constraint {whole!r}: must be above 0 and at most 4096")
    return n


def _size(value: str, whole: str) -> int:
    try:
        return parse_size(value, "memory")
    except SizeError as e:
        raise LangError(f"bad mem constraint {whole!r}: {e.reason}") from None


def _count(value: str, what: str, low: int, high: int) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise LangError(f"bad {what} {value!r}: want a whole number from {low} to {high}")
    return int(value)


def format_place(req: Request) -> str:
    """A request written back as the place command that makes it (for the log and history)."""
    words = ["place", req.image]
    cons = req.constraints()
    if cons:
        words.append(cons)
    if req.name:
        words.append(f"name={req.name}")
    if req.replicas != 1:
        words.append(f"replicas={req.replicas}")
    if req.restart != "never":
        words.append(f"restart={req.restart}")
    words += [shlex.quote(f"env:{k}={v}") for k, v in req.env]
    if req.args:
        words += ["--", *(shlex.quote(a) for a in req.args)]
    return " ".join(words)
