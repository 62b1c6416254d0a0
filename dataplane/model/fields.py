"""Typed, path-aware reads from the dicts that YAML and JSON give.

Unknown fields are ignored; a present field of the wrong type or range raises
InvalidObject naming the object and the field path (``spec.ports[1].port``).
"""

from __future__ import annotations

import ipaddress
import socket
import re
import sys
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Iterator

from .errors import InvalidObject

_MISSING = object()
_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"


@dataclass(frozen=True, slots=True)
class NameRule:
    """One of Kubernetes' naming rules. Names end up in nftables chain names
    and comments, so anything outside these rules is refused at parse time."""

    pattern: re.Pattern[str]
    max_length: int
    description: str
    # Names already found good, each as one shared string: 10,000 objects name the same hundred
    # nodes and a few namespaces. Bounded, since the names come from untrusted input.
    _good: dict[str, str] = dataclass_field(default_factory=dict, compare=False, repr=False)

    def problem(self, value: str) -> str | None:
        """None when `value` follows the rule, else what is wrong with it."""
        # fullmatch, not "$": "$" would accept a trailing newline.
        if len(value) <= self.max_length and self.pattern.fullmatch(value):
            return None
        return f"must be {self.description}, got {value!r}"

    def good(self, value: str) -> str | None:
        """`value`, as the one shared copy of it, when it follows the rule; else None (say why with `problem`)."""
        known = self._good.get(value)
        if known is None:
            if self.problem(value) is not None:
                return None
            if len(self._good) >= _REMEMBERED:
                self._good.clear()
            known = self._good[value] = value
        return known


DNS1123_LABEL = NameRule(
    re.compile(_LABEL),
    63,
    "a DNS-1123 label (at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit)",
)
DNS1035_LABEL = NameRule(
    re.compile("[a-z]([-a-z0-9]*[a-z0-9])?"),
    63,
    "a DNS-1035 label (at most 63 lowercase letters, digits and '-', starting with a letter"
    " and ending with a letter or digit)",
)
DNS1123_SUBDOMAIN = NameRule(
    re.compile(rf"{_LABEL}(\.{_LABEL})*"),
    253,
    "a DNS-1123 subdomain (at most 253 characters: DNS-1123 labels joined by '.')",
)
IANA_SVC_NAME = NameRule(
    re.compile("(?=[-a-z0-9]*[a-z])[a-z0-9]+(-[a-z0-9]+)*"),
    15,
    "an IANA service name (at most 15 lowercase letters, digits and '-', at least one letter,"
    " no '-' at either end or next to another '-')",
)


_REMEMBERED = 4096  # entries in each cache of good names and shared strings


def shared(text: str) -> str:
    """One copy of a string that repeats across objects (a zone, a label key): 10,000 Services
    decoded from JSON would otherwise hold 10,000 equal strings. Interned strings are freed
    once nothing uses them, so untrusted text cannot pile up here."""
    return sys.intern(text)


def good_name(value: Any, rule: NameRule) -> str | None:
    """The fast paths' read of an optional name: "" when unset, the shared name when it follows
    `rule`, None for anything else (which the Reader path then reports)."""
    if value is None or value == "":
        return ""
    return rule.good(value) if type(value) is str else None


def canonical_ip(text: str) -> str | None:
    """The canonical spelling of an IP address, or None. Zone-scoped IPv6 is refused."""
    try:
        # inet_pton is strict dotted-quad, as ipaddress is, and 20 times faster.
        canonical = socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text))
        return text if canonical == text else canonical  # the text already held, not a second copy
    except OSError:
        pass
    if "%" in text:
        return None
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        return None


def ordinary_ipv4(text: str) -> str | None:
    """`text` when it is a canonical IPv4 address a Service may have (what `canonical_ip` and
    `special_address` together accept), else None: the fast path's check, without ipaddress."""
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return None
    first = packed[0]
    # unspecified, loopback, multicast, broadcast, link-local: as special_address decides them
    if (packed == b"\0\0\0\0" or first == 127 or 224 <= first <= 239 or packed == b"\xff\xff\xff\xff"
            or (first == 169 and packed[1] == 254) or socket.inet_ntop(socket.AF_INET, packed) != text):
        return None
    return text


