"""DNS messages in, DNS messages out: the server's logic without any I/O.

`Responder.handle(wire, tcp)` takes the bytes of one query and returns a
command: `Reply(bytes)` to send back, `Forward(...)` for the server to resolve
upstream (it then calls `Responder.relay` with what came back), or None to
drop the datagram. dnspython does the wire format.

Rules kept here, in order:
- Fewer than 12 bytes, or a message with QR set (a response: answering it could
  start a loop between two servers): dropped.
- Not a QUERY (NOTIFY, UPDATE...): NOTIMP. Unparseable: FORMERR. Both echo only
  the header's ID, opcode and RD. Never an exception out of `handle`.
- Not exactly one question: FORMERR. Class other than IN,
  zone transfers and meta types: REFUSED. EDNS version above 0: BADVERS (RFC 6891).
- In the cluster zone: an authoritative answer (AA), NXDOMAIN or NODATA with the
  zone's SOA in the authority section; every TTL, and the negative TTL (SOA
  minimum, RFC 2308), is `ttl`. Before the first snapshot: SERVFAIL, so that no
  client caches a name as missing while the state is still loading.
- Elsewhere: forwarded when there are upstreams, else REFUSED.
- Over UDP an answer is cut to 512 bytes, or to the client's EDNS size capped by
  ours; whole RRsets are dropped and TC is set, so the client retries over TCP.
- Authoritative answers are cached as wire bytes keyed by the query's bytes
  after the ID; the server clears the cache whenever the zone changes.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.rcode
import dns.renderer

from .zone import A, AAAA, CNAME, PTR, SOA, SRV, TXT, Answer, Record, Zone

IN = dns.rdataclass.IN
_POINTER_TO_QUESTION = b"\xc0\x0c"  # the question's name always starts right after the 12-byte header
_OPT_SIZE = 11  # an OPT record without options
_RR_HEAD = struct.Struct("!HHI")  # type, class, TTL
UDP_PAYLOAD = 1232  # what we advertise and the most we send over UDP (DNS flag day 2020)
CACHE_ENTRIES = 20_000
_REFUSED_TYPES = frozenset({
    dns.rdatatype.AXFR, dns.rdatatype.IXFR, dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY,
    dns.rdatatype.MAILA, dns.rdatatype.MAILB,
})
# Plain ints: IntFlag arithmetic is slow enough to show in a profile of the answer path.
_RCODES = {"NOERROR": 0, "NXDOMAIN": int(dns.rcode.NXDOMAIN), "SERVFAIL": int(dns.rcode.SERVFAIL)}
_SERVFAIL = int(dns.rcode.SERVFAIL)
_QR_AA = int(dns.flags.QR | dns.flags.AA)
_RD_CD = int(dns.flags.RD | dns.flags.CD)
_RA = int(dns.flags.RA)


@dataclass(frozen=True, slots=True)
class Reply:
    wire: bytes


@dataclass(frozen=True, slots=True)
class Forward:
    """Ask upstream (qname, qtype); `partial` is our own answer (a CNAME chain) to put first."""

    query: dns.message.Message
    qname: dns.name.Name
    qtype: int
    tcp: bool
    partial: dns.message.Message | None = None

    def upstream_query(self) -> dns.message.Message:
        """The query to send upstream: recursion desired, DO and CD as the client asked."""
        want_dnssec = bool(self.query.ednsflags & dns.flags.DO)
        message = dns.message.make_query(self.qname, self.qtype, use_edns=0, payload=UDP_PAYLOAD,
                                         want_dnssec=want_dnssec)
        message.flags |= self.query.flags & dns.flags.CD
        return message


class Responder:
    """Answers queries from `zone` (None until the first snapshot arrives)."""

    def __init__(self, domain: str, ttl: int, forwarding: bool, udp_payload: int = UDP_PAYLOAD):
        self.domain = domain  # normalised, as Zone.domain
        self.ttl = ttl
        self.forwarding = forwarding
        self.udp_payload = udp_payload
        self.zone: Zone | None = None
        self._cache: dict[bytes, bytes] = {}
        self._suffix = "." + domain
        self._mname = dns.name.from_text(f"ns.dns.{domain}")
        self._rname = dns.name.from_text(f"hostmaster.{domain}")

    def set_zone(self, zone: Zone | None) -> None:
        """Answers from `zone` from now on; call it again after changing the zone in place."""
        self.zone = zone
        self._cache.clear()

    def handle(self, wire: bytes, tcp: bool) -> Reply | Forward | None:
        """The command for one received message. Never raises."""
        if len(wire) < 12:
            return None
        key = (b"T" if tcp else b"U") + wire[2:]
        hit = self._cache.get(key)
        if hit is not None:
            return Reply(wire[:2] + hit)
        flags = wire[2] << 8 | wire[3]
        if flags & dns.flags.QR:
            return None
        if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
            return _header_only(wire, dns.rcode.NOTIMP)
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # dnspython raises many types for hostile input; all mean the same here
            return _header_only(wire, dns.rcode.FORMERR)
        try:
            return self._handle(query, tcp, key)
        except Exception:
            return self._error(query, dns.rcode.SERVFAIL, tcp)

    def _handle(self, query: dns.message.Message, tcp: bool, key: bytes) -> Reply | Forward | None:
        if len(query.question) != 1:
            return self._error(query, dns.rcode.FORMERR, tcp)
        if query.edns > 0:
            return self._error(query, dns.rcode.BADVERS, tcp)
        question = query.question[0]
        if question.rdclass != IN or question.rdtype in _REFUSED_TYPES:
            return self._error(query, dns.rcode.REFUSED, tcp)
        zone = self.zone
        qname = question.name.to_text()
        if zone is None:
            lowered = qname.lower()
            if lowered == self.domain or lowered.endswith(self._suffix):
                return self._error(query, dns.rcode.SERVFAIL, tcp)
            answer = Answer(outside=True)
        else:
            answer = zone.lookup(qname, question.rdtype)
        if answer.outside:
            if self.forwarding:
                return Forward(query, question.name, question.rdtype, tcp)
            return self._error(query, dns.rcode.REFUSED, tcp)
        if answer.chase is not None and self.forwarding:
            partial = dns.message.from_wire(self.answer_wire(query, answer, tcp=True, qname=qname))
            return Forward(query, dns.name.from_text(answer.chase), question.rdtype, tcp, partial=partial)
        wire = self.answer_wire(query, answer, tcp, qname)
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = wire[2:]
        return Reply(wire)

    def answer_wire(self, query: dns.message.Message, answer: Answer, tcp: bool, qname: str | None = None) -> bytes:
        """The authoritative response to `query` for `answer`, in wire format.

        dnspython's renderer frames the message (header, question, EDNS, the size
        limit and TC); our records go in as pre-encoded RRsets (`_Encoded`), because
        dnspython's name compression builds a Name object per suffix of every name
        and would be most of the cost of an answer. Owners equal to the question
        point at it (offset 12); other names are written whole, which RFC 1035 allows.
        """
        question = query.question[0]
        flags = (_QR_AA | (int(query.flags) & _RD_CD) | (_RA if self.forwarding else 0)
                 | _RCODES.get(answer.rcode, _SERVFAIL))
        renderer = dns.renderer.Renderer(query.id, flags, self._limit(query, tcp))
        renderer.add_question(_Encoded(question.name.to_wire(), 0), question.rdtype, question.rdclass)
        if query.edns >= 0:
            renderer.reserve(_OPT_SIZE)
        owner = (qname or question.name.to_text()).lower()
        sections = [
            (dns.renderer.ANSWER, answer.records),
            (dns.renderer.AUTHORITY, (Record(answer.soa, SOA, answer.soa),) if answer.soa is not None else ()),
            (dns.renderer.ADDITIONAL, answer.additional),
        ]
        try:
            for section, records in sections:
                for rrset in self._encode(records, owner):
                    renderer.add_rrset(section, rrset)
        except dns.exception.TooBig:
            if renderer.section < dns.renderer.ADDITIONAL:
                renderer.flags |= dns.flags.TC
        renderer.release_reserved()
        if query.edns >= 0:
            renderer.add_edns(0, 0, self.udp_payload)
        renderer.write_header()
        return renderer.get_wire()

    def _encode(self, records: tuple[Record, ...], owner: str) -> list["_Encoded"]:
        """One pre-encoded RRset per (name, type), in order of first appearance."""
        sets: dict[tuple[str, int], list[bytes]] = {}
        for record in records:
            if record.type == SOA:
                serial = self.zone.serial if self.zone is not None else 0
                data = _soa_wire(record.value, self._mname, self._rname, serial, self.ttl)
            else:
                data = _rdata_wire(record.type, record.value)
            sets.setdefault((record.name, record.type), []).append(data)
        encoded = []
        for (name, kind), rdatas in sets.items():
            head = (_POINTER_TO_QUESTION if name == owner else _name_wire(name)) + _RR_HEAD.pack(kind, IN, self.ttl)
            unique = list(dict.fromkeys(rdatas))
            encoded.append(_Encoded(b"".join(head + struct.pack("!H", len(d)) + d for d in unique), len(unique)))
        return encoded

    def _limit(self, query: dns.message.Message, tcp: bool) -> int:
        if tcp:
            return 65535
        if query.edns >= 0:
            return min(max(query.payload, 512), self.udp_payload)
        return 512

    def relay(self, forward: Forward, upstream: dns.message.Message | None) -> bytes:
        """The client's response built from what upstream said (None: no upstream answered)."""
        query = forward.query
        if forward.partial is not None:
            response = forward.partial
            if upstream is not None:
                response.answer.extend(upstream.answer)
                response.set_rcode(upstream.rcode())
                if not upstream.answer:
                    response.authority.extend(upstream.authority)
        else:
            response = dns.message.make_response(query, recursion_available=True, our_payload=self.udp_payload)
            if upstream is None:
                response.set_rcode(dns.rcode.SERVFAIL)
            else:
                response.set_rcode(upstream.rcode())
                response.flags |= upstream.flags & dns.flags.AD
                response.answer.extend(upstream.answer)
                response.authority.extend(upstream.authority)
                response.additional.extend(upstream.additional)
        return self._render(response, query, forward.tcp)

    def _render(self, response: dns.message.Message, query: dns.message.Message, tcp: bool) -> bytes:
        return response.to_wire(max_size=self._limit(query, tcp), prefer_truncation=True)

    def _error(self, query: dns.message.Message, rcode: int, tcp: bool) -> Reply:
        response = dns.message.make_response(query, recursion_available=self.forwarding,
                                             our_payload=self.udp_payload)
        response.set_rcode(rcode)
        return Reply(self._render(response, query, tcp))


