"""nftables rules as typed values: what the layout builds, the fake executes and the tracer interprets.

Invariant: `str()` of every value is the nft syntax the kernel's parser
reads for it, and the fake's parser (nat/fake/parser.py) turns that text back into
an equal value. So a rule is built once, as data, and is never found or
understood again by matching its text: code that needs to know whether a
rule picks an endpoint asks its statements (`Rule.picks`), not its string.

Literal values are canonical Python values: addresses as ipaddress objects,
protocols and ports as ints, flag values (ct state, fib type) as frozensets,
ranges as Interval.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, NamedTuple

PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
ADDRESS_TYPES = {"ipv4_addr": 4, "ipv6_addr": 6}


class Interval(NamedTuple):
    """A range inside an interval set or an anonymous set: a CIDR, or `a-b`."""

    lo: Any
    hi: Any

    def holds(self, value: Any) -> bool:
        return type(value) is type(self.lo) and self.lo <= value <= self.hi


def literal(type_: str, value: Any) -> str:
    """The nft text of one literal component of type `type_`."""
    if isinstance(value, Interval):
        if type_ in ADDRESS_TYPES:
            networks = list(ipaddress.summarize_address_range(value.lo, value.hi))
            return str(networks[0]) if len(networks) == 1 else f"{value.lo}-{value.hi}"
        return f"{value.lo}-{value.hi}"
    if type_ == "inet_proto":
        return PROTOCOL_NAMES.get(value, str(value))
    if type_ == "mark":
        return f"0x{value:x}" if value else "0"
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    return str(value)


def _key(types: tuple[str, ...], key: tuple) -> str:
    return " . ".join(literal(t, v) for t, v in zip(types, key))


# ---------------------------------------------------------------------------------------------
# Expressions


@dataclass(frozen=True, slots=True)
class Selector:
    """A packet field or meta value: `ip daddr`, `meta l4proto`, `numgen random mod 4`..."""

    text: str
    type: str
    family: str = ""  # "ip" or "ip6" for address selectors
    protocol: int = 0  # tcp/udp/sctp dport: implies a transport protocol match
    modulus: int = 0  # numgen

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class BinOp:
    """`meta mark & 0x4000`: a selector (or BinOp) combined with a constant."""

    left: Selector | BinOp
    op: str  # &, |, ^
    value: int

    @property
    def type(self) -> str:
        return self.left.type

    @property
    def modulus(self) -> int:
        return 0

    def __str__(self) -> str:
        return f"{self.left} {self.op} 0x{self.value:x}"


Expr = tuple  # a concatenation: tuple of Selector | BinOp | Jhash


def expr_text(expr: Expr) -> str:
    return " . ".join(map(str, expr))


def expr_types(expr: Expr) -> tuple[str, ...]:
    return tuple(part.type for part in expr)


def saddr(family: str) -> Selector:
    return Selector(f"{family} saddr", "ipv4_addr" if family == "ip" else "ipv6_addr", family)


def daddr(family: str) -> Selector:
    return Selector(f"{family} daddr", "ipv4_addr" if family == "ip" else "ipv6_addr", family)


L4PROTO = Selector("meta l4proto", "inet_proto")
DPORT = Selector("th dport", "inet_service")
SPORT = Selector("th sport", "inet_service")
MARK = Selector("meta mark", "mark")
CT_STATE = Selector("ct state", "ct_state")
CT_STATUS = Selector("ct status", "ct_status")
FIB_SADDR_TYPE = Selector("fib saddr type", "fib_addrtype")


@dataclass(frozen=True, slots=True)
class Jhash:
    """`jhash ip saddr . th sport mod 1021 seed 0x1`: a slot from the flow's own fields, the same for
    every packet of it and on every node with the same seed (a balancing table's pick: nat/tables.py).

    The kernel computes `reciprocal_scale(jhash(registers, len, seed), mod)` over the inputs'
    registers (each input padded to 4 bytes); lb/tables.slot_of is the same computation.
    """

    inputs: Expr
    mod: int
    seed: int

    @property
    def type(self) -> str:
        return "integer"

    @property
    def modulus(self) -> int:
        return 0  # numgen's random modulus; a hash is not random

    def __str__(self) -> str:
        return f"jhash {expr_text(self.inputs)} mod {self.mod} seed 0x{self.seed:x}"


@dataclass(frozen=True, slots=True)
class Lookup:
    """`ip daddr . meta l4proto . th dport map @table-ids`: what a named map holds for the key.
    A miss ends the rule, as the kernel's lookup does."""

    expr: Expr
    map: str

    @property
    def type(self) -> str:
        return "mark"

    @property
    def modulus(self) -> int:
        return 0

    def __str__(self) -> str:
        return f"{expr_text(self.expr)} map @{self.map}"


def numgen(modulus: int) -> Selector:
    """`numgen random mod n`: a uniform slot in 0..n-1, new for every packet that reaches it."""
    return Selector(f"numgen random mod {modulus}", "integer", modulus=modulus)


# ---------------------------------------------------------------------------------------------
# Statements


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # accept, drop, return, continue, jump, goto
    chain: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.chain}" if self.chain else self.kind


@dataclass(frozen=True, slots=True)
class SetRef:
    name: str

    def __str__(self) -> str:
        return f"@{self.name}"


@dataclass(frozen=True, slots=True)
class AnonSet:
    keys: tuple[tuple, ...]


@dataclass(frozen=True, slots=True)
class AnonMap:
    entries: tuple[tuple[tuple, Any], ...]  # (key, value)


