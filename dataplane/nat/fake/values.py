"""Literal values, canonical: how element text becomes the values lookups compare.

Addresses are ipaddress objects, ports and protocols ints, flag values
(ct state, fib type) frozensets, ranges expr.Interval; `format_value` prints
them as `nft list` does. Element keys and values arrive as nft text (the
planner keeps hundreds of thousands of them as text); `parse_key` is cached,
because the same elements are loaded again and again (a full sync, a second fake).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Any

from ..expr import ADDRESS_TYPES, PROTOCOLS, Interval, Verdict, literal
from .errors import Invalid

FLAG_TYPES = {
    "ct_state": frozenset({"invalid", "established", "related", "new", "untracked"}),
    "ct_status": frozenset({"expected", "seen-reply", "assured", "confirmed", "snat", "dnat", "dying"}),
    "fib_addrtype": frozenset({"unspec", "unicast", "local", "broadcast", "anycast", "multicast", "blackhole",
                               "unreachable", "prohibit"}),
}
SET_TYPES = ("ipv4_addr", "ipv6_addr", "inet_proto", "inet_service", "mark", "integer")
NUMBER_LIMITS = {"inet_proto": 0xFF, "inet_service": 0xFFFF, "mark": 0xFFFFFFFF, "integer": 0xFFFFFFFF}
VERDICTS = ("accept", "drop", "return", "continue", "jump", "goto")
_ADDRESS_CLASSES = {4: ipaddress.IPv4Address, 6: ipaddress.IPv6Address}


def parse_number(text: str, limit: int) -> int:
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise Invalid(f"{text!r} is not a number") from None
    if not 0 <= value <= limit:
        raise Invalid(f"{text} is out of range")
    return value


def parse_value(type_: str, text: str, ranges: bool = False) -> Any:
    """One component of a key or value; a CIDR or `a-b` is an Interval, allowed only when `ranges`."""
    if type_ in ADDRESS_TYPES:
        version = ADDRESS_TYPES[type_]
        lo: Any
        hi: Any
        try:
            if "/" in text:
                network = ipaddress.ip_network(text, strict=False)
                lo, hi = network.network_address, network.broadcast_address
            elif "-" in text:
                lo, hi = (ipaddress.ip_address(part) for part in text.split("-", 1))
            else:
                address = ipaddress.ip_address(text)
                if address.version != version:
                    raise Invalid(f"{text} is not an {type_}")
                return address
        except ValueError:
            raise Invalid(f"{text!r} is not an {type_}") from None
        if lo.version != version or hi.version != version or lo > hi:
            raise Invalid(f"{text!r} is not an {type_} range")
        if not ranges:
            raise Invalid(f"{text} is a range: the set needs flags interval")
        return Interval(lo, hi)
    if type_ == "inet_proto" and text in PROTOCOLS:
        return PROTOCOLS[text]
    if type_ in NUMBER_LIMITS:
        limit = NUMBER_LIMITS[type_]
        if "-" in text:
            if not ranges:
                raise Invalid(f"{text} is a range: the set needs flags interval")
            first, last = (parse_number(part, limit) for part in text.split("-", 1))
            if first > last:
                raise Invalid(f"{text!r} is an empty range")
            return Interval(first, last)
        if type_ == "inet_proto" and not text[:1].isdigit():
            raise Invalid(f"unknown protocol {text!r}")
        return parse_number(text, limit)
    if type_ in FLAG_TYPES:
        if text not in FLAG_TYPES[type_]:
            raise Invalid(f"{text!r} is not a {type_} value")
        return frozenset({text})
    raise Invalid(f"values of type {type_} are not supported")


def fits(type_: str, value: Any, ranges: bool = True) -> bool:
    """A typed literal (from a Rule built as data) is a value of `type_`, as parse_value would make it."""
    if isinstance(value, Interval):
        return ranges and fits(type_, value.lo, False) and fits(type_, value.hi, False) and value.lo <= value.hi
    if type_ in ADDRESS_TYPES:
        return type(value) is _ADDRESS_CLASSES[ADDRESS_TYPES[type_]]
    if type_ in NUMBER_LIMITS:
        return type(value) is int and 0 <= value <= NUMBER_LIMITS[type_]
    if type_ in FLAG_TYPES:
        return isinstance(value, frozenset) and bool(value) and value <= FLAG_TYPES[type_]
    return False


def components(text: str) -> list[str]:
    """The components of a key or value written as nft text: `a . b . c`, or a verdict's words."""
    return [word for word in text.split() if word != "."]


def parts(count: int) -> str:
    return f"{count} part" if count == 1 else f"{count} parts"


@lru_cache(maxsize=1 << 16)
def parse_key(types: tuple[str, ...], text: str, ranges: bool, data: bool = False) -> tuple:
    """An element's key (or, with `data`, a map element's value) from its text; raises Invalid
    with nft's wording."""
    words = components(text)
    if len(words) != len(types):
        what, of = ("value", "map") if data else ("key", "set")
        raise Invalid(f"datatype mismatch: the {what} has {parts(len(words))}, the {of} takes {' . '.join(types)}")
    try:
        return tuple(parse_value(t, w, ranges) for t, w in zip(types, words))
    except Invalid as error:
        raise Invalid(f"datatype mismatch: {error}") from None


@lru_cache(maxsize=1 << 12)
def parse_verdict(text: str) -> Verdict:
    words = text.split()
    if len(words) == 2 and words[0] in ("jump", "goto"):
        return Verdict(words[0], words[1])
    if len(words) == 1 and words[0] in VERDICTS[:4]:
        return Verdict(words[0])
    raise Invalid(f"datatype mismatch: {text!r} is not a verdict")


def format_value(type_: str, value: Any) -> str:
    """A value as `nft list` prints it: as in a rule (expr.literal), but marks in full hex (0x00004000)."""
    if type_ == "mark" and isinstance(value, int):
        return f"0x{value:08x}"
    return literal(type_, value)


def format_key(types: tuple[str, ...], key: tuple) -> str:
    return " . ".join(format_value(t, v) for t, v in zip(types, key))


def sort_key(value: Any) -> tuple:
    if isinstance(value, Interval):
        return sort_key(value.lo) + sort_key(value.hi)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return (1, value.version, int(value))
    if isinstance(value, int):
        return (0, value)
    return (2, str(value))


def _matches(component: Any, value: Any) -> bool:
    return component.holds(value) if isinstance(component, Interval) else component == value


def key_matches(key: tuple, value: tuple) -> bool:
    """`value` (a packet's) falls in `key` (an element's, whose components may be ranges)."""
    return all(_matches(c, v) for c, v in zip(key, value))


def overlap(a: tuple, b: tuple) -> bool:
    def span(c):
        return (c.lo, c.hi) if isinstance(c, Interval) else (c, c)

    for x, y in zip(a, b):
        (xl, xh), (yl, yh) = span(x), span(y)
        if type(xl) is not type(yl) or xh < yl or yh < xl:
            return False
    return True