class _Encoded:
    """Wire bytes that dnspython's Renderer takes where it expects a name or an RRset."""

    __slots__ = ("data", "count")

    def __init__(self, data: bytes, count: int):
        self.data = data
        self.count = count

    def to_wire(self, file, compress=None, origin=None, **kw) -> int:
        file.write(self.data)
        return self.count


# Encodings are cached, bounded: about 100 bytes an entry, so a few MB at most.
@functools.lru_cache(maxsize=1024)
def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


@functools.lru_cache(maxsize=16384)
def _name_wire(text: str) -> bytes:
    return _name(text).to_wire()


@functools.lru_cache(maxsize=32768)
def _rdata_wire(kind: int, value) -> bytes:
    return _rdata(kind, value).to_wire()


@functools.lru_cache(maxsize=64)
def _soa_wire(zone_name: str, mname: dns.name.Name, rname: dns.name.Name, serial: int, ttl: int) -> bytes:
    return dns.rdtypes.ANY.SOA.SOA(IN, SOA, mname, rname, serial, 7200, 1800, 86400, ttl).to_wire()


def _rdata(kind: int, value) -> dns.rdata.Rdata:
    if kind == A:
        return dns.rdtypes.IN.A.A(IN, A, value)
    if kind == AAAA:
        return dns.rdtypes.IN.AAAA.AAAA(IN, AAAA, value)
    if kind == SRV:
        priority, weight, port, target = value
        return dns.rdtypes.IN.SRV.SRV(IN, SRV, priority, weight, port, _name(target))
    if kind == PTR:
        return dns.rdtypes.ANY.PTR.PTR(IN, PTR, _name(value))
    if kind == CNAME:
        return dns.rdtypes.ANY.CNAME.CNAME(IN, CNAME, _name(value))
    if kind == TXT:
        return dns.rdtypes.ANY.TXT.TXT(IN, TXT, [value.encode()])
    raise ValueError(f"no rdata for type {kind}")


def _header_only(wire: bytes, rcode: int) -> Reply:
    """An answer to a query we cannot or will not parse: its ID, opcode and RD, no sections."""
    ident, flags = struct.unpack_from("!HH", wire)
    flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | rcode
    return Reply(struct.pack("!HHHHHH", ident, flags, 0, 0, 0, 0))