def special_address(ip: str) -> str | None:
    """What makes `ip` an address no Service may have (loopback, unspecified, multicast,
    broadcast, link-local; IPv4-mapped IPv6 ones too), or None. As the API server refuses
    them for ClusterIPs and external IPs: one manifest must not capture the node's own 127.0.0.1:80."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast"
    if address.is_link_local:
        return "link-local"
    return None


class Reader:
    """Reads one object's fields, remembering the path for error messages."""

    __slots__ = ("kind", "ref", "data", "_parent", "_step")

    def __init__(self, kind: str, ref: str, data: Any, parent: "Reader | None" = None, step: str = ""):
        self.kind = kind
        self.ref = ref
        self.data = data
        # The path is spelled out only when an error needs it: parsing 10,000
        # Services must not build a string per field it reads.
        self._parent = parent
        self._step = step

    @property
    def path(self) -> str:
        if self._parent is None:
            return self._step
        return self._parent._join(self._step)

    def fail(self, problem: str, field: str = "") -> InvalidObject:
        return InvalidObject(self.kind, self.ref, self._join(field) or "<object>", problem)

    def _join(self, field: str) -> str:
        if not field:
            return self.path
        if field.startswith("["):
            return f"{self.path}{field}"
        return f"{self.path}.{field}" if self.path else field

    def _get(self, field: str) -> Any:
        if not isinstance(self.data, dict):
            return _MISSING
        value = self.data.get(field, _MISSING)
        return _MISSING if value is None else value

    def child(self, field: str) -> "Reader":
        value = self._get(field)
        if value is _MISSING:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(f"must be an object, got {type(value).__name__}", field)
        return Reader(self.kind, self.ref, value, self, field)

    def items(self, field: str) -> Iterator["Reader"]:
        value = self._get(field)
        if value is _MISSING:
            return
        if not isinstance(value, list):
            raise self.fail(f"must be a list, got {type(value).__name__}", field)
        holder = Reader(self.kind, self.ref, value, self, field)
        for index, item in enumerate(value):
            yield Reader(self.kind, self.ref, item, holder, f"[{index}]")

    def str(self, field: str, default: str = "") -> str:
        value = self._get(field)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.fail(f"must be a string, got {value!r}", field)
        return value

    def name(self, field: str, rule: NameRule) -> str:
        """An optional string that must follow `rule` when present and not empty."""
        value = self.str(field)
        if value:
            problem = rule.problem(value)
            if problem is not None:
                raise self.fail(problem, field)
        return value

    def has(self, field: str) -> bool:
        """True when the field is present and not null, whatever its type."""
        return self._get(field) is not _MISSING

    def bool(self, field: str, default: bool) -> bool:
        value = self._get(field)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"must be true or false, got {value!r}", field)
        return value

    def int(self, field: str, default: int | None = None, low: int = 0, high: int = 2**31 - 1) -> int | None:
        value = self._get(field)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"must be an integer, got {value!r}", field)
        if not low <= value <= high:
            raise self.fail(f"must be between {low} and {high}, got {value}", field)
        return value

    def port(self, field: str, required: bool = False) -> int | None:
        value = self.int(field, None, 1, 65535)
        if value is None and required:
            raise self.fail("is required", field)
        return value

    def choice(self, field: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.str(field, default)
        if value not in allowed:
            raise self.fail(f"must be one of {', '.join(allowed)}, got {value!r}", field)
        return value

    def str_map(self, field: str) -> tuple[tuple[str, str], ...]:
        value = self._get(field)
        if value is _MISSING:
            return ()
        if not isinstance(value, dict):
            raise self.fail("must be a map of strings", field)
        pairs = []
        for key, item in value.items():
            if not isinstance(key, str) or not isinstance(item, (str, int, float, bool)):
                raise self.fail(f"entry {key!r} must map a string to a string", field)
            pairs.append((key, item if isinstance(item, str) else str(item)))
        return tuple(sorted(pairs))

    def ip(self, field: str) -> str | None:
        value = self.str(field)
        if not value:
            return None
        return self.parse_ip(value, field)

    def parse_ip(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"must be an IP address, got {value!r}", field)
        canonical = canonical_ip(value)
        if canonical is None:
            raise self.fail(f"is not a valid IP address: {value!r}", field)
        return canonical

    def service_ip(self, value: Any, field: str) -> str:
        """An address a Service may be reached at: valid, and not loopback, multicast and the like."""
        ip = self.parse_ip(value, field)
        kind = special_address(ip)
        if kind is not None:
            raise self.fail(f"may not be a {kind} address, got {value!r}", field)
        return ip

    def ip_list(self, field: str) -> tuple[str, ...]:
        return tuple(item.parse_ip(item.data, "") for item in self.items(field))

    def service_ip_list(self, field: str) -> tuple[str, ...]:
        """Distinct Service addresses, in their order."""
        return tuple(dict.fromkeys(item.service_ip(item.data, "") for item in self.items(field)))

    def cidr_list(self, field: str) -> tuple[str, ...]:
        cidrs = []
        for item in self.items(field):
            try:
                cidrs.append(str(ipaddress.ip_network(str(item.data).strip(), strict=False)))
            except ValueError:
                raise item.fail(f"is not a valid CIDR: {item.data!r}") from None
        return tuple(cidrs)
