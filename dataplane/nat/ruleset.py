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
from typing import Callable, Hashable, Iterable, Mapping, NamedTuple

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
class Chain:
    name: str
    rules: tuple[str, ...] = ()
    base: str = ""  # "type nat hook prerouting priority dstnat" for base chains

    def declaration(self, family: str, table: str) -> str:
        spec = f" {{ {self.base} ; policy accept ; }}" if self.base else ""
        return f"add chain {family} {table} {self.name}{spec}"


@dataclass(frozen=True, slots=True)
class Container:
    """A named map or set; `spec` is what goes between the braces."""

    name: str
    spec: str
    kind: str = "map"  # "map" or "set"
    dynamic: bool = False  # filled by the packet path (affinity): a full sync keeps its elements

    def declaration(self, family: str, table: str) -> str:
        return f"add {self.kind} {family} {table} {self.name} {{ {self.spec} ; }}"


Declaration = Chain | Container


@dataclass(frozen=True, slots=True)
class Fragment:
    """What one owner contributes: elements, the shared declarations they
    need, and declarations of its own (its session-affinity chains and sets),
    which live and die with it."""

    elements: frozenset[Element] = frozenset()
    needs: frozenset[str] = frozenset()
    owned: tuple[Declaration, ...] = ()


EMPTY = Fragment()


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Ruleset:
    family: str  # "ip" or "ip6"
    table: str
    declarations: Mapping[str, Declaration]  # every declaration any owner may need
    always: frozenset[str]  # declarations present whatever the owners need
    fragments: Mapping[Hashable, Fragment] = field(default_factory=dict)
    # Lineage: the ruleset this one was built from, and the owners rebuilt since.
    previous: Callable[[], "Ruleset | None"] | None = None
    changed: frozenset[Hashable] | None = None


class Transaction:
    """An ordered batch of nft commands, applied atomically or not at all."""

    __slots__ = ("commands",)

    def __init__(self, commands: Iterable[str] = ()):
        self.commands: list[str] = list(commands)

    def add(self, command: str) -> None:
        self.commands.append(command)

    def extend(self, commands: Iterable[str]) -> None:
        self.commands.extend(commands)

    def __bool__(self) -> bool:
        return bool(self.commands)

    def __len__(self) -> int:
        return len(self.commands)

    def __str__(self) -> str:
        return "".join(f"{command}\n" for command in self.commands)