@dataclass(frozen=True, slots=True)
class Match:
    expr: Expr
    op: str  # "" (implicit), "==", "!=", "!"
    right: tuple | SetRef | AnonSet  # a literal key, a named set, an anonymous set

    def __str__(self) -> str:
        left = expr_text(self.expr)
        op = f" {self.op}" if self.op else ""
        right = self.right
        if isinstance(right, SetRef):
            text = str(right)
        elif isinstance(right, AnonSet):
            types = expr_types(self.expr)
            text = "{ " + ", ".join(_key(types, key) for key in right.keys) + " }"
        else:
            text = _key(expr_types(self.expr), right)
        return f"{left}{op} {text}"


@dataclass(frozen=True, slots=True)
class Vmap:
    expr: Expr
    map: SetRef | AnonMap

    def __str__(self) -> str:
        if isinstance(self.map, SetRef):
            target = str(self.map)
        else:
            types = expr_types(self.expr)
            target = "{ " + ", ".join(f"{_key(types, key)} : {value}" for key, value in self.map.entries) + " }"
        return f"{expr_text(self.expr)} vmap {target}"


@dataclass(frozen=True, slots=True)
class SetMeta:
    target: Selector  # meta mark, ct mark
    value: Selector | BinOp | Lookup | int

    def __str__(self) -> str:
        value = literal("mark", self.value) if isinstance(self.value, int) else str(self.value)
        return f"{self.target} set {value}"


@dataclass(frozen=True, slots=True)
class SetUpdate:
    op: str  # update, add
    set: str
    expr: Expr

    def __str__(self) -> str:
        return f"{self.op} @{self.set} {{ {expr_text(self.expr)} }}"


@dataclass(frozen=True, slots=True)
class Nat:
    kind: str  # dnat
    family: str
    address: Any = None  # fixed target address
    port: int | None = None
    expr: Expr = ()  # mapped target: expr map @map
    map: str = ""

    def __str__(self) -> str:
        if self.map:
            return f"{self.kind} {self.family} to {expr_text(self.expr)} map @{self.map}"
        address = f"[{self.address}]" if self.family == "ip6" and self.port is not None else str(self.address)
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.kind} {self.family} to {address}{port}"

    @property
    def picks(self) -> bool:
        """A dnat through a map keyed on a random slot: the kernel chooses the endpoint here."""
        return any(part.modulus for part in self.expr)


@dataclass(frozen=True, slots=True)
class Masquerade:
    flags: tuple[str, ...] = ()

    def __str__(self) -> str:
        return " ".join(("masquerade", *self.flags))


@dataclass(frozen=True, slots=True)
class Reject:
    how: str = ""

    def __str__(self) -> str:
        return f"reject with {self.how}" if self.how else "reject"


@dataclass(frozen=True, slots=True)
class Counter:
    name: str = ""

    def __str__(self) -> str:
        return f'counter name "{self.name}"' if self.name else "counter"


@dataclass(frozen=True, slots=True)
class Queue:
    numbers: str  # "0" or "0-3"
    bypass: bool
    fanout: bool = False  # the queue of the packet's CPU, rather than a hash of its addresses

    def __str__(self) -> str:
        flags = ",".join(name for name, on in (("bypass", self.bypass), ("fanout", self.fanout)) if on)
        return f"queue num {self.numbers}" + (f" {flags}" if flags else "")


Statement = Match | Vmap | SetMeta | SetUpdate | Nat | Masquerade | Reject | Counter | Queue | Verdict


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: its statements in order. `str()` is the rule's nft text."""

    statements: tuple[Statement, ...]
    sets: frozenset[str] = field(init=False, compare=False, repr=False)  # named sets, maps and counters it uses
    chains: frozenset[str] = field(init=False, compare=False, repr=False)  # chains it may jump or go to

    def __post_init__(self) -> None:
        sets, chains = set(), set()
        for statement in self.statements:
            if isinstance(statement, Verdict) and statement.chain:
                chains.add(statement.chain)
            elif isinstance(statement, (Match, Vmap)):
                target = statement.right if isinstance(statement, Match) else statement.map
                if isinstance(target, SetRef):
                    sets.add(target.name)
                elif isinstance(target, AnonMap):
                    chains.update(v.chain for _, v in target.entries if isinstance(v, Verdict) and v.chain)
            elif isinstance(statement, Nat) and statement.map:
                sets.add(statement.map)
            elif isinstance(statement, SetUpdate):
                sets.add(statement.set)
            elif isinstance(statement, Counter) and statement.name:
                sets.add(statement.name)
            elif isinstance(statement, SetMeta) and isinstance(statement.value, Lookup):
                sets.add(statement.value.map)
        object.__setattr__(self, "sets", frozenset(sets))
        object.__setattr__(self, "chains", frozenset(chains))

    @classmethod
    def of(cls, *statements: Statement) -> "Rule":
        return cls(tuple(statements))

    @property
    def text(self) -> str:
        return " ".join(map(str, self.statements))

    def __str__(self) -> str:
        return self.text

    @property
    def picks(self) -> bool:
        """The kernel picks an endpoint here at random: a `numgen` dnat or a `numgen` vmap."""
        return any(
            (isinstance(s, Nat) and s.picks) or (isinstance(s, Vmap) and any(p.modulus for p in s.expr))
            for s in self.statements)

    @property
    def hashes(self) -> bool:
        """The kernel picks an endpoint here by a balancing table: a `jhash` dnat or vmap."""
        return any(isinstance(s, (Nat, Vmap)) and any(isinstance(p, Jhash) for p in s.expr)
                   for s in self.statements)

    @property
    def matches(self) -> tuple[Statement, ...]:
        """The statements before the first one that acts: the conditions under which it applies."""
        out = []
        for statement in self.statements:
            if not isinstance(statement, Match):
                break
            out.append(statement)
        return tuple(out)
