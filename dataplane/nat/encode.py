"""Typed nftables operations -> nf_tables netlink messages, attribute for attribute as nft 1.0.6 writes them.

Invariant: for every operation it accepts, `encode()` produces the messages
nft itself would send for the same command's text (the same expressions,
registers, set flags, key types and userdata), so `nft list` prints a table
programmed here exactly as one programmed by `nft -f`; tests/e2e compares
the two. What it cannot express it refuses with `Unsupported`, before a
single byte is sent, and the caller falls back to nft's text.

Messages the kernel only needs simple attributes for (tables, chains, rule
flushes, set deletion) are built with pyroute2's nftables message classes;
rules, set declarations, elements and counter objects with the small
encoder below: pyroute2 0.9.7 has no NEWOBJ message, encodes `fib`'s result
as a flag set (the kernel wants an enum), nests the set's concatenation
description one level too flat, and takes about 1 ms per rule and 0.2 ms
per element, where a full sync carries 200,000 elements.

Element keys and values arrive as nft literal text (`10.96.0.1 . tcp . 80`,
`goto cluster-3`, `0x00000001`) and are parsed here by the container's
declared types.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Iterable

from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELCHAIN, NFT_MSG_DELOBJ, NFT_MSG_DELRULE, NFT_MSG_DELSET, NFT_MSG_DELSETELEM, NFT_MSG_DELTABLE,
    NFT_MSG_NEWCHAIN, NFT_MSG_NEWOBJ, NFT_MSG_NEWRULE, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_MSG_NEWTABLE,
    nft_chain_msg, nft_rule_msg, nft_set_msg, nft_table_msg,
)

from .expr import (
    PROTOCOLS, AnonSet, BinOp, Counter, Interval, Jhash, Lookup, Masquerade, Match, Nat, Queue, Reject, Selector,
    SetMeta, SetRef, SetUpdate, Verdict, Vmap,
)
from .ruleset import AddRule, Chain, Container, Elements, Operation, Table, Transaction, safe_comment

NLM_F_REQUEST, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x400, 0x800
NLA_F_NESTED = 0x8000
FAMILIES = {"ip": socket.AF_INET, "ip6": socket.AF_INET6}
HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}


class Unsupported(ValueError):
    """An operation this encoder does not express; the caller applies the transaction as nft text."""


@dataclass(frozen=True, slots=True)
class Message:
    type: int  # NFT_MSG_*
    flags: int
    family: int
    body: bytes  # the attributes, after the nfgenmsg header
    label: str  # the command, for error messages


# ---------------------------------------------------------------------------------------------
# Netlink attributes


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def be64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">Q", value))


def strz(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def host32(value: int) -> bytes:
    return struct.pack("=I", value & 0xFFFFFFFF)


def _udata(items: Iterable[tuple[int, bytes]]) -> bytes:
    """libnftnl's userdata TLVs: type and length one byte each."""
    return b"".join(struct.pack("BB", kind, len(value)) + value for kind, value in items)


def _pyroute2_body(cls, family: int, attrs: list) -> bytes:
    msg = cls()
    msg["nfgen_family"] = family
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data[20:])  # past nlmsghdr (16) and nfgenmsg (4): the framing is netlink.py's


# ---------------------------------------------------------------------------------------------
# Datatypes: (nft type id, length in bytes, byte order: 1 host, 2 network)

DATATYPES = {
    "verdict": (1, 0, 0),
    "integer": (4, 4, 1),
    "ipv4_addr": (7, 4, 2),
    "ipv6_addr": (8, 16, 2),
    "inet_proto": (12, 1, 1),
    "inet_service": (13, 2, 2),
    "mark": (19, 4, 1),
    "ct_state": (26, 4, 1),
    "ct_status": (28, 4, 1),
    "fib_addrtype": (38, 4, 1),
}
VERDICT_DATA = 0xFFFFFF00  # NFT_DATA_VERDICT
CT_STATE_BITS = {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64}
CT_STATUS_BITS = {"expected": 1, "seen-reply": 2, "assured": 4, "confirmed": 8, "snat": 16, "dnat": 32, "dying": 512}
FIB_ADDRTYPES = {"unspec": 0, "unicast": 1, "local": 2, "broadcast": 3, "anycast": 4, "multicast": 5,
                 "blackhole": 6, "unreachable": 7, "prohibit": 8}
VERDICTS = {"drop": 0, "accept": 1, "continue": -1, "jump": -3, "goto": -4, "return": -5}


def _type_of(part) -> str:
    return part.type if isinstance(part, (Selector, BinOp, Jhash, Lookup)) else str(part)


def _padded(length: int) -> int:
    return (length + 3) & ~3


def type_id(types: tuple[str, ...]) -> int:
    """A concatenation's type: its parts' type ids, six bits each (nft's TYPE_BITS)."""
    value = 0
    for name in types:
        value = (value << 6) | DATATYPES[name][0]
    return value


def key_length(types: tuple[str, ...]) -> int:
    if len(types) == 1:
        return DATATYPES[types[0]][1]
    return sum(_padded(DATATYPES[name][1]) for name in types)


# ---------------------------------------------------------------------------------------------
# Literal values


