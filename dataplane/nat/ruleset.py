"""Ruleset values: what the kernel should hold, and transactions that get it there.

A Ruleset is a set of named declarations (chains, maps, sets) plus, per owner
(a Service, or the node itself), a Fragment: the map and set elements that
owner contributes and the declarations those elements need. The kernel holds
the union of all fragments. A Transaction is an ordered list of nft commands
whose str() is exactly the text `nft -f -` receives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Collection, Hashable, Iterable, Mapping, NamedTuple

from .expr import Rule

_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9._:/-]")


def safe_comment(text: str) -> str:
    """Comment text from untrusted names: only characters nft cannot misread."""
    return _COMMENT_UNSAFE.sub("_", text)[:120]


class Element(NamedTuple):
    """A map or set element; a tuple, because there are hundreds of thousands."""

    container: str  # map or set name
    key: str  # nft text of the key, e.g. "10.96.0.1 . tcp . 80"
    value: str = ""  # nft text of the mapped value; empty for set elements
    comment: str = ""

    def text(self) -> str:
        comment = f' comment "{safe_comment(self.comment)}"' if self.comment else ""
        value = f" : {self.value}" if self.value else ""
        return f"{self.key}{comment}{value}"


@dataclass(frozen=True, slots=True)
class BaseChain:
    """Where a base chain hooks in: `type nat hook prerouting priority -100`."""

    type: str  # filter, nat
    hook: str
    priority: int
    policy: str = "accept"  # what a packet that falls off the chain's end gets

    def __str__(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.priority}"


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    rules: tuple[Rule, ...] = ()
    base: BaseChain | None = None

    def declaration(self, family: str, table: str) -> str:
        spec = f" {{ {self.base} ; policy {self.base.policy} ; }}" if self.base else ""
        return f"add chain {family} {table} {self.name}{spec}"

    @property
    def picks(self) -> bool:
        """Some rule of this chain picks an endpoint at random (expr.Rule.picks)."""
        return any(rule.picks for rule in self.rules)


@dataclass(frozen=True, slots=True)
class Container:
    """A named map, set or counter.

    `key` and `value` are datatype names (`ipv4_addr`, `inet_service`,
    `verdict`), or, with `typeof`, expressions whose types the kernel takes.
    """

    name: str
    key: tuple = ()
    value: tuple = ()  # a map's value; empty for a set
    kind: str = "map"  # "map", "set" or "counter"
    typeof: bool = False
    flags: tuple[str, ...] = ()
    timeout: int = 0  # seconds; 0: elements never expire
    dynamic: bool = False  # filled by the packet path (affinity): a full sync keeps its elements

    @property
    def spec(self) -> str:
        """What goes between the braces of the declaration."""
        if self.kind == "counter":
            return "packets 0 bytes 0"
        word = "typeof" if self.typeof else "type"
        text = f"{word} {' . '.join(map(str, self.key))}"
        if self.value:
            text += f" : {' . '.join(map(str, self.value))}"
        if self.flags:
            text += f" ; flags {','.join(self.flags)}"
        if self.timeout:
            text += f" ; timeout {self.timeout}s"
        return text

    def declaration(self, family: str, table: str) -> str:
        return f"add {self.kind} {family} {table} {self.name} {{ {self.spec} ; }}"


Declaration = Chain | Container


@dataclass(frozen=True, slots=True)
class Fragment:
    """What one owner contributes: elements, the shared declarations they
    need, and declarations of its own (its session-affinity chains and sets),
    which live and die with it.

    `elements` holds each element once, as a tuple in the order they were
    rendered (a fifth of a frozenset's memory, and 10,000 Services keep
    130,000 elements alive) or as a frozenset: equal fragments render equal,
    and the planner compares the elements of unequal ones as sets."""

    elements: Collection[Element] = frozenset()
    needs: frozenset[Hashable] = frozenset()  # groups of shared declarations (layout.Need), by value
    owned: tuple[Declaration, ...] = ()


EMPTY = Fragment()


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Ruleset:
    family: str  # "ip" or "ip6"
    table: str
    declarations: Mapping[str, Declaration]  # every declaration any owner may need
    always: frozenset[str]  # declarations present whatever the owners need
    fragments: Mapping[Hashable, Fragment] = field(default_factory=dict)
    groups: Mapping[Hashable, tuple[str, ...]] = field(default_factory=dict)  # a need -> the declarations it names
    # Lineage: the ruleset this one was built from, and the owners rebuilt since.
    previous: Callable[[], "Ruleset | None"] | None = None
    changed: frozenset[Hashable] | None = None


@dataclass(frozen=True, slots=True)
class Table:
    family: str  # ip, ip6
    name: str

    def __str__(self) -> str:
        return f"{self.family} {self.name}"


@dataclass(frozen=True, slots=True)
class AddRule:
    """A rule appended to a chain."""

    chain: str
    rule: Rule


@dataclass(frozen=True, slots=True)
class Elements:
    """Elements of one map or set, added or deleted together."""

    container: str
    elements: tuple[Element, ...]


Subject = Chain | Container | AddRule | Elements | None  # None: the table itself


@dataclass(frozen=True, slots=True)
class Operation:
    """One nft command: a verb (add, delete, flush) on the table or an object in it."""

    verb: str
    table: Table
    subject: Subject = None

    def __str__(self) -> str:
        verb, table, subject = self.verb, self.table, self.subject
        if subject is None:
            return f"{verb} table {table}"
        if isinstance(subject, AddRule):
            return f"add rule {table} {subject.chain} {subject.rule}"
        if isinstance(subject, Elements):
            # Deleting takes the key alone; adding takes key, comment and value. One element a line:
            # reviewable golden files and readable logs.
            texts = (e.key if verb == "delete" else e.text() for e in subject.elements)
            return f"{verb} element {table} {subject.container} {{\n\t" + ",\n\t".join(texts) + "\n}"
        if verb == "add":
            return subject.declaration(table.family, table.name)
        kind = "chain" if isinstance(subject, Chain) else subject.kind
        return f"{verb} {kind} {table} {subject.name}"


class Transaction:
    """An ordered batch of typed operations, applied atomically or not at all; `str()` is
    exactly the text `nft -f -` receives."""

    __slots__ = ("commands",)

    def __init__(self, commands: Iterable[Operation] = ()):
        self.commands: list[Operation] = list(commands)

    def add(self, command: Operation) -> None:
        self.commands.append(command)

    def extend(self, commands: Iterable[Operation]) -> None:
        self.commands.extend(commands)

    def __bool__(self) -> bool:
        return bool(self.commands)

    def __len__(self) -> int:
        return len(self.commands)

    def __iter__(self):
        return iter(self.commands)

    def element_count(self) -> int:
        return sum(len(c.subject.elements) for c in self.commands if isinstance(c.subject, Elements))

    def __str__(self) -> str:
        return "".join(f"{command}\n" for command in self.commands)
