"""The DNS responder without sockets: bytes in, a command out.

Address plan: ClusterIPs 10.96.0.0/12, Pods 10.244.0.0/16; Service default/big
is headless with 200 ready endpoints 10.244.1.1-200 (an answer of 3.2 kB).
"""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rrset
import pytest

from dataplane.dns.wire import Forward, Reply, Responder
from dataplane.dns.zone import Zone
from dataplane.sync.store import Store
from yamlcases import parse_ok

ENDPOINTS = ", ".join(f"{{addresses: [10.244.1.{i}]}}" for i in range(1, 201))
MANIFESTS = f"""
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: big, namespace: default}}
spec: {{clusterIP: None}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: big-1, namespace: default, labels: {{kubernetes.io/service-name: big}}}}
addressType: IPv4
endpoints: [{ENDPOINTS}]
---
apiVersion: v1
kind: Service
metadata: {{name: ext, namespace: default}}
spec: {{type: ExternalName, externalName: www.example.com}}
"""


def make_zone(text: str = MANIFESTS) -> Zone:
    store = Store()
    store.replace("m.yaml", parse_ok(text))
    return Zone.build(store.snapshot())


@pytest.fixture
def responder() -> Responder:
    responder = Responder("cluster.local.", ttl=5, forwarding=False)
    responder.set_zone(make_zone())
    return responder


def reply(responder: Responder, wire: bytes, tcp: bool = False) -> dns.message.Message:
    command = responder.handle(wire, tcp)
    assert isinstance(command, Reply), command
    return dns.message.from_wire(command.wire)


def query(qname: str = "web.default.svc.cluster.local.", qtype: str = "A", **options) -> dns.message.Message:
    return dns.message.make_query(qname, qtype, **options)


def header(ident: int = 0x1234, flags: int = 0, counts=(1, 0, 0, 0)) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, *counts)


# Answers that do not fit.

@pytest.mark.parametrize("transport, options, limit, truncated", [
    ("udp", {}, 512, True),
    ("udp", {"use_edns": 0, "payload": 4096}, 1232, True),  # capped at our 1232
    ("udp", {"use_edns": 0, "payload": 600}, 600, True),
    ("tcp", {}, 65535, False),
])
def test_large_answers_are_truncated_over_udp_only(responder, transport, options, limit, truncated):
    command = responder.handle(query("big.default.svc.cluster.local.", **options).to_wire(), tcp=transport == "tcp")
    assert isinstance(command, Reply)
    assert len(command.wire) <= limit
    response = dns.message.from_wire(command.wire)
    assert bool(response.flags & dns.flags.TC) == truncated
    if not truncated:
        assert len(response.answer[0]) == 200


def test_small_answers_are_not_truncated(responder):
    response = reply(responder, query().to_wire())
    assert not response.flags & dns.flags.TC and response.answer


# What is not a proper query.

@pytest.mark.parametrize("case, wire, rcode", [
    ("garbage after a query header", header() + b"\x07garbage", dns.rcode.FORMERR),
    ("question count lies", header(counts=(5, 0, 0, 0)) + query().to_wire()[12:], dns.rcode.FORMERR),
    ("no question", header(counts=(0, 0, 0, 0)), dns.rcode.FORMERR),
    ("two questions", query().to_wire()[:4] + b"\x00\x02" + query().to_wire()[6:] + query().to_wire()[12:],
     dns.rcode.FORMERR),
    ("label pointer loop", header() + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),
])
def test_malformed_queries_get_formerr(responder, case, wire, rcode):
    response = responder.handle(wire, tcp=False)
    assert isinstance(response, Reply), case
    ident, flags = struct.unpack_from("!HH", response.wire)
    assert ident == struct.unpack_from("!H", wire)[0]
    assert flags & dns.flags.QR and flags & 0xF == rcode


@pytest.mark.parametrize("case, wire", [
    ("empty", b""),
    ("short header", b"\x12\x34\x01\x00\x00"),
    ("a response, not a query", header(flags=dns.flags.QR) + b"\x00"),
    ("a well-formed response", dns.message.make_response(query()).to_wire()),
])
def test_responses_and_runts_are_dropped(responder, case, wire):
    assert responder.handle(wire, tcp=False) is None, case