def value_bytes(type_: str, value) -> bytes:
    """One literal in the kernel's layout for `type_` (canonical Python value or nft text)."""
    if type_ == "ipv4_addr":
        return ipaddress.IPv4Address(value).packed
    if type_ == "ipv6_addr":
        return ipaddress.IPv6Address(value).packed
    if type_ == "inet_proto":
        return bytes([PROTOCOLS[value] if isinstance(value, str) and value in PROTOCOLS else int(value)])
    if type_ == "inet_service":
        return struct.pack(">H", int(value))
    if type_ in ("integer", "mark"):
        return host32(int(value, 0) if isinstance(value, str) else value)
    if type_ == "ct_state":
        return host32(_flags(CT_STATE_BITS, value))
    if type_ == "ct_status":
        return host32(_flags(CT_STATUS_BITS, value))
    if type_ == "fib_addrtype":
        (name,) = value
        return host32(FIB_ADDRTYPES[name])
    raise Unsupported(f"no netlink encoding for a {type_} value")


def _flags(bits: dict[str, int], names) -> int:
    mask = 0
    for name in names:
        mask |= bits[name]
    return mask


class TextKeys:
    """Parses element keys and values (nft literal text) into key bytes.

    Caches live as long as one `data_attr()` encoder, that is one batch of
    at most a few thousand sorted elements: long enough for the fields and
    key prefixes that repeat there, short enough that a full sync of 30,000
    Services never holds a cache of every address.
    """

    @staticmethod
    def field(type_: str, text: str) -> bytes:
        try:
            if type_ == "ipv4_addr" and text.count(".") == 3:
                return socket.inet_aton(text)
            if type_ == "ipv6_addr":
                return socket.inet_pton(socket.AF_INET6, text)
            return value_bytes(type_, text)
        except (ValueError, OSError, KeyError, struct.error) as error:
            # nft, given the same text, names the bad element in its own words
            raise Unsupported(f"{type_} {text!r}: {error}") from None

    def data_attr(self, kind: int, types: tuple[str, ...]):
        """A function from key text to the whole attribute `kind { NFTA_DATA_VALUE <key> }`: the hot
        loop of a full sync, so headers are computed once per container and fields come from caches."""
        length = key_length(types)
        pad = b"\0" * (-length % 4)
        header = struct.pack("=HHHH", 8 + length + len(pad), kind | NLA_F_NESTED, 4 + length, 1)
        count = len(types)
        caches: list[dict[str, bytes]] = [{} for _ in types]
        field = self.field

        def fields(parts: list[str], kinds: tuple[str, ...], stores: list[dict]) -> bytes:
            out = []
            for cache, part, type_ in zip(stores, parts, kinds):
                data = cache.get(part)
                if data is None:
                    data = field(type_, part)
                    if count > 1:
                        data += b"\0" * (-len(data) % 4)
                    cache[part] = data
                out.append(data)
            return b"".join(out)

        if count == 1:
            def encode(text: str) -> bytes:
                return header + fields([text], types, caches) + pad

            return encode
        # Keys share their leading fields (a Service's address . proto . port before each endpoint slot):
        # those are encoded once.
        prefixes: dict[str, bytes] = {}
        last_type, last_cache = types[-1:], caches[-1:]

        def encode(text: str) -> bytes:
            prefix, _, last = text.rpartition(" . ")
            head = prefixes.get(prefix)
            if head is None:
                parts = prefix.split(" . ")
                if len(parts) != count - 1:
                    raise Unsupported(f"element {text!r} does not have {count} fields")
                head = prefixes[prefix] = fields(parts, types[:-1], caches[:-1])
            tail = last_cache[0].get(last)
            if tail is None:
                tail = fields([last], last_type, last_cache)
            return header + head + tail + pad

        return encode

    def interval_concat(self, types: tuple[str, ...], text: str) -> tuple[bytes, bytes]:
        """(start, end) of a key of an interval set with a concatenated key; a CIDR or `a-b` field is a range."""
        parts = text.split(" . ")
        if len(parts) != len(types):
            raise Unsupported(f"element {text!r} does not have {len(types)} fields")
        lo, hi = [], []
        for type_, part in zip(types, parts):
            if type_ in ("ipv4_addr", "ipv6_addr") and "/" in part:
                network = ipaddress.ip_network(part, strict=False)
                first, last = network.network_address.packed, network.broadcast_address.packed
            elif "-" in part and type_ != "ipv6_addr":
                a, b = part.split("-", 1)
                first, last = self.field(type_, a.strip()), self.field(type_, b.strip())
            else:
                first = last = self.field(type_, part)
            pad = b"\0" * (-len(first) % 4)
            lo.append(first + pad)
            hi.append(last + pad)
        return b"".join(lo), b"".join(hi)


def verdict_data(text: str) -> bytes:
    """NFTA_DATA_VERDICT of `goto chain`, `drop`, ..."""
    word, _, chain = text.partition(" ")
    if word not in VERDICTS:
        raise Unsupported(f"not a verdict: {text!r}")
    parts = [be32(1, VERDICTS[word])]
    if chain:
        parts.append(strz(2, chain))
    return nest(2, *parts)


# ---------------------------------------------------------------------------------------------
# Expressions


def _expr(name: str, *attrs: bytes) -> bytes:
    return nest(1, strz(1, name), nest(2, *attrs))


def reg(offset_words: int) -> int:
    """The register nft names for a 32-bit word offset: the 16-byte NFT_REG_n when aligned, else NFT_REG32_nn."""
    return 1 + offset_words // 4 if offset_words % 4 == 0 else 8 + offset_words


_PAYLOAD = {  # selector text -> (base, offset, length)
    "ip saddr": (1, 12, 4), "ip daddr": (1, 16, 4),
    "ip6 saddr": (1, 8, 16), "ip6 daddr": (1, 24, 16),
    "th dport": (2, 2, 2), "th sport": (2, 0, 2),
}
_META = {"meta l4proto": 16, "meta mark": 3}
_CT = {"ct state": 0, "ct status": 2, "ct mark": 3}
# typeof userdata: (payload protocol description, template field) as nft numbers them
_PAYLOAD_UDATA = {
    "ip saddr": (12, 11), "ip daddr": (12, 12), "ip6 saddr": (13, 8), "ip6 daddr": (13, 9),
    "th sport": (11, 1), "th dport": (11, 2),
}


