"""The tables the fake holds: plain containers, copied per object when a transaction writes them.

Chains keep the Rule values they were given (expr.Rule), never their text;
sets keep canonical values (values.py). A committed TableState is never
edited: a transaction works on shallow copies (executor.Work) and the
copies replace the committed tables only when it succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..expr import Rule
from ..ruleset import BaseChain, Container
from .errors import Failed
from .values import SET_TYPES, key_matches

SET_FLAGS = ("interval", "dynamic", "timeout", "constant")


@dataclass(frozen=True, slots=True)
class SetSpec:
    kind: str  # set, map
    key: tuple[str, ...]  # datatype names
    data: tuple[str, ...] | None  # ("verdict",) for verdict maps; None for sets
    flags: frozenset[str] = frozenset()
    timeout: int | None = None  # seconds
    text: str = ""  # the type or typeof clause, as declared

    def lines(self) -> list[str]:
        out = [self.text]
        if self.flags:
            out.append(f"flags {','.join(sorted(self.flags))}")
        if self.timeout is not None:
            out.append(f"timeout {self.timeout}s")
        return out

    @property
    def interval(self) -> bool:
        return "interval" in self.flags

    def shape(self) -> tuple:
        return self.kind, self.key, self.data, self.flags

    @classmethod
    def of(cls, container: Container) -> SetSpec:
        """The spec a declaration asks for; raises Failed for one the kernel would refuse."""
        word = "typeof" if container.typeof else "type"
        if not container.key:
            raise Failed(f"syntax error, the {container.kind} has no type")
        if container.kind == "map" and not container.value:
            raise Failed("syntax error, a map needs a data type (type KEY : DATA)")
        if container.kind == "set" and container.value:
            raise Failed("syntax error, a set has no data type (declare a map)")
        key = _types(container.key, container.typeof, data=False)
        data = _types(container.value, container.typeof, data=True) if container.value else None
        unknown = sorted(set(container.flags) - set(SET_FLAGS))
        if unknown:
            raise Failed(f"syntax error, unknown set flag {unknown[0]!r}, expecting {' or '.join(SET_FLAGS)}")
        text = f"{word} {' . '.join(map(str, container.key))}"
        if container.value:
            text += f" : {' . '.join(map(str, container.value))}"
        flags = frozenset(container.flags)
        if container.timeout:
            flags |= {"timeout"}  # as the kernel records it: a default timeout makes a timeout set
        return cls(container.kind, key, data, flags, container.timeout or None, text)


def _types(parts: tuple, typeof: bool, data: bool) -> tuple[str, ...]:
    if data and parts == ("verdict",):
        return ("verdict",)
    if typeof:
        if not all(hasattr(part, "type") for part in parts):
            raise Failed(f"syntax error, typeof takes expressions, not {' . '.join(map(str, parts))}")
        return tuple(part.type for part in parts)
    for part in parts:
        if part not in SET_TYPES:
            raise Failed(f"syntax error, unexpected {str(part)!r}, expecting {' or '.join(SET_TYPES)}")
    return tuple(parts)


class HeldElement(NamedTuple):
    value: Any  # tuple of components, a Verdict, or None for sets
    comment: str = ""
    expires: float | None = None  # on the tracer's clock; None: never


class SetState:
    __slots__ = ("elements", "name", "spec")

    def __init__(self, name: str, spec: SetSpec, elements: dict[tuple, HeldElement] | None = None):
        self.name = name
        self.spec = spec
        self.elements: dict[tuple, HeldElement] = elements if elements is not None else {}

    @property
    def kind(self) -> str:
        return self.spec.kind

    def copy(self) -> SetState:
        return SetState(self.name, self.spec, dict(self.elements))

    def lookup(self, value: tuple, now: float | None = None) -> HeldElement | None:
        """The element whose key holds `value`; expired ones only count when `now` is None."""
        element = self.elements.get(value)
        if element is None and self.spec.interval:
            element = next((e for k, e in self.elements.items() if key_matches(k, value)), None)
        if element is not None and now is not None and element.expires is not None and element.expires <= now:
            return None
        return element


class ChainState:
    __slots__ = ("base", "name", "rules")

    def __init__(self, name: str, base: BaseChain | None, rules: list[Rule] | None = None):
        self.name = name
        self.base = base
        self.rules: list[Rule] = rules if rules is not None else []

    def copy(self) -> ChainState:
        return ChainState(self.name, self.base, list(self.rules))


class TableState:
    __slots__ = ("chains", "counters", "family", "name", "sets")

    def __init__(self, family: str, name: str):
        self.family = family
        self.name = name
        self.chains: dict[str, ChainState] = {}
        self.sets: dict[str, SetState] = {}
        self.counters: frozenset[str] = frozenset()  # named counters (their counts are not modelled)

    def shallow_copy(self) -> TableState:
        table = TableState(self.family, self.name)
        table.chains, table.sets, table.counters = dict(self.chains), dict(self.sets), self.counters
        return table


class Learned(NamedTuple):
    """A packet-path update of a dynamic set: `update @set { ip saddr }` ran."""

    family: str
    table: str
    set: str
    key: tuple
    expires: float