@pytest.mark.parametrize("case, make, rcode", [
    ("NOTIFY", lambda: _with_opcode(query(), dns.opcode.NOTIFY), dns.rcode.NOTIMP),
    ("UPDATE", lambda: _with_opcode(query(), dns.opcode.UPDATE), dns.rcode.NOTIMP),
    ("CHAOS class", lambda: query("version.bind.", "TXT", rdclass=dns.rdataclass.CH), dns.rcode.REFUSED),
    ("zone transfer", lambda: query("cluster.local.", "AXFR"), dns.rcode.REFUSED),
    ("EDNS version 1", lambda: query(use_edns=1), dns.rcode.BADVERS),
])
def test_unsupported_queries(responder, case, make, rcode):
    response = reply(responder, make().to_wire())
    assert response.rcode() == rcode, case


def _with_opcode(message: dns.message.Message, opcode: int) -> dns.message.Message:
    message.set_opcode(opcode)
    return message


# Where answers come from.

def test_before_the_first_snapshot_cluster_names_fail_and_others_forward():
    responder = Responder("cluster.local.", ttl=5, forwarding=True)
    assert reply(responder, query().to_wire()).rcode() == dns.rcode.SERVFAIL
    assert isinstance(responder.handle(query("example.com.").to_wire(), tcp=False), Forward)


def test_other_names_are_refused_without_upstream_and_forwarded_with(responder):
    assert reply(responder, query("example.com.").to_wire()).rcode() == dns.rcode.REFUSED
    responder.forwarding = True
    command = responder.handle(query("Example.COM.", "AAAA", want_dnssec=True).to_wire(), tcp=True)
    assert isinstance(command, Forward) and command.tcp
    upstream = command.upstream_query()
    assert str(upstream.question[0].name) == "Example.COM." and upstream.question[0].rdtype == 28
    assert upstream.flags & dns.flags.RD and upstream.ednsflags & dns.flags.DO


def test_relayed_answers_keep_the_clients_id_and_question(responder):
    responder.forwarding = True
    client = query("example.com.")
    command = responder.handle(client.to_wire(), tcp=False)
    upstream = dns.message.make_response(command.upstream_query())
    upstream.answer.append(dns.rrset.from_text("example.com.", 300, "IN", "A", "192.0.2.1"))
    response = dns.message.from_wire(responder.relay(command, upstream))
    assert response.id == client.id and response.question == client.question
    assert response.answer[0].to_text() == "example.com. 300 IN A 192.0.2.1"
    assert not response.flags & dns.flags.AA, "a forwarded answer is not ours"
    failed = dns.message.from_wire(responder.relay(command, None))
    assert failed.rcode() == dns.rcode.SERVFAIL


def test_external_name_targets_are_chased_upstream(responder):
    responder.forwarding = True
    command = responder.handle(query("ext.default.svc.cluster.local.").to_wire(), tcp=False)
    assert isinstance(command, Forward) and str(command.qname) == "www.example.com."
    upstream = dns.message.make_response(command.upstream_query())
    upstream.answer.append(dns.rrset.from_text("www.example.com.", 300, "IN", "A", "192.0.2.53"))
    response = dns.message.from_wire(responder.relay(command, upstream))
    assert [rrset.to_text() for rrset in response.answer] == [
        "ext.default.svc.cluster.local. 5 IN CNAME www.example.com.",  # specification 2.5's example
        "www.example.com. 300 IN A 192.0.2.53",
    ]


# The answer cache.

def test_cached_answers_differ_only_in_the_id(responder):
    first, second = query(), query()
    second.id = (first.id + 1) % 65536
    a = responder.handle(first.to_wire(), tcp=False).wire
    b = responder.handle(second.to_wire(), tcp=False).wire
    assert a[2:] == b[2:] and a[:2] != b[:2]
    assert dns.message.from_wire(b).id == second.id


def test_a_new_zone_empties_the_cache(responder):
    wire = query().to_wire()
    assert reply(responder, wire).answer[0][0].address == "10.96.0.10"
    responder.set_zone(make_zone(MANIFESTS.replace("10.96.0.10", "10.96.0.11")))
    assert reply(responder, wire).answer[0][0].address == "10.96.0.11"


def test_the_cache_keeps_udp_and_tcp_apart(responder):
    wire = query("big.default.svc.cluster.local.").to_wire()
    assert reply(responder, wire, tcp=False).flags & dns.flags.TC
    assert not reply(responder, wire, tcp=True).flags & dns.flags.TC
