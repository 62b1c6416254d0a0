"""An in-memory nftables: the subset of nft text our planner emits, applied as the kernel would.

Invariants:
- A script is parsed whole before anything is applied, then applied to a copy
  of the tables (copy-on-write, per object); the copy replaces the committed
  state only once every command and the final validation succeeded. A failing
  transaction changes nothing, exactly like the kernel's netlink batch.
- Failures raise the real module's `NftError`, worded like nft ("No such file
  or directory", "File exists", "Device or resource busy", "Operation not
  supported"), so `errno` and `is_not_found()` classify them alike.
- Only our subset is understood; anything else is a syntax error naming its
  line and column, never silently ignored. The subset:

    add|delete|flush table FAMILY NAME            (FAMILY: ip, ip6, inet)
    add chain T NAME [{ type filter|nat hook H priority N ; [policy accept|drop ;] }]
    add map|set T NAME { type A . B [: C] | typeof EXPR [: EXPR] ; [flags F,... ;] [timeout 10s ;] [size N ;] }
    delete|flush chain|map|set T NAME
    add|delete counter T NAME [{ packets N bytes N ; }]     (named counters: userspace mode's fail-open)
    add element T NAME { KEY [timeout 10s] [comment "..."] [: VALUE], ... }
    delete element T NAME { KEY, ... }
    add rule T CHAIN STATEMENT...
    list ruleset | list tables | list table T        (read-only; the output is dump() text)

  Rule statements: matches `EXPR [==|!=|!] VALUE|@set|{ anonymous set }`,
  where EXPR is a concatenation (`a . b`) of ip/ip6 saddr|daddr, meta
  l4proto|mark, th|tcp|udp|sctp sport|dport, ct state|status|mark, fib
  saddr|daddr type, numgen random|inc mod N, optionally `& | ^ CONSTANT`;
  `EXPR vmap @map|{ k : verdict, ... }`; `meta mark set EXPR`; `update|add
  @set { EXPR }`; `dnat [ip|ip6] to ADDR[:PORT] | EXPR map @map`;
  `masquerade [fully-random|random|persistent]`; `reject [with ...]`;
  `counter [name "x"]`; `queue num N[-M] [bypass]`; verdicts accept, drop,
  return, continue, jump C, goto C. That covers kernel mode's layout
  (layout.py, affinity.py) and userspace mode's additions (nat/userspace.py).

- Kernel checks that catch real mistakes are kept: missing objects, a key
  claimed with another value, overlapping intervals, deleting a set or chain
  still referenced, a set redeclared with another shape, datatype mismatches
  between a lookup and its set, a port mapping without a transport protocol
  match, and chain validation (nat statements only where a nat base chain of
  the right hook reaches them, reject only in prerouting/input/forward/output,
  no jump loops, at most 16 levels of jumps).
- `dump()` prints the state sorted (tables, then sets and maps, then chains,
  each by name; elements by key; rules keep their order), so two fakes that
  hold the same state dump the same text, whatever order it arrived in.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .nftables import NftError
from .ruleset import Transaction

FAMILIES = ("ip", "ip6", "inet")
ENOENT = "No such file or directory"
EEXIST = "File exists"
EBUSY = "Device or resource busy"
EOPNOTSUPP = "Operation not supported"
EMLINK = "Too many links"  # a jump loop, or chains nested deeper than the jump stack
JUMP_STACK = 16  # the kernel's NFT_JUMP_STACK_SIZE

# ---------------------------------------------------------------------------------------------
# Values


class Interval(NamedTuple):
    """A range inside an interval set or an anonymous set: a CIDR, or `a-b`."""

    lo: Any
    hi: Any

    def holds(self, value: Any) -> bool:
        return type(value) is type(self.lo) and self.lo <= value <= self.hi


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # accept, drop, return, continue, jump, goto
    chain: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.chain}" if self.chain else self.kind


PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
FLAG_TYPES = {
    "ct_state": frozenset({"invalid", "established", "related", "new", "untracked"}),
    "ct_status": frozenset({"expected", "seen-reply", "assured", "confirmed", "snat", "dnat", "dying"}),
    "fib_addrtype": frozenset({"unspec", "unicast", "local", "broadcast", "anycast", "multicast", "blackhole",
                               "unreachable", "prohibit"}),
}
SET_TYPES = ("ipv4_addr", "ipv6_addr", "inet_proto", "inet_service", "mark", "integer")
ADDRESS_TYPES = {"ipv4_addr": 4, "ipv6_addr": 6}
_NUMBER_LIMITS = {"inet_proto": 0xFF, "inet_service": 0xFFFF, "mark": 0xFFFFFFFF, "integer": 0xFFFFFFFF}


class _Invalid(ValueError):
    pass


def _number(text: str, limit: int) -> int:
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise _Invalid(f"{text!r} is not a number") from None
    if not 0 <= value <= limit:
        raise _Invalid(f"{text} is out of range")
    return value


def parse_value(type_: str, text: str, ranges: bool = False) -> Any:
    """One component of a key or value, canonical: addresses as ipaddress objects, ports and
    protocols as ints, flags as frozensets; a CIDR or `a-b` as an Interval when `ranges`."""
    if type_ in ADDRESS_TYPES:
        version = ADDRESS_TYPES[type_]
        try:
            if "/" in text:
                network = ipaddress.ip_network(text, strict=False)
                lo, hi = network.network_address, network.broadcast_address
            elif "-" in text:
                lo, hi = (ipaddress.ip_address(part) for part in text.split("-", 1))
            else:
                address = ipaddress.ip_address(text)
                if address.version != version:
                    raise _Invalid(f"{text} is not an {type_}")
                return address
        except ValueError:
            raise _Invalid(f"{text!r} is not an {type_}") from None
        if lo.version != version or hi.version != version or lo > hi:
            raise _Invalid(f"{text!r} is not an {type_} range")
        if not ranges:
            raise _Invalid(f"{text} is a range: the set needs flags interval")
        return Interval(lo, hi)
    if type_ == "inet_proto" and text in PROTOCOLS:
        return PROTOCOLS[text]
    if type_ in _NUMBER_LIMITS:
        limit = _NUMBER_LIMITS[type_]
        if "-" in text:
            if not ranges:
                raise _Invalid(f"{text} is a range: the set needs flags interval")
            lo, hi = (_number(part, limit) for part in text.split("-", 1))
            if lo > hi:
                raise _Invalid(f"{text!r} is an empty range")
            return Interval(lo, hi)
        if type_ == "inet_proto" and not text[:1].isdigit():
            raise _Invalid(f"unknown protocol {text!r}")
        return _number(text, limit)
    if type_ in FLAG_TYPES:
        if text not in FLAG_TYPES[type_]:
            raise _Invalid(f"{text!r} is not a {type_} value")
        return frozenset({text})
    raise _Invalid(f"values of type {type_} are not supported")


def format_value(type_: str, value: Any) -> str:
    if isinstance(value, Interval):
        if type_ in ADDRESS_TYPES:
            networks = list(ipaddress.summarize_address_range(value.lo, value.hi))
            return str(networks[0]) if len(networks) == 1 else f"{value.lo}-{value.hi}"
        return f"{value.lo}-{value.hi}"
    if type_ == "inet_proto":
        return PROTOCOL_NAMES.get(value, str(value))
    if type_ == "mark":
        return f"0x{value:08x}"
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    return str(value)


def _sort_key(value: Any) -> tuple:
    if isinstance(value, Interval):
        return _sort_key(value.lo) + _sort_key(value.hi)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return (1, value.version, int(value))
    if isinstance(value, int):
        return (0, value)
    return (2, str(value))


def _matches(component: Any, value: Any) -> bool:
    return component.holds(value) if isinstance(component, Interval) else component == value


def key_matches(key: tuple, value: tuple) -> bool:
    return all(_matches(c, v) for c, v in zip(key, value))


def _overlap(a: tuple, b: tuple) -> bool:
    def span(c):
        return (c.lo, c.hi) if isinstance(c, Interval) else (c, c)

    for x, y in zip(a, b):
        (xl, xh), (yl, yh) = span(x), span(y)
        if type(xl) is not type(yl) or xh < yl or yh < xl:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Rule syntax tree: what the tracer interprets


@dataclass(frozen=True, slots=True)
class Selector:
    """A packet field or meta value: `ip daddr`, `meta l4proto`, `numgen random mod 4`..."""

    text: str
    type: str
    family: str = ""  # "ip" or "ip6" for address selectors
    protocol: int = 0  # tcp/udp/sctp dport: implies a transport protocol match
    modulus: int = 0  # numgen


@dataclass(frozen=True, slots=True)
class BinOp:
    """`meta mark & 0x4000`: a selector (or BinOp) combined with a constant."""

    left: Selector | BinOp
    op: str  # &, |, ^
    value: int

    @property
    def type(self) -> str:
        return self.left.type


Expr = tuple  # a concatenation: tuple of Selector | BinOp


@dataclass(frozen=True, slots=True)
class SetRef:
    name: str


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


@dataclass(frozen=True, slots=True)
class Vmap:
    expr: Expr
    map: SetRef | AnonMap


@dataclass(frozen=True, slots=True)
class SetMeta:
    target: Selector  # meta mark, ct mark
    value: Selector | BinOp | int


@dataclass(frozen=True, slots=True)
class SetUpdate:
    op: str  # update, add
    set: str
    expr: Expr


@dataclass(frozen=True, slots=True)
class Nat:
    kind: str  # dnat
    family: str
    address: Any = None  # fixed target address
    port: int | None = None
    expr: Expr = ()  # mapped target: expr map @map
    map: str = ""


@dataclass(frozen=True, slots=True)
class Masquerade:
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reject:
    how: str = ""


@dataclass(frozen=True, slots=True)
class Counter:
    name: str = ""


@dataclass(frozen=True, slots=True)
class Queue:
    numbers: str
    bypass: bool


Statement = Match | Vmap | SetMeta | SetUpdate | Nat | Masquerade | Reject | Counter | Queue | Verdict


@dataclass(frozen=True, slots=True)
class Rule:
    text: str  # as written, whitespace collapsed
    statements: tuple[Statement, ...]
    sets: frozenset[str]  # named sets and maps it reads or writes, and named counters
    chains: frozenset[str]  # chains it may jump or go to (verdict maps of its own included)


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True, slots=True)
class BaseSpec:
    type: str  # filter, nat
    hook: str
    priority: int
    policy: str = "accept"

    def __str__(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.priority}; policy {self.policy};"


@dataclass(frozen=True, slots=True)
class SetSpec:
    kind: str  # set, map
    key: tuple[str, ...]
    data: tuple[str, ...] | None  # ("verdict",) for verdict maps
    flags: frozenset[str] = frozenset()
    timeout: int | None = None  # seconds
    size: int | None = None
    text: str = ""  # the type or typeof clause as written

    def lines(self) -> list[str]:
        out = [self.text]
        if self.flags:
            out.append(f"flags {','.join(sorted(self.flags))}")
        if self.timeout is not None:
            out.append(f"timeout {self.timeout}s")
        if self.size is not None:
            out.append(f"size {self.size}")
        return out

    @property
    def interval(self) -> bool:
        return "interval" in self.flags

    def shape(self) -> tuple:
        return self.kind, self.key, self.data, self.flags


class Element(NamedTuple):
    value: Any  # tuple of components, a Verdict, or None for sets
    comment: str = ""
    expires: float | None = None  # on the tracer's clock; None: never


class SetState:
    __slots__ = ("elements", "name", "spec")

    def __init__(self, name: str, spec: SetSpec, elements: dict[tuple, Element] | None = None):
        self.name = name
        self.spec = spec
        self.elements: dict[tuple, Element] = elements if elements is not None else {}

    @property
    def kind(self) -> str:
        return self.spec.kind

    def copy(self) -> SetState:
        return SetState(self.name, self.spec, dict(self.elements))

    def lookup(self, value: tuple, now: float | None = None) -> Element | None:
        """The element whose key holds `value`; expired ones only count when `now` is None."""
        element = self.elements.get(value)
        if element is None and self.spec.interval:
            element = next((e for k, e in self.elements.items() if key_matches(k, value)), None)
        if element is not None and now is not None and element.expires is not None and element.expires <= now:
            return None
        return element


class ChainState:
    __slots__ = ("base", "name", "rules")

    def __init__(self, name: str, base: BaseSpec | None, rules: list[Rule] | None = None):
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


# ---------------------------------------------------------------------------------------------
# Tokens and errors


class Token(NamedTuple):
    text: str
    line: int
    col: int  # 1-based
    start: int  # offset in the script
    end: int


_SCAN = re.compile(r'(?P<nl>\n)|(?P<ws>[ \t\r]+)|(?P<hash>#[^\n]*)|(?P<str>"[^"\n]*")|(?P<punct>[{},;])'
                   r'|(?P<word>[^\s{},;"#]+)')


def _located(script: str, line: int, col: int, length: int, message: str) -> NftError:
    lines = script.split("\n")
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    length = max(1, length)
    where = f"/dev/stdin:{line}:{col}-{col + length - 1}"
    return NftError(f"{where}: Error: {message}\n{text}\n{' ' * (col - 1)}{'^' * length}", script)


def _tokenize(script: str) -> list[list[Token]]:
    """Commands, each a list of tokens: a newline or `;` outside braces ends one."""
    commands: list[list[Token]] = []
    current: list[Token] = []
    opened: list[Token] = []
    pos, line, line_start = 0, 1, 0
    while pos < len(script):
        match = _SCAN.match(script, pos)
        if match is None:
            col = pos - line_start + 1
            what = "unterminated string" if script[pos] == '"' else f"unexpected character {script[pos]!r}"
            raise _located(script, line, col, 1, f"syntax error, {what}")
        kind = match.lastgroup
        if kind == "nl":
            if not opened and current:
                commands.append(current)
                current = []
            line, line_start = line + 1, match.end()
        elif kind not in ("ws", "hash"):
            token = Token(match.group(), line, pos - line_start + 1, pos, match.end())
            if token.text == "{":
                opened.append(token)
            elif token.text == "}":
                if not opened:
                    raise _located(script, line, token.col, 1, "syntax error, unexpected '}'")
                opened.pop()
            if token.text == ";" and not opened:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        pos = match.end()
    if opened:
        token = opened[-1]
        raise _located(script, token.line, token.col, 1, "syntax error, '{' is never closed")
    if current:
        commands.append(current)
    return commands


class _Cursor:
    def __init__(self, tokens: list[Token], script: str):
        self.tokens = tokens
        self.i = 0
        self.script = script

    def peek(self, ahead: int = 0) -> str | None:
        index = self.i + ahead
        return self.tokens[index].text if index < len(self.tokens) else None

    def at_end(self) -> bool:
        return self.i >= len(self.tokens)

    def last(self) -> Token:
        return self.tokens[min(self.i, len(self.tokens)) - 1]

    def next(self, expecting: str) -> Token:
        if self.at_end():
            last = self.tokens[-1]
            raise _located(self.script, last.line, last.col + len(last.text), 1,
                           f"syntax error, unexpected end of command, expecting {expecting}")
        token = self.tokens[self.i]
        self.i += 1
        return token

    def take(self, *choices: str) -> Token:
        token = self.next(" or ".join(choices))
        if token.text not in choices:
            raise self.error(f"syntax error, unexpected {token.text!r}, expecting {' or '.join(choices)}", token)
        return token

    def word(self, expecting: str) -> Token:
        token = self.next(expecting)
        if token.text in "{},;" or token.text.startswith('"'):
            raise self.error(f"syntax error, unexpected {token.text!r}, expecting {expecting}", token)
        return token

    def accept(self, text: str) -> bool:
        if self.peek() == text:
            self.i += 1
            return True
        return False

    def error(self, message: str, token: Token | None = None) -> NftError:
        token = token or (self.tokens[self.i] if not self.at_end() else self.tokens[-1])
        return _located(self.script, token.line, token.col, len(token.text), message)

    def finish(self) -> None:
        if not self.at_end():
            token = self.tokens[self.i]
            raise self.error(f"syntax error, unexpected {token.text!r}", token)

    def text(self, start: Token, end: Token) -> str:
        return " ".join(self.script[start.start:end.end].split())


# ---------------------------------------------------------------------------------------------
# Parser


@dataclass(slots=True)
class RawElement:
    key: list[Token]  # components, without the dots
    value: list[Token]  # components, or a verdict's words
    comment: str = ""
    timeout: int | None = None
    first: Token | None = None


@dataclass(slots=True)
class Command:
    verb: str
    obj: str
    family: str
    table: str
    name: str = ""
    first: Token | None = None  # for error locations
    name_token: Token | None = None
    base: BaseSpec | None = None
    spec: SetSpec | None = None
    rule: Rule | None = None
    elements: list[RawElement] = field(default_factory=list)


_VERBS = {
    "add": ("table", "chain", "map", "set", "rule", "element", "counter"),
    "delete": ("table", "chain", "map", "set", "element", "counter"),
    "flush": ("table", "chain", "map", "set"),
    "list": ("ruleset", "tables", "table"),
}
_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")


def parse(script: str) -> list[Command]:
    """Every command of `script`; raises NftError naming the line of the first syntax error."""
    return [_command(_Cursor(tokens, script)) for tokens in _tokenize(script)]


def _command(cur: _Cursor) -> Command:
    first = cur.next("a command")
    if first.text not in _VERBS:
        raise cur.error(f"syntax error, unexpected {first.text!r}: only {', '.join(_VERBS)} are supported", first)
    obj = cur.take(*_VERBS[first.text]).text
    if first.text == "list" and obj != "table":
        cur.finish()
        return Command("list", obj, "", "", first=first)
    family = cur.take(*FAMILIES).text
    table = cur.word("a table name").text
    command = Command(first.text, obj, family, table, first=first)
    if obj != "table":
        command.name_token = cur.word(f"a {obj} name")
        command.name = command.name_token.text
        if command.name.startswith("@"):
            raise cur.error("syntax error, a name cannot start with '@'", command.name_token)
    if first.text == "add" and obj == "chain" and cur.peek() == "{":
        command.base = _base_spec(cur)
    elif first.text == "add" and obj in ("map", "set"):
        command.spec = _set_spec(cur, obj)
    elif obj == "rule":
        command.rule = _rule(cur, family)
    elif obj == "element":
        command.elements = _elements(cur, with_values=first.text == "add")
    elif first.text == "add" and obj == "counter" and cur.accept("{"):
        while not cur.accept("}"):
            if not cur.accept(";"):
                cur.take("packets", "bytes")
                cur.word("a number")
    cur.finish()
    return command


def _base_spec(cur: _Cursor) -> BaseSpec:
    cur.take("{")
    cur.take("type")
    type_ = cur.take("filter", "nat").text
    cur.take("hook")
    hook = cur.take(*_HOOKS).text
    cur.take("priority")
    token = cur.word("a priority")
    if token.text in _PRIORITIES:
        priority = _PRIORITIES[token.text]
    else:
        try:
            priority = int(token.text)
        except ValueError:
            raise cur.error(f"syntax error, {token.text!r} is not a priority", token) from None
    policy = "accept"
    while not cur.accept("}"):
        if cur.accept(";"):
            continue
        cur.take("policy")
        policy = cur.take("accept", "drop").text
    return BaseSpec(type_, hook, priority, policy)


_TIME = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?$")


def _seconds(cur: _Cursor) -> int:
    token = cur.word("a time")
    if token.text.isdigit():
        return int(token.text)
    match = _TIME.match(token.text)
    if not token.text or match is None or not any(match.groups()):
        raise cur.error(f"syntax error, {token.text!r} is not a time (like 600s, 10m, 3h)", token)
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _set_spec(cur: _Cursor, kind: str) -> SetSpec:
    opening = cur.take("{")
    key: tuple[str, ...] | None = None
    data: tuple[str, ...] | None = None
    text = ""
    flags: frozenset[str] = frozenset()
    timeout = size = None
    while not cur.at_end() and cur.peek() != "}":
        if cur.accept(";"):
            continue
        word = cur.take("type", "typeof", "flags", "timeout", "size")
        if word.text in ("type", "typeof"):
            key = _type_list(cur, word.text == "typeof", data=False)
            if cur.accept(":"):
                data = _type_list(cur, word.text == "typeof", data=True)
            text = cur.text(word, cur.last())
        elif word.text == "flags":
            names = [cur.take("interval", "dynamic", "timeout", "constant").text]
            while cur.accept(","):
                names.append(cur.take("interval", "dynamic", "timeout", "constant").text)
            flags = frozenset(names)
        elif word.text == "timeout":
            timeout = _seconds(cur)
        else:
            token = cur.word("a size")
            try:
                size = _number(token.text, 0xFFFFFFFF)
            except _Invalid as error:
                raise cur.error(f"syntax error, {error}", token) from None
    cur.take("}")
    if key is None:
        raise cur.error(f"syntax error, the {kind} has no type", opening)
    if kind == "map" and data is None:
        raise cur.error("syntax error, a map needs a data type (type KEY : DATA)", opening)
    if kind == "set" and data is not None:
        raise cur.error("syntax error, a set has no data type (declare a map)", opening)
    if timeout is not None:
        flags |= {"timeout"}  # as the kernel records it: a default timeout is a timeout set
    return SetSpec(kind, key, data, flags, timeout, size, text)


def _type_list(cur: _Cursor, typeof: bool, data: bool) -> tuple[str, ...]:
    if data and cur.accept("verdict"):
        return ("verdict",)
    if typeof:
        return tuple(part.type for part in _expr(cur, "any"))
    types = [cur.take(*SET_TYPES).text]
    while cur.accept("."):
        types.append(cur.take(*SET_TYPES).text)
    return tuple(types)


def _elements(cur: _Cursor, with_values: bool) -> list[RawElement]:
    cur.take("{")
    elements = []
    while True:
        if cur.accept("}"):
            break
        first = cur.tokens[cur.i] if not cur.at_end() else None
        element = RawElement([cur.word("an element key")], [], first=first)
        while cur.accept("."):
            element.key.append(cur.word("a key component"))
        while cur.peek() in ("comment", "timeout", "expires"):
            word = cur.next("comment or timeout").text
            if word == "comment":
                token = cur.next("a quoted comment")
                if not token.text.startswith('"'):
                    raise cur.error("syntax error, a comment is a quoted string", token)
                element.comment = token.text[1:-1]
            elif word == "timeout":
                element.timeout = _seconds(cur)
            else:
                _seconds(cur)
        if cur.accept(":"):
            token = cur.word("a value")
            element.value.append(token)
            if token.text in ("jump", "goto"):
                element.value.append(cur.word("a chain name"))
            else:
                while cur.accept("."):
                    element.value.append(cur.word("a value component"))
            if not with_values:
                element.value = []  # nft accepts a value on delete, and ignores it
        elements.append(element)
        if cur.accept("}"):
            break
        cur.take(",", "}")
    return elements


# Selectors: (words) -> (type, family, protocol)
_SELECTORS: dict[tuple[str, ...], tuple[str, str, int]] = {
    ("ip", "saddr"): ("ipv4_addr", "ip", 0), ("ip", "daddr"): ("ipv4_addr", "ip", 0),
    ("ip6", "saddr"): ("ipv6_addr", "ip6", 0), ("ip6", "daddr"): ("ipv6_addr", "ip6", 0),
    ("meta", "l4proto"): ("inet_proto", "", 0), ("meta", "mark"): ("mark", "", 0),
    ("th", "dport"): ("inet_service", "", 0), ("th", "sport"): ("inet_service", "", 0),
    ("ct", "state"): ("ct_state", "", 0), ("ct", "status"): ("ct_status", "", 0), ("ct", "mark"): ("mark", "", 0),
    ("fib", "saddr", "type"): ("fib_addrtype", "", 0), ("fib", "daddr", "type"): ("fib_addrtype", "", 0),
    **{(proto, port): ("inet_service", "", PROTOCOLS[proto])
       for proto in ("tcp", "udp", "sctp") for port in ("dport", "sport")},
}
_SELECTOR_STARTS = {words[0] for words in _SELECTORS} | {"numgen"}


def _selector(cur: _Cursor) -> Selector:
    first = cur.next("an expression")
    if first.text == "numgen":
        how = cur.take("random", "inc")
        cur.take("mod")
        token = cur.word("a modulus")
        try:
            modulus = _number(token.text, 0xFFFFFFFF)
        except _Invalid as error:
            raise cur.error(f"syntax error, {error}", token) from None
        if modulus == 0:
            raise cur.error("syntax error, numgen modulus must be positive", token)
        return Selector(f"numgen {how.text} mod {modulus}", "integer", modulus=modulus)
    words = (first.text,)
    while words not in _SELECTORS:
        candidates = [w for w in _SELECTORS if w[:len(words)] == words]
        if not candidates:
            raise cur.error(f"syntax error, unexpected {' '.join(words)!r}: not an expression this fake knows", first)
        following = sorted({w[len(words)] for w in candidates})
        words += (cur.take(*following).text,)
    type_, family, protocol = _SELECTORS[words]
    return Selector(" ".join(words), type_, family, protocol)


def _expr(cur: _Cursor, family: str) -> Expr:
    parts = [_operand(cur, family)]
    while cur.peek() == "." and cur.peek(1) in _SELECTOR_STARTS:
        cur.take(".")
        parts.append(_operand(cur, family))
    return tuple(parts)


def _operand(cur: _Cursor, family: str) -> Selector | BinOp:
    start = cur.tokens[cur.i] if not cur.at_end() else None
    selector = _selector(cur)
    if selector.family and family not in ("any", "inet", selector.family):
        raise cur.error(f"{selector.text} cannot be used in an {family} table", start)
    operand: Selector | BinOp = selector
    while cur.peek() in ("&", "|", "^"):
        op = cur.next("an operator").text
        if selector.type not in ("mark", "integer"):
            raise cur.error(f"{op} needs an integer expression, not {selector.text}", start)
        token = cur.word("a constant")
        try:
            operand = BinOp(operand, op, _number(token.text, 0xFFFFFFFF))
        except _Invalid as error:
            raise cur.error(f"syntax error, {error}", token) from None
    return operand


def _literal_key(cur: _Cursor, types: tuple[str, ...], ranges: bool) -> tuple:
    values = []
    for index, type_ in enumerate(types):
        if index:
            cur.take(".")
        token = cur.word(f"a {type_} value")
        try:
            values.append(parse_value(type_, token.text, ranges))
        except _Invalid as error:
            raise cur.error(f"datatype mismatch: {error}", token) from None
    return tuple(values)


def _verdict(cur: _Cursor) -> Verdict:
    word = cur.take("accept", "drop", "return", "continue", "jump", "goto").text
    if word in ("jump", "goto"):
        return Verdict(word, cur.word("a chain name").text)
    return Verdict(word)


def _rule(cur: _Cursor, family: str) -> Rule:
    if cur.at_end():
        raise cur.error("syntax error, a rule needs at least one statement", cur.last())
    first = cur.tokens[cur.i]
    statements: list[Statement] = []
    sets: set[str] = set()
    chains: set[str] = set()
    l4_matched = False
    while not cur.at_end():
        word = cur.peek()
        start = cur.tokens[cur.i]
        if statements and isinstance(statements[-1], (Verdict, Reject, Nat, Masquerade, Queue)):
            raise cur.error(f"syntax error, statement after a terminal one ({cur.text(first, cur.last())})", start)
        if word in ("accept", "drop", "return", "continue", "jump", "goto"):
            verdict = _verdict(cur)
            if verdict.chain:
                chains.add(verdict.chain)
            statements.append(verdict)
        elif word == "reject":
            cur.next("reject")
            how = ""
            if cur.accept("with"):
                kind = cur.take("icmp", "icmpv6", "icmpx", "tcp")
                if kind.text == "tcp":
                    cur.take("reset")
                    how = "tcp reset"
                else:
                    cur.take("type")
                    how = f"{kind.text} type {cur.word('an icmp type').text}"
                    if (kind.text == "icmp" and family == "ip6") or (kind.text == "icmpv6" and family == "ip"):
                        raise cur.error(f"reject with {kind.text} does not fit an {family} table", kind)
            statements.append(Reject(how))
        elif word == "dnat":
            nat = _nat(cur, family)
            if nat.map:
                sets.add(nat.map)
            if nat.port is not None and not l4_matched:
                # nft's own check; a mapped port is checked once the map's type is known (_check_statement).
                raise cur.error("transport protocol mapping is only valid after transport protocol match", start)
            statements.append(nat)
        elif word == "masquerade":
            cur.next("masquerade")
            flags: list[str] = []
            while cur.peek() in ("fully-random", "random", "persistent"):
                flags.append(cur.next("a flag").text)
                cur.accept(",")
            statements.append(Masquerade(tuple(flags)))
        elif word in ("update", "add") and (cur.peek(1) or "").startswith("@"):
            op = cur.next(word).text
            name = cur.next("@set").text[1:]
            cur.take("{")
            expr = _expr(cur, family)
            cur.take("}")
            sets.add(name)
            statements.append(SetUpdate(op, name, expr))
        elif word == "counter":
            cur.next("counter")
            name = ""
            if cur.accept("name"):
                name = cur.next("a counter name").text.strip('"')
            elif cur.accept("packets"):
                cur.word("a number")
                cur.take("bytes")
                cur.word("a number")
            if name:
                sets.add(name)  # a named counter is an object the rule holds, like a set
            statements.append(Counter(name))
        elif word == "queue":
            cur.next("queue")
            cur.take("num")
            numbers = cur.word("queue numbers").text
            bypass = cur.accept("bypass")
            statements.append(Queue(numbers, bypass))
        elif word in _SELECTOR_STARTS:
            expr = _expr(cur, family)
            if cur.peek() == "set":
                cur.next("set")
                if len(expr) != 1 or not isinstance(expr[0], Selector) or expr[0].text not in ("meta mark", "ct mark"):
                    raise cur.error("syntax error, only meta mark and ct mark can be set", start)
                if cur.peek() in _SELECTOR_STARTS:
                    value_expr = _expr(cur, family)
                    if len(value_expr) != 1:
                        raise cur.error("syntax error, a mark is not a concatenation", start)
                    value: Selector | BinOp | int = value_expr[0]
                else:
                    (value,) = _literal_key(cur, ("mark",), ranges=False)
                statements.append(SetMeta(expr[0], value))
            elif cur.peek() == "vmap":
                cur.next("vmap")
                if (cur.peek() or "").startswith("@"):
                    target: SetRef | AnonMap = SetRef(cur.next("@map").text[1:])
                    sets.add(target.name)
                else:
                    target = _anon_map(cur, expr)
                    chains.update(v.chain for _, v in target.entries if v.chain)
                statements.append(Vmap(expr, target))
            else:
                op = ""
                if cur.peek() in ("==", "!=", "!"):
                    op = cur.next("an operator").text
                types = tuple(part.type for part in expr)
                if (cur.peek() or "").startswith("@"):
                    right: tuple | SetRef | AnonSet = SetRef(cur.next("@set").text[1:])
                    sets.add(right.name)
                elif cur.peek() == "{":
                    right = _anon_set(cur, types)
                else:
                    right = _literal_key(cur, types, ranges=True)
                if any(isinstance(p, Selector) and p.text == "meta l4proto" or getattr(p, "protocol", 0) for p in expr):
                    l4_matched = l4_matched or op in ("", "==")
                statements.append(Match(expr, op, right))
        else:
            raise cur.error(f"syntax error, unexpected {word!r}: not a statement this fake knows", start)
    text = cur.text(first, cur.last())
    return Rule(text, tuple(statements), frozenset(sets), frozenset(chains))


def _nat(cur: _Cursor, family: str) -> Nat:
    kind = cur.next("dnat").text
    nat_family = family if family != "inet" else ""
    if cur.peek() in ("ip", "ip6") and cur.peek(1) == "to":
        token = cur.next("ip or ip6")
        if family != "inet" and token.text != family:
            raise cur.error(f"dnat {token.text} in an {family} table", token)
        nat_family = token.text
    cur.take("to")
    if not nat_family:
        raise cur.error("dnat in an inet table needs ip or ip6", cur.last())
    if cur.peek() in _SELECTOR_STARTS:
        expr = _expr(cur, family)
        cur.take("map")
        name = cur.next("@map").text
        if not name.startswith("@"):
            raise cur.error("syntax error, only named maps are supported in dnat", cur.last())
        return Nat(kind, nat_family, expr=expr, map=name[1:])
    token = cur.word("an address")
    text = token.text
    address_type = "ipv4_addr" if nat_family == "ip" else "ipv6_addr"
    port = None
    if nat_family == "ip6" and text.startswith("["):
        address_text, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise cur.error(f"syntax error, {text!r} is not [address]:port", token)
            port_text = rest[1:]
        else:
            port_text = None
    elif nat_family == "ip" and ":" in text:
        address_text, _, port_text = text.partition(":")
    else:
        address_text, port_text = text, None
    try:
        address = parse_value(address_type, address_text)
        if port_text is not None:
            port = parse_value("inet_service", port_text)
    except _Invalid as error:
        raise cur.error(f"datatype mismatch: {error}", token) from None
    return Nat(kind, nat_family, address=address, port=port)


def _anon_set(cur: _Cursor, types: tuple[str, ...]) -> AnonSet:
    cur.take("{")
    keys = []
    while not cur.accept("}"):
        keys.append(_literal_key(cur, types, ranges=True))
        if cur.peek() != "}":
            cur.take(",")
    if not keys:
        raise cur.error("syntax error, an empty anonymous set", cur.last())
    if types in (("ct_state",), ("ct_status",), ("fib_addrtype",)):
        return AnonSet(((frozenset().union(*(k[0] for k in keys)),),))  # flags: one key, their union
    return AnonSet(tuple(keys))


def _anon_map(cur: _Cursor, expr: Expr) -> AnonMap:
    types = tuple(part.type for part in expr)
    cur.take("{")
    entries = []
    while not cur.accept("}"):
        key = _literal_key(cur, types, ranges=True)
        cur.take(":")
        entries.append((key, _verdict(cur)))
        if cur.peek() != "}":
            cur.take(",")
    return AnonMap(tuple(entries))


# ---------------------------------------------------------------------------------------------
# Applying commands


class _Failed(Exception):
    """A command the kernel would refuse: carries the message and where it points."""

    def __init__(self, message: str, token: Token | None):
        super().__init__(message)
        self.token = token


class _Work:
    """The tables as a transaction changes them: copied on first write, per table and object."""

    def __init__(self, tables: dict[tuple[str, str], TableState], now: float):
        self.tables = dict(tables)
        self.now = now
        self._fresh: set[int] = set()  # ids of objects this transaction owns
        self.touched: set[tuple[str, str]] = set()
        self.output: list[str] = []

    # copy-on-write accessors
    def _own(self, obj):
        self._fresh.add(id(obj))
        return obj

    def table(self, command: Command) -> TableState:
        key = (command.family, command.table)
        table = self.tables.get(key)
        if table is None:
            raise _Failed(f"Could not process rule: {ENOENT} (table {command.family} {command.table})",
                          command.first)
        if id(table) not in self._fresh:
            table = self.tables[key] = self._own(table.shallow_copy())
        self.touched.add(key)
        return table

    def chain(self, table: TableState, name: str, token: Token | None) -> ChainState:
        chain = table.chains.get(name)
        if chain is None:
            raise _Failed(f"Could not process rule: {ENOENT} (chain {name})", token)
        if id(chain) not in self._fresh:
            chain = table.chains[name] = self._own(chain.copy())
        return chain

    def set(self, table: TableState, name: str, token: Token | None, kinds=("set", "map")) -> SetState:
        found = table.sets.get(name)
        if found is None or found.kind not in kinds:
            raise _Failed(f"Could not process rule: {ENOENT} ({'/'.join(kinds)} {name})", token)
        if id(found) not in self._fresh:
            found = table.sets[name] = self._own(found.copy())
        return found

    def execute(self, command: Command) -> None:
        handler = getattr(self, f"_{command.verb}_{command.obj}")
        handler(command)

    # tables
    def _add_table(self, command: Command) -> None:
        key = (command.family, command.table)
        if key not in self.tables:
            self.tables[key] = self._own(TableState(command.family, command.table))
        self.touched.add(key)

    def _delete_table(self, command: Command) -> None:
        self.table(command)
        del self.tables[(command.family, command.table)]

    def _flush_table(self, command: Command) -> None:
        table = self.table(command)
        for name in list(table.chains):  # rules only: sets and maps keep their elements
            self.chain(table, name, command.first).rules.clear()

    # chains
    def _add_chain(self, command: Command) -> None:
        table = self.table(command)
        existing = table.chains.get(command.name)
        if existing is None:
            table.chains[command.name] = self._own(ChainState(command.name, command.base))
        elif command.base is not None and (existing.base is None or existing.base.type != command.base.type
                                           or existing.base.hook != command.base.hook):
            raise _Failed(f"Could not process rule: {EEXIST} (chain {command.name} exists with another type)",
                          command.name_token)
        elif command.base is not None and existing.base != command.base:
            self.chain(table, command.name, command.name_token).base = command.base  # policy, priority

    def _delete_chain(self, command: Command) -> None:
        table = self.table(command)
        self.chain(table, command.name, command.name_token)
        users = [f"chain {c.name}" for c in table.chains.values()
                 if c.name != command.name and any(command.name in r.chains for r in c.rules)]
        users += [f"map {s.name}" for s in table.sets.values() if s.spec.data == ("verdict",)
                  and any(e.value.chain == command.name for e in s.elements.values())]
        if users:
            raise _Failed(f"Could not process rule: {EBUSY} (chain {command.name} is used by {', '.join(users)})",
                          command.name_token)
        del table.chains[command.name]

    def _flush_chain(self, command: Command) -> None:
        self.chain(self.table(command), command.name, command.name_token).rules.clear()

    # sets and maps
    def _add_set(self, command: Command) -> None:
        table = self.table(command)
        spec = command.spec
        assert spec is not None
        existing = table.sets.get(command.name)
        if existing is None:
            table.sets[command.name] = self._own(SetState(command.name, spec))
        elif existing.spec.shape() != spec.shape():
            raise _Failed(f"Could not process rule: {EEXIST} ({existing.kind} {command.name} exists as "
                          f"{{ {' ; '.join(existing.spec.lines())} }})", command.name_token)
        elif existing.spec != spec:
            self.set(table, command.name, command.name_token).spec = spec  # a new timeout or size

    _add_map = _add_set

    def _delete_set(self, command: Command) -> None:
        table = self.table(command)
        self.set(table, command.name, command.name_token, kinds=(command.obj,))
        users = [c.name for c in table.chains.values() if any(command.name in r.sets for r in c.rules)]
        if users:
            raise _Failed(f"Could not process rule: {EBUSY} ({command.obj} {command.name} is used by chain "
                          f"{', '.join(users)})", command.name_token)
        del table.sets[command.name]

    _delete_map = _delete_set

    def _flush_set(self, command: Command) -> None:
        table = self.table(command)
        self.set(table, command.name, command.name_token, kinds=(command.obj,)).elements.clear()

    _flush_map = _flush_set

    # elements
    def _key(self, spec: SetSpec, tokens: list[Token]) -> tuple:
        if len(tokens) != len(spec.key):
            raise _Failed(f"datatype mismatch: the key has {_parts(len(tokens))}, the set takes "
                          f"{' . '.join(spec.key)}", tokens[0])
        values = []
        for token, type_ in zip(tokens, spec.key):
            try:
                values.append(parse_value(type_, token.text, ranges=spec.interval))
            except _Invalid as error:
                raise _Failed(f"datatype mismatch: {error}", token) from None
        return tuple(values)

    def _value(self, table: TableState, spec: SetSpec, element: RawElement) -> Any:
        if spec.data is None:
            if element.value:
                raise _Failed("syntax error, a set element has no value", element.value[0])
            return None
        if not element.value:
            raise _Failed("syntax error, a map element needs ': value'", element.first)
        if spec.data == ("verdict",):
            words = [t.text for t in element.value]
            if words[0] in ("jump", "goto") and len(words) == 2:
                target = table.chains.get(words[1])
                if target is None:
                    raise _Failed(f"Could not process rule: {ENOENT} (chain {words[1]})", element.value[1])
                if target.base is not None:
                    raise _Failed(f"Could not process rule: {EOPNOTSUPP} (cannot jump to base chain {words[1]})",
                                  element.value[1])
                return Verdict(words[0], words[1])
            if len(words) == 1 and words[0] in ("accept", "drop", "return", "continue"):
                return Verdict(words[0])
            raise _Failed(f"datatype mismatch: {' '.join(words)!r} is not a verdict", element.value[0])
        if len(element.value) != len(spec.data):
            raise _Failed(f"datatype mismatch: the value has {_parts(len(element.value))}, the map takes "
                          f"{' . '.join(spec.data)}", element.value[0])
        values = []
        for token, type_ in zip(element.value, spec.data):
            try:
                values.append(parse_value(type_, token.text))
            except _Invalid as error:
                raise _Failed(f"datatype mismatch: {error}", token) from None
        return tuple(values)

    def _add_element(self, command: Command) -> None:
        table = self.table(command)
        target = self.set(table, command.name, command.name_token)
        spec = target.spec
        for raw in command.elements:
            key = self._key(spec, raw.key)
            value = self._value(table, spec, raw)
            timeout = raw.timeout if raw.timeout is not None else spec.timeout
            if raw.timeout is not None and "timeout" not in spec.flags:
                raise _Failed(f"Could not process rule: {EOPNOTSUPP} (element timeout in a set without flags "
                              f"timeout)", raw.first)
            existing = target.elements.get(key)
            if existing is not None:
                if existing.value != value:
                    raise _Failed(f"Could not process rule: {EEXIST} (key already held with {existing.value})",
                                  raw.first)
                continue  # `add` of the same element: nothing to do, as in the kernel
            if spec.interval:
                clash = next((k for k in target.elements if _overlap(k, key)), None)
                if clash is not None:
                    raise _Failed(f"Could not process rule: {EEXIST} (overlaps "
                                  f"{_format_key(spec.key, clash)})", raw.first)
            expires = None if timeout is None else self.now + timeout
            target.elements[key] = Element(value, raw.comment, expires)

    def _delete_element(self, command: Command) -> None:
        table = self.table(command)
        target = self.set(table, command.name, command.name_token)
        for raw in command.elements:
            key = self._key(target.spec, raw.key)
            if target.elements.pop(key, None) is None:
                raise _Failed(f"Could not process rule: {ENOENT} (no element {_format_key(target.spec.key, key)})",
                              raw.first)

    # named counters
    def _add_counter(self, command: Command) -> None:
        table = self.table(command)
        table.counters = table.counters | {command.name}

    def _delete_counter(self, command: Command) -> None:
        table = self.table(command)
        if command.name not in table.counters:
            raise _Failed(f"Could not process rule: {ENOENT} (counter {command.name})", command.name_token)
        users = [c.name for c in table.chains.values() if any(command.name in r.sets for r in c.rules)]
        if users:
            raise _Failed(f"Could not process rule: {EBUSY} (counter {command.name} is used by chain "
                          f"{', '.join(users)})", command.name_token)
        table.counters = table.counters - {command.name}

    # rules
    def _add_rule(self, command: Command) -> None:
        table = self.table(command)
        chain = self.chain(table, command.name, command.name_token)
        rule = command.rule
        assert rule is not None
        for name in sorted(rule.chains):
            target = table.chains.get(name)
            if target is None:
                raise _Failed(f"Could not process rule: {ENOENT} (chain {name})", command.first)
            if target.base is not None:
                raise _Failed(f"Could not process rule: {EOPNOTSUPP} (cannot jump to base chain {name})",
                              command.first)
        for statement in rule.statements:
            self._check_statement(table, statement, rule, command)
        chain.rules.append(rule)

    def _check_statement(self, table: TableState, statement: Statement, rule: Rule, command: Command) -> None:
        def lookup(name: str, expr: Expr, kinds: tuple[str, ...], what: str) -> SetState:
            found = table.sets.get(name)
            if found is None or found.kind not in kinds:
                raise _Failed(f"{ENOENT}: no {'/'.join(kinds)} @{name} in table {table.family} {table.name}",
                              command.first)
            types = tuple(part.type for part in expr)
            if types != found.spec.key:
                raise _Failed(f"datatype mismatch: {what} looks up {' . '.join(types)} in @{name}, which is keyed "
                              f"by {' . '.join(found.spec.key)}", command.first)
            return found

        if isinstance(statement, Counter) and statement.name:
            if statement.name not in table.counters:
                raise _Failed(f"{ENOENT}: no counter {statement.name} in table {table.family} {table.name}",
                              command.first)
        elif isinstance(statement, Match) and isinstance(statement.right, SetRef):
            lookup(statement.right.name, statement.expr, ("set", "map"), "the match")
        elif isinstance(statement, Vmap) and isinstance(statement.map, SetRef):
            found = lookup(statement.map.name, statement.expr, ("map",), "vmap")
            if found.spec.data != ("verdict",):
                raise _Failed(f"datatype mismatch: vmap @{found.name} does not map to verdicts", command.first)
        elif isinstance(statement, SetUpdate):
            lookup(statement.set, statement.expr, ("set",), statement.op)
        elif isinstance(statement, Nat) and statement.map:
            found = lookup(statement.map, statement.expr, ("map",), "dnat")
            address = "ipv4_addr" if statement.family == "ip" else "ipv6_addr"
            if found.spec.data not in ((address,), (address, "inet_service")):
                raise _Failed(f"datatype mismatch: dnat {statement.family} needs a map to {address} "
                              f"[. inet_service], @{found.name} maps to {' . '.join(found.spec.data or ())}",
                              command.first)
            l4 = any(isinstance(s, Match) and s.op in ("", "==")
                     and any(getattr(p, "text", "") == "meta l4proto" or getattr(p, "protocol", 0) for p in s.expr)
                     for s in rule.statements)
            if found.spec.data[-1] == "inet_service" and not l4:
                raise _Failed("transport protocol mapping is only valid after transport protocol match",
                              command.first)

    # listing
    def _list_ruleset(self, command: Command) -> None:
        self.output.append(dump_tables(self.tables))

    def _list_tables(self, command: Command) -> None:
        self.output.append("".join(f"table {f} {n}\n" for f, n in sorted(self.tables)))

    def _list_table(self, command: Command) -> None:
        key = (command.family, command.table)
        if key not in self.tables:
            raise _Failed(f"Could not process rule: {ENOENT} (table {command.family} {command.table})",
                          command.first)
        self.output.append(dump_tables({key: self.tables[key]}))

    # validation, once the whole batch is in
    def validate(self) -> None:
        for key in sorted(self.touched):
            table = self.tables.get(key)
            if table is not None:
                _validate(table)


_NAT_HOOKS = {"dnat": ("prerouting", "output"), "masquerade": ("postrouting", "input")}
_REJECT_HOOKS = ("prerouting", "input", "forward", "output")


def _validate(table: TableState) -> None:
    """The kernel's chain validation: what every base chain reaches must suit its type and hook."""
    for base in sorted((c for c in table.chains.values() if c.base is not None), key=lambda c: c.name):
        assert base.base is not None
        _visit(table, base.base, base, (base.name,), {})