def payload(dreg: int, base: int, offset: int, length: int) -> bytes:
    return _expr("payload", be32(1, dreg), be32(2, base), be32(3, offset), be32(4, length))


def load(selector: Selector | BinOp | Jhash, dreg: int, scratch: int = 4) -> list[bytes]:
    """The expressions that put `selector` into register `dreg`; a hash loads its inputs from the
    32-bit word `scratch` on (the first word nft's register allocator has free at that point)."""
    if isinstance(selector, BinOp):
        mask, xor = _bitwise(selector)
        return [*load(_root(selector), dreg), _bitwise_expr(dreg, mask, xor, with_op=True)]
    if isinstance(selector, Jhash):
        inputs = load_concat(selector.inputs, scratch)
        length = sum(_padded(_length(part)) for part in selector.inputs)
        # NFTA_HASH_SREG, _DREG, _LEN, _MODULUS, _SEED, _OFFSET, _TYPE (NFT_HASH_JENKINS), in libnftnl's order
        return [*inputs, _expr("hash", be32(1, reg(scratch)), be32(2, dreg), be32(3, length), be32(4, selector.mod),
                               be32(5, selector.seed), be32(6, 0), be32(7, 0))]
    if not isinstance(selector, Selector):
        raise Unsupported(f"the expression {selector}")
    text = selector.text
    if text in _PAYLOAD:
        return [payload(dreg, *_PAYLOAD[text])]
    if text in _META:
        return [_expr("meta", be32(2, _META[text]), be32(1, dreg))]
    if text in _CT:
        return [_expr("ct", be32(2, _CT[text]), be32(1, dreg))]
    if text == "fib saddr type":
        return [_expr("fib", be32(3, 1), be32(2, 3), be32(1, dreg))]  # flags F_SADDR, result ADDRTYPE
    if selector.modulus:
        return [_expr("numgen", be32(1, dreg), be32(2, selector.modulus), be32(3, 1), be32(4, 0))]
    raise Unsupported(f"no netlink encoding for {text}")


