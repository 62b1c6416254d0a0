"""DNS messages in, DNS messages out: the server's logic without any I/O.

`Responder.handle(wire, tcp)` takes the bytes of one query and returns a
command: `Reply(bytes)` to send back, `Forward(...)` for the server to resolve
upstream (it then calls `Responder.relay` with what came back), or None to
drop the datagram. dnspython does the wire format.

Rules kept here, in order:
- Fewer than 12 bytes, or a message with QR set (a response: answering it could
  start a loop between two servers): dropped.
- Unparseable: FORMERR echoing the ID and opcode. Never an exception out of `handle`.
- Not a QUERY: NOTIMP. Not exactly one question: FORMERR. Class other than IN,
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

import dns.edns
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
import dns.rrset

from .zone import A, AAAA, CNAME, PTR, SOA, SRV, TXT, Answer, Record, Zone

IN = dns.rdataclass.IN
UDP_PAYLOAD = 1232  # what we advertise and the most we send over UDP (DNS flag day 2020)
CACHE_ENTRIES = 20_000
_REFUSED_TYPES = frozenset({
    dns.rdatatype.AXFR, dns.rdatatype.IXFR, dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY,
    dns.rdatatype.MAILA, dns.rdatatype.MAILB,
})
_RCODES = {"NOERROR": dns.rcode.NOERROR, "NXDOMAIN": dns.rcode.NXDOMAIN, "SERVFAIL": dns.rcode.SERVFAIL}


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
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # dnspython raises many types for hostile input; all mean the same here
            return _formerr(wire)
        try:
            return self._handle(query, tcp, key)
        except Exception:
            return self._error(query, dns.rcode.SERVFAIL, tcp)

    def _handle(self, query: dns.message.Message, tcp: bool, key: bytes) -> Reply | Forward | None:
        if query.flags & dns.flags.QR:
            return None
        if query.opcode() != dns.opcode.QUERY:
            return self._error(query, dns.rcode.NOTIMP, tcp)
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
        response = self.response(query, answer)
        if answer.chase is not None and self.forwarding:
            return Forward(query, dns.name.from_text(answer.chase), question.rdtype, tcp, partial=response)
        wire = self._render(response, query, tcp)
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = wire[2:]
        return Reply(wire)

    def response(self, query: dns.message.Message, answer: Answer) -> dns.message.Message:
        """The authoritative response message for `answer`."""
        response = dns.message.make_response(query, recursion_available=self.forwarding,
                                             our_payload=self.udp_payload)
        response.flags |= dns.flags.AA
        response.set_rcode(_RCODES.get(answer.rcode, dns.rcode.SERVFAIL))
        qname = query.question[0].name
        owner = qname.to_text().lower()
        response.answer.extend(self._rrsets(answer.records, qname, owner))
        response.additional.extend(self._rrsets(answer.additional, qname, owner))
        if answer.soa is not None:
            response.authority.append(self._soa_rrset(answer.soa))
        return response

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
        if tcp:
            limit = 65535
        elif query.edns >= 0:
            limit = min(max(query.payload, 512), self.udp_payload)
        else:
            limit = 512
        return response.to_wire(max_size=limit, prefer_truncation=True)

    def _error(self, query: dns.message.Message, rcode: int, tcp: bool) -> Reply:
        response = dns.message.make_response(query, recursion_available=self.forwarding,
                                             our_payload=self.udp_payload)
        response.set_rcode(rcode)
        return Reply(self._render(response, query, tcp))

    def _rrsets(self, records: tuple[Record, ...], qname: dns.name.Name, owner: str) -> list[dns.rrset.RRset]:
        sets: dict[tuple[str, int], dns.rrset.RRset] = {}
        for record in records:
            rrset = sets.get((record.name, record.type))
            if rrset is None:
                name = qname if record.name == owner else _name(record.name)
                rrset = sets[(record.name, record.type)] = dns.rrset.RRset(name, IN, record.type)
            if record.type == SOA:
                rrset.add(self._soa(record.value), self.ttl)
            else:
                rrset.add(_rdata(record.type, record.value), self.ttl)
        return list(sets.values())

    def _soa_rrset(self, zone_name: str) -> dns.rrset.RRset:
        rrset = dns.rrset.RRset(_name(zone_name), IN, SOA)
        rrset.add(self._soa(zone_name), self.ttl)
        return rrset

    def _soa(self, zone_name: str) -> dns.rdata.Rdata:
        serial = self.zone.serial if self.zone is not None else 0
        return dns.rdtypes.ANY.SOA.SOA(IN, SOA, self._mname, self._rname, serial, 7200, 1800, 86400, self.ttl)


@functools.lru_cache(maxsize=65536)
def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


@functools.lru_cache(maxsize=65536)
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


def _formerr(wire: bytes) -> Reply | None:
    """FORMERR for a query we cannot parse: its ID, opcode and RD, no sections. Responses are dropped."""
    ident, flags = struct.unpack_from("!HH", wire)
    if flags & dns.flags.QR:
        return None
    flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | dns.rcode.FORMERR
    return Reply(struct.pack("!HHHHHH", ident, flags, 0, 0, 0, 0))