_CONSTRAINED = {Nat: "dnat", Masquerade: "masquerade", Reject: "reject"}


def _visit(table: TableState, spec: BaseSpec, chain: ChainState, path: tuple[str, ...], done: dict[str, int]) -> None:
    """Checks `chain`, reached from base chain `spec` along `path`, and what it jumps to.
    `done`: chain -> the deepest level it was checked at (a check there covers shallower ones)."""
    for rule in chain.rules:
        for statement in rule.statements:
            kind = _CONSTRAINED.get(type(statement), "")
            if kind in _NAT_HOOKS and (spec.type != "nat" or spec.hook not in _NAT_HOOKS[kind]):
                raise _Failed(f"Could not process rule: {EOPNOTSUPP} ({kind} in chain {chain.name} is reached "
                              f"from {spec.type} chain {' -> '.join(path)} on hook {spec.hook}: {rule.text})", None)
            if kind == "reject" and spec.hook not in _REJECT_HOOKS:
                raise _Failed(f"Could not process rule: {EOPNOTSUPP} (reject in chain {chain.name} is reached "
                              f"from hook {spec.hook} via {' -> '.join(path)})", None)
        targets = set(rule.chains)
        for statement in rule.statements:
            if isinstance(statement, Vmap) and isinstance(statement.map, SetRef):
                found = table.sets.get(statement.map.name)
                if found is not None:
                    targets |= {e.value.chain for e in found.elements.values() if e.value.chain}
        for name in sorted(targets):
            if name in path or len(path) >= JUMP_STACK:
                what = "loop" if name in path else f"deeper than {JUMP_STACK} jumps"
                raise _Failed(f"Could not process rule: {EMLINK} ({what}: {' -> '.join((*path, name))})", None)
            if done.get(name, -1) < len(path) and name in table.chains:
                _visit(table, spec, table.chains[name], (*path, name), done)
    done[chain.name] = len(path) - 1