def load_concat(expr: tuple, start: int = 0, interval: bool = False, scratch: int | None = None) -> list[bytes]:
    """The expressions that put a concatenation into the registers from 32-bit word `start` on, each part
    padded to whole words as the kernel lays a concatenated key out; a hash among them loads its own
    inputs from word `scratch` on (by default the first word past the concatenation)."""
    words = sum(_padded(_length(part)) // 4 for part in expr)
    scratch = start + words if scratch is None else scratch
    out, offset = [], start
    for part in expr:
        r = reg(offset)
        out += load(part, r, scratch)
        if interval and len(expr) > 1 and DATATYPES[_type_of(part)][2] == 1 and _length(part) == 1:
            # A concatenated interval key is compared in network order: nft converts host-order bytes.
            out.append(_expr("byteorder", be32(1, r), be32(2, r), be32(3, 1), be32(4, 1), be32(5, 2)))
        offset += _padded(_length(part)) // 4
    return out


def _root(expr: Selector | BinOp) -> Selector:
    while isinstance(expr, BinOp):
        expr = expr.left
    return expr


def _bitwise(expr: BinOp) -> tuple[int, int]:
    """(mask, xor) with (x & mask) ^ xor equal to the whole chain of & | ^ (nft folds them into one)."""
    mask, xor = 0xFFFFFFFF, 0
    chain = []
    while isinstance(expr, BinOp):
        chain.append(expr)
        expr = expr.left
    for op in reversed(chain):
        if op.op == "&":
            m, x = op.value, 0
        elif op.op == "|":
            m, x = ~op.value & 0xFFFFFFFF, op.value
        elif op.op == "^":
            m, x = 0xFFFFFFFF, op.value
        else:
            raise Unsupported(f"operator {op.op}")
        mask, xor = mask & m, (xor & m) ^ x
    return mask, xor


def _bitwise_expr(r: int, mask: int, xor: int, with_op: bool, length: int = 4) -> bytes:
    attrs = [be32(1, r), be32(2, r)]
    if with_op:
        attrs.append(be32(6, 0))  # NFT_BITWISE_BOOL: nft writes it for `&`/`|`/`^`, not for a flag test
    attrs += [be32(3, length), nest(4, attr(1, _int_bytes(mask, length))), nest(5, attr(1, _int_bytes(xor, length)))]
    return _expr("bitwise", *attrs)


def _int_bytes(value: int, length: int) -> bytes:
    return host32(value) if length == 4 else value.to_bytes(length, "big")


def cmp(r: int, op: str, data: bytes) -> bytes:
    return _expr("cmp", be32(1, r), be32(2, 1 if op == "!=" else 0), nest(3, attr(1, data)))


def immediate(r: int, data: bytes) -> bytes:
    return _expr("immediate", be32(1, r), nest(2, attr(1, data)))


def verdict_expr(verdict: Verdict) -> bytes:
    return _expr("immediate", be32(1, 0), nest(2, verdict_data(str(verdict))))


def _length(part) -> int:
    if isinstance(part, Selector) and part.text in _PAYLOAD:
        return _PAYLOAD[part.text][2]
    return DATATYPES[_type_of(part)][1]


def typeof_udata(part) -> bytes | None:
    """nft's description of one typeof expression (set userdata), or None where nft writes none."""
    if isinstance(part, Selector) and part.text in _PAYLOAD_UDATA:
        desc, field = _PAYLOAD_UDATA[part.text]
        return _udata([(0, host32(7)), (1, _udata([(0, host32(desc)), (1, host32(field))]))])
    if isinstance(part, Selector) and part.text in _META:
        return _udata([(0, host32(9)), (1, _udata([(0, host32(_META[part.text]))]))])
    if isinstance(part, Selector) and part.modulus:
        return _udata([(0, host32(23)), (1, _udata([(0, host32(1)), (1, host32(part.modulus)), (2, host32(0))]))])
    return None


def _typeof_concat(parts: tuple) -> bytes:
    if len(parts) == 1:
        found = typeof_udata(parts[0])
        if found is None:
            raise Unsupported(f"typeof {parts[0]}")
        return found
    inner = []
    for i, part in enumerate(parts):
        found = typeof_udata(part)
        if found is None:
            raise Unsupported(f"typeof {part}")
        inner.append((i, found))
    return _udata([(0, host32(13)), (1, _udata(inner))])


_CONCAT_OF_TYPES = _udata([(0, host32(13)), (1, b"")])  # what nft writes for a `type a . b` key
_VERDICT_TYPEOF = _udata([(0, host32(1)), (1, b"")])


# ---------------------------------------------------------------------------------------------
# The encoder


@dataclass(frozen=True, slots=True)
class SetInfo:
    """What elements and lookups need to know of a declared map or set."""

    key: tuple[str, ...]  # datatype names
    value: tuple[str, ...]  # datatype names; ("verdict",) for a verdict map; () for a set
    interval: bool

    @classmethod
    def of(cls, container: Container) -> "SetInfo":
        return cls(tuple(map(_type_of, container.key)), tuple(map(_type_of, container.value)),
                   "interval" in container.flags)


class Encoder:
    """Encodes transactions; remembers the key types of every map and set a committed transaction declared.

    `encode()` is pure with respect to that memory; `commit()` (after the
    kernel accepted the transaction, whichever applier sent it) moves it forward.
    """

    def __init__(self):
        self.sets: dict[tuple[str, str, str], SetInfo] = {}  # (family, table, name) -> info
        self.keys = TextKeys()
        self._rules: dict[tuple, bytes] = {}  # (family, table, rule) -> expressions, for rules without anonymous sets

    # -- the memory of declared containers

    def commit(self, tx: Transaction) -> None:
        self.sets = self._after(tx, dict(self.sets))

    def forget(self, family: str, table: str) -> None:
        self.sets = {k: v for k, v in self.sets.items() if k[:2] != (family, table)}

    @staticmethod
    def _after(tx: Transaction, sets: dict) -> dict:
        for op in tx.commands:
            if not isinstance(op, Operation):
                continue
            table = op.table
            if op.subject is None and op.verb == "delete":
                for key in [k for k in sets if k[:2] == (table.family, table.name)]:
                    del sets[key]
            elif isinstance(op.subject, Container) and op.subject.kind != "counter":
                key = (table.family, table.name, op.subject.name)
                if op.verb == "add":
                    sets[key] = SetInfo.of(op.subject)
                elif op.verb == "delete":
                    sets.pop(key, None)
        return sets

    # -- transactions

    def encode(self, tx: Transaction) -> list[Message]:
        """Every message of `tx`, in order; raises Unsupported (nothing sent yet) for what it cannot express."""
        batch = _Batch(self, dict(self.sets))
        for op in tx.commands:
            if not isinstance(op, Operation):
                raise Unsupported("a command given as text")
            batch.operation(op)
        return batch.messages


class _Batch:
    """The messages of one transaction, with the set ids nft gives sets declared in it."""

    ELEMENTS_PER_NEST = 60_000  # bytes: an attribute's length is 16 bits

    def __init__(self, encoder: Encoder, sets: dict):
        self.encoder = encoder
        self.sets = sets
        self.messages: list[Message] = []
        self.set_ids: dict[tuple[str, str, str], int] = {}
        self.next_id = 1
        self.comments: dict[str, bytes] = {}  # element comment -> its userdata attribute, for this batch

    def add(self, type_: int, flags: int, table: Table, body: bytes, label: str) -> None:
        self.messages.append(Message(type_, flags, _family(table), body, label))

    def new_set_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def operation(self, op: Operation) -> None:
        verb, table, subject = op.verb, op.table, op.subject
        family = _family(table)
        if subject is None:
            if verb == "add":
                body = _pyroute2_body(nft_table_msg, family, [("NFTA_TABLE_NAME", table.name), ("NFTA_TABLE_FLAGS", 0)])
                self.add(NFT_MSG_NEWTABLE, NLM_F_REQUEST, table, body, f"add table {table}")
            elif verb == "delete":
                body = _pyroute2_body(nft_table_msg, family, [("NFTA_TABLE_NAME", table.name)])
                self.add(NFT_MSG_DELTABLE, NLM_F_REQUEST, table, body, f"delete table {table}")
                for key in [k for k in self.sets if k[:2] == (table.family, table.name)]:
                    del self.sets[key]
            elif verb == "flush":
                body = _pyroute2_body(nft_rule_msg, family, [("NFTA_RULE_TABLE", table.name)])
                self.add(NFT_MSG_DELRULE, NLM_F_REQUEST, table, body, f"flush table {table}")
            else:
                raise Unsupported(f"{verb} table")
        elif isinstance(subject, Chain):
            self.chain(verb, table, subject)
        elif isinstance(subject, Container):
            if subject.kind == "counter":
                self.counter(verb, table, subject)
            else:
                self.container(verb, table, subject)
        elif isinstance(subject, AddRule) and verb == "add":
            self.rule(table, subject)
        elif isinstance(subject, Elements) and verb in ("add", "delete"):
            self.elements(verb, table, subject)
        else:
            raise Unsupported(f"{verb} {type(subject).__name__}")

    # -- chains, counters, sets

    def chain(self, verb: str, table: Table, chain: Chain) -> None:
        family = _family(table)
        label = f"{verb} chain {table} {chain.name}"
        if verb == "add":
            attrs = [("NFTA_CHAIN_TABLE", table.name), ("NFTA_CHAIN_NAME", chain.name)]
            if chain.base is not None:
                if chain.base.hook not in HOOKS:
                    raise Unsupported(f"hook {chain.base.hook}")
                attrs += [("NFTA_CHAIN_TYPE", chain.base.type), ("NFTA_CHAIN_POLICY", 1),
                          ("NFTA_CHAIN_HOOK", {"attrs": [("NFTA_HOOK_HOOKNUM", HOOKS[chain.base.hook]),
                                                         ("NFTA_HOOK_PRIORITY", chain.base.priority)]})]
            self.add(NFT_MSG_NEWCHAIN, NLM_F_REQUEST | NLM_F_CREATE, table,
                     _pyroute2_body(nft_chain_msg, family, attrs), label)
        elif verb == "delete":
            body = _pyroute2_body(nft_chain_msg, family,
                                  [("NFTA_CHAIN_TABLE", table.name), ("NFTA_CHAIN_NAME", chain.name)])
            self.add(NFT_MSG_DELCHAIN, NLM_F_REQUEST, table, body, label)
        elif verb == "flush":
            body = _pyroute2_body(nft_rule_msg, family,
                                  [("NFTA_RULE_TABLE", table.name), ("NFTA_RULE_CHAIN", chain.name)])
            self.add(NFT_MSG_DELRULE, NLM_F_REQUEST, table, body, label)
        else:
            raise Unsupported(f"{verb} chain")

    def counter(self, verb: str, table: Table, counter: Container) -> None:
        head = strz(1, table.name) + strz(2, counter.name) + be32(3, 1)  # NFT_OBJECT_COUNTER
        if verb == "add":
            body = head + nest(4, be64(1, 0), be64(2, 0))
            self.add(NFT_MSG_NEWOBJ, NLM_F_REQUEST | NLM_F_CREATE, table, body, f"add counter {table} {counter.name}")
        elif verb == "delete":
            self.add(NFT_MSG_DELOBJ, NLM_F_REQUEST, table, head + nest(4), f"delete counter {table} {counter.name}")
        else:
            raise Unsupported(f"{verb} counter")

    def container(self, verb: str, table: Table, container: Container) -> None:
        key = (table.family, table.name, container.name)
        label = f"{verb} {container.kind} {table} {container.name}"
        if verb == "delete":
            body = _pyroute2_body(nft_set_msg, _family(table), [("NFTA_SET_TABLE", table.name),
                                                                 ("NFTA_SET_NAME", container.name)])
            self.add(NFT_MSG_DELSET, NLM_F_REQUEST, table, body, label)
            self.sets.pop(key, None)
            return
        if verb != "add":
            raise Unsupported(f"{verb} {container.kind}")
        info = SetInfo.of(container)
        unknown = set(info.key + info.value) - DATATYPES.keys()
        if unknown or not info.key or set(container.flags) - {"interval", "dynamic", "timeout"}:
            raise Unsupported(f"{container.kind} {container.name}: {container.spec}")
        flags = 0
        if info.value:
            flags |= 0x8  # NFT_SET_MAP
        if info.interval:
            flags |= 0x4 | (0x80 if len(info.key) > 1 else 0)  # INTERVAL, CONCAT (pipapo)
        if "timeout" in container.flags or container.timeout:
            flags |= 0x10
        if "dynamic" in container.flags:
            flags |= 0x20  # NFT_SET_EVAL
        set_id = self.new_set_id()
        body = [strz(1, table.name), strz(2, container.name), be32(3, flags), be32(4, type_id(info.key)),
                be32(5, key_length(info.key))]
        if info.value:
            if info.value == ("verdict",):
                body += [be32(6, VERDICT_DATA), be32(7, 0)]
            else:
                body += [be32(6, type_id(info.value)), be32(7, key_length(info.value))]
        body.append(be32(10, set_id))
        if container.timeout:
            body.append(be64(11, container.timeout * 1000))
        if info.interval and len(info.key) > 1:
            fields = b"".join(nest(1, be32(1, DATATYPES[t][1])) for t in info.key)
            body.append(nest(9, nest(2, fields)))  # NFTA_SET_DESC { CONCAT { LIST_ELEM { FIELD_LEN } ... } }
        body.append(attr(13, self._set_udata(container, info)))
        self.add(NFT_MSG_NEWSET, NLM_F_REQUEST | NLM_F_CREATE, table, b"".join(body), label)
        self.sets[key] = info
        self.set_ids[key] = set_id

    @staticmethod
    def _set_udata(container: Container, info: SetInfo) -> bytes:
        def byteorder(types: tuple[str, ...]) -> int:
            return 0 if len(types) > 1 else DATATYPES[types[0]][2]

        items = [(0, host32(byteorder(info.key)))]
        if info.value:
            items.append((1, host32(byteorder(info.value))))
        if container.typeof:
            items.append((3, _typeof_concat(container.key)))
        elif len(info.key) > 1:
            items.append((3, _CONCAT_OF_TYPES))
        if info.value:
            if container.typeof and info.value != ("verdict",):
                items.append((4, _typeof_concat(container.value)))
            elif len(info.value) > 1:
                items.append((4, _CONCAT_OF_TYPES))
            items.append((6, host32(0)))  # NFTNL_UDATA_SET_DATA_INTERVAL
        return _udata(items)

    # -- elements

    def elements(self, verb: str, table: Table, elements: Elements) -> None:
        key = (table.family, table.name, elements.container)
        info = self.sets.get(key)
        if info is None:
            raise Unsupported(f"elements of {elements.container}, whose types this process never declared")
        keys = self.encoder.keys
        encoded = []
        concat_interval = info.interval and len(info.key) > 1
        if info.interval and not concat_interval:
            raise Unsupported(f"elements of the interval set {elements.container}")
        key_attr = keys.data_attr(1, info.key)  # NFTA_SET_ELEM_KEY
        value_attr = keys.data_attr(2, info.value) if info.value and info.value != ("verdict",) else None
        verdicts: dict[str, bytes] = {}
        comments = self.comments
        pack = struct.Struct("=HH").pack
        add = verb == "add"
        for element in elements.elements:
            if concat_interval:
                start, end = keys.interval_concat(info.key, element.key)
                data = nest(1, attr(1, start)) + nest(10, attr(1, end))
            else:
                data = key_attr(element.key)
            if add:
                if value_attr is not None:
                    data += value_attr(element.value)
                elif info.value:
                    verdict = verdicts.get(element.value)
                    if verdict is None:
                        verdict = verdicts[element.value] = nest(2, verdict_data(element.value))
                    data += verdict
                if element.comment:
                    comment = comments.get(element.comment)
                    if comment is None:
                        text = safe_comment(element.comment).encode() + b"\0"
                        comment = comments[element.comment] = attr(6, _udata([(0, text)]))
                    data += comment
            encoded.append(pack(4 + len(data), 1 | NLA_F_NESTED) + data)  # NFTA_LIST_ELEM
        self._element_messages(verb, table, elements.container, self.set_ids.get(key), encoded)

    def _element_messages(self, verb: str, table: Table, name: str, set_id: int | None, encoded: list[bytes]) -> None:
        kind = NFT_MSG_NEWSETELEM if verb == "add" else NFT_MSG_DELSETELEM
        flags = NLM_F_REQUEST | (NLM_F_CREATE if verb == "add" else 0)
        head = strz(1, table.name) + strz(2, name) + (be32(4, set_id) if set_id is not None else b"")
        label = f"{verb} element {table} {name}"
        chunk: list[bytes] = []
        size = 0
        for item in encoded:
            if chunk and size + len(item) > self.ELEMENTS_PER_NEST:
                self.add(kind, flags, table, head + nest(3, *chunk), label)
                chunk, size = [], 0
            chunk.append(item)
            size += len(item)
        if chunk:
            self.add(kind, flags, table, head + nest(3, *chunk), label)

    # -- rules

    def rule(self, table: Table, add: AddRule) -> None:
        # A rule's bytes depend on the sets it reads (an interval key adds a byteorder): they are in the key.
        cache_key = (table.family, table.name, add.rule,
                     tuple(self.sets.get((table.family, table.name, name)) for name in sorted(add.rule.sets)))
        cached = self.encoder._rules.get(cache_key)
        if cached is None:
            ctx = _RuleContext(self, table)
            exprs = b"".join(ctx.statement(s) for s in add.rule.statements)
            if not ctx.anonymous and not ctx.uses_set_ids:
                if len(self.encoder._rules) > 20_000:
                    self.encoder._rules.clear()
                self.encoder._rules[cache_key] = exprs
        else:
            exprs = cached
        body = strz(1, table.name) + strz(2, add.chain) + nest(4, exprs)
        self.add(NFT_MSG_NEWRULE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND, table, body,
                 f"add rule {table} {add.chain} {add.rule}")


def _family(table: Table) -> int:
    try:
        return FAMILIES[table.family]
    except KeyError:
        raise Unsupported(f"family {table.family}") from None


class _RuleContext:
    """Encodes one rule's statements; anonymous sets it needs become messages before the rule's."""

    def __init__(self, batch: _Batch, table: Table):
        self.batch = batch
        self.table = table
        self.anonymous = False
        self.uses_set_ids = False

    def _set_ref(self, name: str) -> list[bytes]:
        """NFTA_*_SET name, plus the id of a set declared in this same batch (as nft writes)."""
        set_id = self.batch.set_ids.get((self.table.family, self.table.name, name))
        if set_id is None:
            return [strz(1, name)]
        self.uses_set_ids = True
        return [strz(1, name), be32(4, set_id)]

    def _info(self, name: str) -> SetInfo:
        info = self.batch.sets.get((self.table.family, self.table.name, name))
        if info is None:
            raise Unsupported(f"a rule reading {name}, whose types this process never declared")
        return info

    def statement(self, s) -> bytes:
        if isinstance(s, Match):
            return b"".join(self.match(s))
        if isinstance(s, Verdict):
            return verdict_expr(s)
        if isinstance(s, Vmap):
            return b"".join(self.vmap(s))
        if isinstance(s, Nat):
            return b"".join(self.nat(s))
        if isinstance(s, SetMeta):
            return b"".join(self.set_meta(s))
        if isinstance(s, SetUpdate):
            if s.op not in ("update", "add"):
                raise Unsupported(f"{s.op} @set")
            # NFTA_DYNSET_SREG_KEY, _OP (add 0, update 1), _SET_NAME, _SET_ID
            attrs = [be32(4, 1), be32(3, 1 if s.op == "update" else 0), strz(1, s.set)]
            set_id = self.batch.set_ids.get((self.table.family, self.table.name, s.set))
            if set_id is not None:
                self.uses_set_ids = True
                attrs.append(be32(2, set_id))
            return b"".join(load_concat(s.expr)) + _expr("dynset", *attrs)
        if isinstance(s, Masquerade):
            flags = 0
            for flag in s.flags:
                flags |= {"random": 0x4, "persistent": 0x8, "fully-random": 0x10}[flag]
            return _expr("masq", *([be32(1, flags)] if flags else []))
        if isinstance(s, Reject):
            family = self.table.family
            if s.how == "" and family == "ip":
                code = 3  # ICMP port unreachable
            elif s.how in ("", "icmpv6 type port-unreachable") and family == "ip6":
                code = 4  # ICMPv6 port unreachable
            elif s.how == "icmp type port-unreachable" and family == "ip":
                code = 3
            else:
                raise Unsupported(f"reject with {s.how} in {family}")
            return _expr("reject", be32(1, 0), attr(2, bytes([code])))
        if isinstance(s, Counter):
            if s.name:
                return _expr("objref", be32(1, 1), attr(2, s.name.encode()))
            return nest(1, strz(1, "counter"), nest(2))
        if isinstance(s, Queue):
            first, _, last = s.numbers.partition("-")
            lo, hi = int(first), int(last or first)
            attrs = [attr(1, struct.pack(">H", lo)), attr(2, struct.pack(">H", hi - lo + 1))]
            if s.bypass:
                attrs.append(attr(3, struct.pack(">H", 1)))
            return _expr("queue", *attrs)
        raise Unsupported(f"statement {s}")

    def match(self, m: Match) -> list[bytes]:
        right = m.right
        if isinstance(right, SetRef):
            info = self._info(right.name)
            out = load_concat(m.expr, interval=info.interval)
            attrs = [be32(2, 1), *self._set_ref(right.name)]
            if m.op == "!=":
                attrs.append(be32(5, 1))  # NFT_LOOKUP_F_INV
            elif m.op not in ("", "=="):
                raise Unsupported(f"{m.op} @set")
            return out + [_expr("lookup", *attrs)]
        if len(m.expr) != 1:
            raise Unsupported(f"a literal compared with a concatenation: {m}")
        part = m.expr[0]
        type_ = _type_of(part)
        if isinstance(right, AnonSet):
            return self.anon_set(m, part, type_)
        (value,) = right
        if isinstance(part, BinOp):
            if m.op not in ("", "==", "!="):
                raise Unsupported(str(m))
            return load(part, 1) + [cmp(1, m.op, value_bytes(type_, value))]
        if type_ in ("ct_state", "ct_status"):
            # A flag test: (x & flags) != 0; `!` negates it.
            mask = struct.unpack("=I", value_bytes(type_, value))[0]
            if m.op not in ("", "!"):
                raise Unsupported(str(m))
            return load(part, 1) + [_bitwise_expr(1, mask, 0, with_op=False),
                                    cmp(1, "==" if m.op == "!" else "!=", host32(0))]
        if m.op not in ("", "==", "!="):
            raise Unsupported(str(m))
        return load(part, 1) + [cmp(1, m.op, value_bytes(type_, value))]

    def anon_set(self, m: Match, part, type_: str) -> list[bytes]:
        keys = [key[0] for key in m.right.keys]
        if m.op not in ("", "!="):
            raise Unsupported(str(m))
        if len(keys) == 1:
            value = keys[0]
            if isinstance(value, Interval):
                return self.prefix(m, part, type_, value)
            return load(part, 1) + [cmp(1, m.op, value_bytes(type_, value))]
        intervals = any(isinstance(k, Interval) for k in keys)
        if intervals:
            elements = self._interval_elements(type_, keys)
        else:
            elements = [nest(1, nest(1, attr(1, value_bytes(type_, k)))) for k in keys]
        flags = 0x3 | (0x4 if intervals else 0)  # ANONYMOUS, CONSTANT, INTERVAL
        udata = [(0, host32(DATATYPES[type_][2]))]
        if intervals:
            udata.append((2, host32(1)))  # automerge
        typeof = typeof_udata(part)
        if typeof is not None:
            udata.append((3, typeof))
        name = self._anonymous_set("__set%d", flags, type_, None, len(elements), _udata(udata), elements)
        attrs = [be32(2, 1), strz(1, "__set%d"), be32(4, name)]
        if m.op == "!=":
            attrs.append(be32(5, 1))
        return load(part, 1) + [_expr("lookup", *attrs)]

    def prefix(self, m: Match, part, type_: str, value: Interval) -> list[bytes]:
        """A single CIDR: nft compares the prefix in place of a set."""
        network = ipaddress.summarize_address_range(value.lo, value.hi)
        networks = list(network)
        if len(networks) != 1 or not (isinstance(part, Selector) and part.text in _PAYLOAD):
            raise Unsupported(f"{m}: not one prefix of a packet field")
        net = networks[0]
        base, offset, length = _PAYLOAD[part.text]
        if net.prefixlen % 8 == 0:
            size = net.prefixlen // 8
            if size == 0:
                raise Unsupported(f"{m}: a zero-length prefix")
            return [payload(1, base, offset, size), cmp(1, m.op, net.network_address.packed[:size])]
        mask = int(net.netmask)
        data = [payload(1, base, offset, length),
                _expr("bitwise", be32(1, 1), be32(2, 1), be32(3, length),
                      nest(4, attr(1, mask.to_bytes(length, "big"))), nest(5, attr(1, b"\0" * length)))]
        return data + [cmp(1, m.op, net.network_address.packed)]

    @staticmethod
    def _interval_elements(type_: str, keys: list) -> list[bytes]:
        width = DATATYPES[type_][1]
        top = (1 << (8 * width)) - 1
        ranges = []
        for key in keys:
            lo, hi = (key.lo, key.hi) if isinstance(key, Interval) else (key, key)
            ranges.append((_as_int(type_, lo), _as_int(type_, hi)))
        ranges.sort()
        merged: list[list[int]] = []
        for lo, hi in ranges:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out = []

        def element(value: int, end: bool) -> bytes:
            data = nest(1, attr(1, value.to_bytes(width, "big")))
            return nest(1, (be32(3, 1) if end else b"") + data)  # NFTA_SET_ELEM_FLAGS: INTERVAL_END

        if merged[0][0] != 0:
            out.append(element(0, True))
        for lo, hi in merged:
            out.append(element(lo, False))
            if hi < top:
                out.append(element(hi + 1, True))
        return out

    def _anonymous_set(self, name: str, flags: int, key_type: str, data_type: int | None, size: int,
                       udata: bytes, elements: list[bytes]) -> int:
        self.anonymous = True
        batch, table = self.batch, self.table
        set_id = batch.new_set_id()
        body = [strz(1, table.name), strz(2, name), be32(3, flags), be32(4, DATATYPES[key_type][0]),
                be32(5, DATATYPES[key_type][1])]
        if data_type is not None:
            body += [be32(6, data_type), be32(7, 0)]
        body += [be32(10, set_id), nest(9, be32(1, size)), attr(13, udata)]
        batch.add(NFT_MSG_NEWSET, NLM_F_REQUEST | NLM_F_CREATE, table, b"".join(body), f"anonymous set in {table}")
        # A balancing table's slots (4,093 by default) overflow one attribute: split as named sets' are.
        batch._element_messages("add", table, name, set_id, elements)
        return set_id

    def vmap(self, v: Vmap) -> list[bytes]:
        if isinstance(v.map, SetRef):
            info = self._info(v.map.name)
            return load_concat(v.expr, interval=info.interval) + [
                _expr("lookup", be32(2, 1), be32(3, 0), *self._set_ref(v.map.name))]
        if len(v.expr) != 1:
            raise Unsupported(f"an anonymous map keyed on a concatenation: {v}")
        part = v.expr[0]
        type_ = _type_of(part)
        elements = []
        for (key,), verdict in v.map.entries:
            if isinstance(key, Interval):
                raise Unsupported(f"an interval in an anonymous map: {v}")
            elements.append(nest(1, nest(1, attr(1, value_bytes(type_, key))), nest(2, verdict_data(str(verdict)))))
        udata = [(0, host32(DATATYPES[type_][2])), (1, host32(0))]
        typeof = typeof_udata(part) if not getattr(part, "modulus", 0) else None
        if typeof is not None:
            udata.append((3, typeof))
        udata += [(4, _VERDICT_TYPEOF), (6, host32(0))]
        set_id = self._anonymous_set("__map%d", 0xB, type_, VERDICT_DATA, len(elements), _udata(udata), elements)
        return load(part, 1) + [_expr("lookup", be32(2, 1), be32(3, 0), strz(1, "__map%d"), be32(4, set_id))]

    def nat(self, n: Nat) -> list[bytes]:
        if n.kind not in ("dnat", "snat"):
            raise Unsupported(f"nat {n.kind}")
        kind = 1 if n.kind == "dnat" else 0
        family = FAMILIES[n.family]
        addr_len = 4 if n.family == "ip" else 16
        if n.map:
            info = self._info(n.map)
            if info.value not in (("ipv4_addr", "inet_service"), ("ipv6_addr", "inet_service")):
                raise Unsupported(f"dnat through {n.map}, whose values are not address . port")
            # nft allocates the address register (4 words), then the map's key: a hash in the key loads
            # its inputs past both.
            key_words = sum(_padded(_length(part)) // 4 for part in n.expr)
            out = load_concat(n.expr, scratch=4 + key_words) + [
                _expr("lookup", be32(2, 1), be32(3, 1), *self._set_ref(n.map))]
            port_reg = reg(addr_len // 4)
            return out + [_expr("nat", be32(1, kind), be32(2, family), be32(3, 1), be32(5, port_reg))]
        if n.address is None:
            raise Unsupported(str(n))
        out = [immediate(1, ipaddress.ip_address(n.address).packed)]
        attrs = [be32(1, kind), be32(2, family), be32(3, 1)]
        if n.port is not None:
            out.append(immediate(2, struct.pack(">H", n.port)))
            attrs += [be32(5, 2), be32(7, 0x2)]  # NF_NAT_RANGE_PROTO_SPECIFIED
        else:
            attrs.append(be32(7, 0x1))  # NF_NAT_RANGE_MAP_IPS
        return out + [_expr("nat", *attrs)]

    def set_meta(self, s: SetMeta) -> list[bytes]:
        target = s.target.text
        if target not in _META and target not in _CT:
            raise Unsupported(f"{target} set")
        if isinstance(s.value, int):
            out = [immediate(1, host32(s.value))]
        elif isinstance(s.value, Lookup):
            # `meta mark set KEY map @ids`: the value the map holds for the key, in place of the key.
            info = self._info(s.value.map)
            if info.value != (_type_of(s.target),):
                raise Unsupported(f"{s}: {s.value.map} holds {' . '.join(info.value)}, not {s.target.type}")
            out = load_concat(s.value.expr, interval=info.interval) + [
                _expr("lookup", be32(2, 1), be32(3, 1), *self._set_ref(s.value.map))]
        else:
            out = load(s.value, 1)
        if target in _META:
            return out + [_expr("meta", be32(2, _META[target]), be32(3, 1))]
        return out + [_expr("ct", be32(2, _CT[target]), be32(4, 1))]


def _as_int(type_: str, value) -> int:
    return int.from_bytes(value_bytes(type_, value), "big")

