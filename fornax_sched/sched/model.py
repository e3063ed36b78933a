"""What the scheduler decides about: requests and policies, as plain data.

No I/O here and no behaviour beyond matching: the deciding core, the store
and the file tree all share these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from ..units import format_size


@dataclass(frozen=True)
class NodeFacts:
    """What a constraint or an affinity rule may look at on a node."""

    name: str
    cpus: float
    mem: int  # bytes
    labels: dict[str, str] = field(default_factory=dict)
    kind: str = "fornax"  # fornax (9P) | persys (gRPC agent) | sim: policies may tell them apart


@dataclass(frozen=True)
class Condition:
    """A test on a node: ``cpu>=N``, ``mem>=SIZE`` or ``KEY=VALUE`` (a label)."""

    kind: str  # "cpu" | "mem" | "label"
    key: str = ""
    value: str = ""
    amount: float = 0

    def holds(self, node: NodeFacts) -> bool:
        if self.kind == "cpu":
            return node.cpus >= self.amount
        if self.kind == "mem":
            return node.mem >= self.amount
        return node.labels.get(self.key) == self.value

    def __str__(self) -> str:
        if self.kind == "cpu":
            return f"cpu>={self.amount:g}"
        if self.kind == "mem":
            return f"mem>={format_size(int(self.amount))}"
        return f"{self.key}={self.value}"


@dataclass(frozen=True)
class Request:
    """One ``place``: what to run and where it may go.

    ``cpus``/``mem`` are what each replica reserves on its node (from
    ``cpu>=N``/``mem>=SIZE``); ``labels`` must all be on the node; a node's
    name must match one ``include`` glob (if any) and no ``exclude`` glob;
    ``avoid`` globs name containers this one must not share a node with;
    ``env`` is what the container is given (``env:KEY=VALUE``), not a constraint.
    """

    image: str
    args: tuple[str, ...] = ()
    name: str = ""  # the container name, or the stem of replica names
    replicas: int = 1
    cpus: float = 0.0
    mem: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()
    restart: str = "never"  # never | on-failure | always: what to do when the container ends on its own
    env: tuple[tuple[str, str], ...] = ()  # the container's own variables, in the order given

    def allows(self, node: NodeFacts) -> bool:
        """The static filters (name globs, labels); capacity is the core's business."""
        if not (self.include or self.exclude or self.labels):
            return True  # (most places have none, and every decision asks of every node)
        if self.include and not any(fnmatchcase(node.name, g) for g in self.include):
            return False
        if any(fnmatchcase(node.name, g) for g in self.exclude):
            return False
        return all(node.labels.get(k) == v for k, v in self.labels)

    def constraints(self) -> str:
        """The constraints as the user would write them again."""
        words = []
        if self.cpus:
            words.append(f"cpu>={self.cpus:g}")
        if self.mem:
            words.append(f"mem>={format_size(self.mem)}")
        words += [f"{k}={v}" for k, v in self.labels]
        words += [f"node={g}" for g in self.include]
        words += [f"node!={g}" for g in self.exclude]
        words += [f"anti-affinity={g}" for g in self.avoid]
        return " ".join(words)


@dataclass(frozen=True)
class Affinity:
    """``affinity COND ...``: prefer nodes where every condition holds."""

    conditions: tuple[Condition, ...]

    def __str__(self) -> str:
        return "affinity " + " ".join(str(c) for c in self.conditions)


@dataclass(frozen=True)
class AntiAffinity:
    """``anti-affinity GLOB spread``: containers whose names match are spread apart."""

    glob: str

    def __str__(self) -> str:
        return f"anti-affinity {self.glob} spread"


@dataclass(frozen=True)
class Policy:
    """The active policy: a base order (spread: fewest containers first; pack:
    most first), refined first by the affinity rules (a node matching an
    earlier rule wins) and then by the anti-affinity rules (fewest matching
    containers wins); see fornax_sched.sched.core."""

    base: str = "spread"
    rules: tuple[Affinity | AntiAffinity, ...] = ()

    def text(self) -> str:
        return "\n".join([self.base, *(str(r) for r in self.rules)]) + "\n"