# ---------------------------------------------------------------------------------------------
# Dump


def _parts(count: int) -> str:
    return f"{count} part" if count == 1 else f"{count} parts"


def _format_key(types: tuple[str, ...], key: tuple) -> str:
    return " . ".join(format_value(t, v) for t, v in zip(types, key))


def dump_tables(tables: dict[tuple[str, str], TableState]) -> str:
    out: list[str] = []
    for key in sorted(tables):
        table = tables[key]
        out.append(f"table {table.family} {table.name} {{")
        out.extend(f"\tcounter {name}" for name in sorted(table.counters))
        for name in sorted(table.sets):
            found = table.sets[name]
            spec = found.spec
            out.append(f"\t{spec.kind} {name} {{")
            out.extend(f"\t\t{line}" for line in spec.lines())
            if found.elements:
                out.append("\t\telements = {")
                items = sorted(found.elements.items(), key=lambda item: tuple(_sort_key(c) for c in item[0]))
                for element_key, element in items:
                    text = _format_key(spec.key, element_key)
                    if element.comment:
                        text += f' comment "{element.comment}"'
                    if spec.data == ("verdict",):
                        text += f" : {element.value}"
                    elif spec.data is not None:
                        text += f" : {_format_key(spec.data, element.value)}"
                    out.append(f"\t\t\t{text}")
                out.append("\t\t}")
            out.append("\t}")
        for name in sorted(table.chains):
            chain = table.chains[name]
            out.append(f"\tchain {name} {{")
            if chain.base is not None:
                out.append(f"\t\t{chain.base}")
            out.extend(f"\t\t{rule.text}" for rule in chain.rules)
            out.append("\t}")
        out.append("}")
    return "".join(f"{line}\n" for line in out)


# ---------------------------------------------------------------------------------------------
# The fake


class Learned(NamedTuple):
    """A packet-path update of a dynamic set: `update @set { ip saddr }` ran."""

    family: str
    table: str
    set: str
    key: tuple
    expires: float


class FakeNftables:
    """Nftables' interface over in-memory tables; see the module docstring for the subset.

    `run` parses the whole script, applies it to a copy and commits only when
    every command succeeded; it raises NftError otherwise, with nothing changed.
    """

    backend_name = "fake"

    def __init__(self, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.clock = clock  # for element timeouts; the tracer's `now` defaults to it
        self._tables: dict[tuple[str, str], TableState] = {}
        self.applied: list[str] = []  # every committed script, in order

    def run(self, text: str, check_only: bool = False) -> str:
        commands = parse(text)
        work = _Work(self._tables, self.clock())
        for command in commands:
            try:
                work.execute(command)
            except _Failed as failure:
                raise self._error(text, failure, command) from None
        try:
            work.validate()
        except _Failed as failure:
            raise NftError(f"Error: {failure}", text) from None
        if not check_only and any(c.verb != "list" for c in commands):
            self._tables = work.tables
            self.applied.append(text)
        return "".join(work.output)

    @staticmethod
    def _error(text: str, failure: _Failed, command: Command) -> NftError:
        token = failure.token or command.first
        assert token is not None
        return _located(text, token.line, token.col, len(token.text), str(failure))

    def apply(self, tx: Transaction) -> None:
        if tx:
            self.run(str(tx))

    def check(self, tx: Transaction) -> None:
        self.run(str(tx), check_only=True)

    def list_objects(self, family: str, table: str) -> list[tuple[str, str]]:
        """(kind, name) of every chain, map and set in the table; [] when it does not exist."""
        found = self._tables.get((family, table))
        if found is None:
            return []
        return [("chain", name) for name in found.chains] + [(s.kind, name) for name, s in found.sets.items()]

    def delete_table(self, family: str, table: str) -> None:
        """Idempotent: a missing table is already deleted."""
        self.run(f"add table {family} {table}\ndelete table {family} {table}\n")

    def dump(self) -> str:
        """Every table, sorted: the text golden tests and convergence checks compare."""
        return dump_tables(self._tables)

    # read access for the tracer and for tests
    def tables(self) -> dict[tuple[str, str], TableState]:
        """The committed tables; treat them as read-only (a transaction replaces, never edits, them)."""
        return dict(self._tables)

    def elements(self, family: str, table: str, name: str) -> dict[str, str]:
        """A set's or map's elements as text, key -> value ('' for sets)."""
        found = self._tables[(family, table)].sets[name]
        spec = found.spec
        out = {}
        for key, element in found.elements.items():
            if spec.data is None:
                value = ""
            elif spec.data == ("verdict",):
                value = str(element.value)
            else:
                value = _format_key(spec.data, element.value)
            out[_format_key(spec.key, key)] = value
        return out

    def rules(self, family: str, table: str, chain: str) -> list[str]:
        return [rule.text for rule in self._tables[(family, table)].chains[chain].rules]

    def learn(self, updates: Iterable[Learned]) -> None:
        """Writes the packet path's dynamic-set updates (from a traced Path) into the sets,
        as the kernel does when the packet passes; updates for vanished sets are ignored."""
        tables = dict(self._tables)
        for update in updates:
            key = (update.family, update.table)
            table = tables.get(key)
            if table is None or update.set not in table.sets:
                continue
            if table is self._tables.get(key):
                table = tables[key] = table.shallow_copy()
            target = table.sets[update.set] = table.sets[update.set].copy()
            target.elements[update.key] = Element(None, "", update.expires)
        self._tables = tables

    def counters(self, family: str, table: str) -> dict[str, tuple[int, int]]:
        """Nftables.counters: name -> (packets, bytes). Counts are not modelled: always (0, 0).
        Raises NftError (not found) when the table does not exist, as nft does."""
        found = self._tables.get((family, table))
        if found is None:
            raise NftError(f"Error: Could not process rule: {ENOENT} (table {family} {table})")
        return {name: (0, 0) for name in sorted(found.counters)}
