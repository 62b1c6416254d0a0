"""Header parsing of queued packets, on packets built with scapy; and the nfnetlink codecs.

Malformed input is never fatal: `parse` returns None (the packet goes on
undecided) and the codecs stop at the first bad message.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest
from scapy.all import (
    AH, ESP, IP, SCTP, TCP, UDP, ICMP, IPOption_RR, IPOption_Timestamp, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, fragment, raw,
)

from dataplane.netlink import codec, ctevents
from dataplane.queue import nfqueue
from dataplane.packet import Flow, PacketQueued, parse

V4 = dict(src="192.168.50.2", dst="10.96.0.10")
V6 = dict(src="fd00:50::2", dst="fd00:96::10")


def flow(family, proto, src, dst, sport, dport) -> Flow:
    pack = socket.inet_aton if family == 4 else (lambda a: socket.inet_pton(socket.AF_INET6, a))
    return Flow(family, proto, pack(src), pack(dst), sport, dport)


PARSED = {
    "ipv4-tcp": (IP(**V4) / TCP(sport=40000, dport=80), flow(4, 6, V4["src"], V4["dst"], 40000, 80)),
    "ipv4-udp": (IP(**V4) / UDP(sport=40001, dport=53), flow(4, 17, V4["src"], V4["dst"], 40001, 53)),
    "ipv4-sctp": (IP(**V4) / SCTP(sport=40002, dport=9), flow(4, 132, V4["src"], V4["dst"], 40002, 9)),
    "ipv4-options": (IP(options=[IPOption_RR(), IPOption_Timestamp()], **V4) / TCP(sport=1, dport=2),
                     flow(4, 6, V4["src"], V4["dst"], 1, 2)),
    "ipv4-first-fragment": (fragment(IP(**V4) / UDP(sport=7, dport=8) / (b"x" * 3000), 1400)[0],
                            flow(4, 17, V4["src"], V4["dst"], 7, 8)),
    "ipv6-tcp": (IPv6(**V6) / TCP(sport=40000, dport=80), flow(6, 6, V6["src"], V6["dst"], 40000, 80)),
    "ipv6-udp": (IPv6(**V6) / UDP(sport=5, dport=53), flow(6, 17, V6["src"], V6["dst"], 5, 53)),
    "ipv6-sctp": (IPv6(**V6) / SCTP(sport=5, dport=9), flow(6, 132, V6["src"], V6["dst"], 5, 9)),
    "ipv6-extension-chain": (IPv6(**V6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt()
                             / TCP(sport=3, dport=4), flow(6, 6, V6["src"], V6["dst"], 3, 4)),
    "ipv6-first-fragment": (IPv6(**V6) / IPv6ExtHdrFragment(offset=0, m=1) / UDP(sport=9, dport=10),
                            flow(6, 17, V6["src"], V6["dst"], 9, 10)),
    "ipv6-ah": (IPv6(**V6) / AH(nh=6, payloadlen=4, icv=b"\0" * 12) / TCP(sport=11, dport=12),
                flow(6, 6, V6["src"], V6["dst"], 11, 12)),
}


@pytest.mark.parametrize("packet, expected", PARSED.values(), ids=PARSED.keys())
def test_parses_the_five_tuple(packet, expected):
    assert parse(raw(packet)) == expected
    assert parse(memoryview(raw(packet))) == expected


UNPARSED = {
    "ipv4-later-fragment": fragment(IP(**V4) / UDP(sport=7, dport=8) / (b"x" * 3000), 1400)[1],
    "ipv6-later-fragment": IPv6(**V6) / IPv6ExtHdrFragment(offset=100) / (b"x" * 40),
    "ipv4-icmp": IP(**V4) / ICMP(),
    "ipv6-esp": IPv6(**V6) / ESP(spi=1, seq=1, data=b"x" * 16),
    "ipv6-no-next-header": IPv6(nh=59, **V6),
    "ipv4-bad-ihl": IP(ihl=3, **V4) / TCP(),
    "not-ip": b"\x60"[:0] + b"\x10" * 60,
    "empty": b"",
}


@pytest.mark.parametrize("packet", UNPARSED.values(), ids=UNPARSED.keys())
def test_what_has_no_readable_ports_is_none(packet):
    assert parse(raw(packet) if not isinstance(packet, bytes) else packet) is None


@pytest.mark.parametrize("packet", [p for p, _ in PARSED.values()], ids=list(PARSED))
def test_truncated_at_every_length_never_raises(packet):
    data = raw(packet)
    for size in range(len(data)):
        result = parse(data[:size])
        assert result is None or result == parse(data)


def test_random_bytes_never_raise():
    rng = random.Random(1)
    for _ in range(20000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
        if data and rng.random() < 0.5:
            data = bytes([rng.choice((0x45, 0x46, 0x4F, 0x60))]) + data[1:]
        parse(data)


def test_ipv6_extension_loop_is_bounded():
    chain = IPv6(**V6)
    for _ in range(12):
        chain = chain / IPv6ExtHdrDestOpt()
    assert parse(raw(chain / TCP())) is None


# -- nfnetlink_queue ---------------------------------------------------------------------------------

def attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def packet_message(queue: int, packet_id: int, mark: int | None, payload: bytes) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(queue))
    body += attr(nfqueue.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 0))
    if mark is not None:
        body += attr(nfqueue.NFQA_MARK, struct.pack("!I", mark))
    body += attr(nfqueue.NFQA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), nfqueue.NFNL_SUBSYS_QUEUE << 8, 0, 0, 0) + body


def test_decodes_every_packet_of_a_datagram():
    data = packet_message(3, 7, 0x2000, b"abc") + packet_message(3, 8, None, b"defgh")
    found: list = []
    assert nfqueue.decode_packets(data, found) == 0
    assert found == [PacketQueued(3, 7, 0x2000, b"abc"), PacketQueued(3, 8, 0, b"defgh")]


@pytest.mark.parametrize("cut", range(0, 60, 3))
def test_a_cut_datagram_yields_the_whole_messages_only(cut):
    whole = packet_message(1, 1, 1, b"x" * 20)
    found: list = []
    nfqueue.decode_packets(whole + whole[:cut], found)
    assert len(found) == 1


def test_verdicts_are_one_message_each_with_mark():
    data = nfqueue.encode_verdicts([(0, 5, 0x10001), (2, 6, 0x2)])
    assert len(data) == 80
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", data)
    assert (length, kind, flags) == (40, (3 << 8) | 1, 1)
    assert struct.unpack_from("!H", data, 18)[0] == 0
    assert struct.unpack_from("!II", data, 24) == (nfqueue.NF_ACCEPT, 5)
    assert struct.unpack_from("!I", data, 36)[0] == 0x10001
    assert struct.unpack_from("!H", data, 58)[0] == 2
    assert struct.unpack_from("!II", data, 64) == (nfqueue.NF_ACCEPT, 6)


def test_bind_asks_for_fail_open_and_headers_only():
    messages = nfqueue.bind_messages(4, copy_range=128)
    params = messages[1][20:]
    assert struct.unpack_from("=HH", params) == (9, nfqueue.NFQA_CFG_PARAMS)
    assert struct.unpack_from("!IB", params, 4) == (128, nfqueue.NFQNL_COPY_PACKET)
    flags = messages[3][20:]
    assert struct.unpack_from("!I", flags, 4)[0] & nfqueue.NFQA_CFG_F_FAIL_OPEN
    assert all(struct.unpack_from("!H", m, 18)[0] == 4 for m in messages)


def ack(seq: int, errno_: int = 0) -> bytes:
    return struct.pack("=IHHIIi", 36, codec.NLMSG_ERROR, 0, seq, 0, -errno_) + bytes(16)


def test_a_packet_queued_before_the_last_ack_still_gets_its_verdict():
    """The queue is live from the bind on: a packet can come between the ACKs (the start-up race)."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    # What the kernel sends, in order: the bind's ACK, a packet (META copy: no payload yet), the other ACKs.
    for datagram in (ack(1), packet_message(0, 41, 0x2000, b""), ack(2), ack(3), ack(4)):
        kernel.send(datagram)
    queue = nfqueue.QueueSocket([0], sock=ours)
    requests = [kernel.recv(4096) for _ in range(4)]
    assert [struct.unpack_from("=IHHII", r)[3] for r in requests] == [1, 2, 3, 4]
    found: list = []
    queue.read(found)
    assert found == [PacketQueued(0, 41, 0x2000, b"")]
    queue.send([(p.queue, p.packet_id, p.mark) for p in found])
    assert struct.unpack_from("!II", kernel.recv(4096), 24) == (nfqueue.NF_ACCEPT, 41)
    queue.close()
    kernel.close()


def test_a_refused_bind_raises_with_the_errno():
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    kernel.send(packet_message(0, 1, 0, b""))  # a stray packet first: not taken for the answer
    kernel.send(ack(1, 16))  # EBUSY: another process holds the queue
    with pytest.raises(nfqueue.QueueError) as raised:
        nfqueue.QueueSocket([0], sock=ours)
    assert raised.value.errno == 16
    kernel.close()


def test_codec_walks_messages_and_attributes_and_stops_at_bad_lengths():
    message = codec.request(codec.message_type(3, 2), codec.NLM_F_REQUEST, 9, socket.AF_INET, 5,
                            [(1, b"abc"), (2, b"defgh")])
    walked = list(codec.messages(message + message[:10]))
    assert [(kind, seq) for kind, _, seq, _, _ in walked] == [((3 << 8) | 2, 9)]
    _, _, _, start, end = walked[0]
    assert struct.unpack_from("!H", message, start + 18)[0] == 5
    spans = codec.attributes(message, start + 20, end)
    assert {k: message[a:b] for k, (a, b) in spans.items()} == {1: b"abc", 2: b"defgh"}
    assert codec.attributes(message[:-4], start + 20, end - 4).keys() == {1}


# -- conntrack events ----------------------------------------------------------------------------------

def nested(kind: int, *children: bytes) -> bytes:
    return attr(kind | 0x8000, b"".join(children))


def ct_tuple(src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    return nested(
        1,  # CTA_TUPLE_IP
        attr(ctevents.CTA_IP_V4_SRC, socket.inet_aton(src)), attr(ctevents.CTA_IP_V4_DST, socket.inet_aton(dst)),
    ) + nested(
        2,  # CTA_TUPLE_PROTO
        attr(ctevents.CTA_PROTO_NUM, bytes([proto])), attr(ctevents.CTA_PROTO_SRC_PORT, struct.pack("!H", sport)),
        attr(ctevents.CTA_PROTO_DST_PORT, struct.pack("!H", dport)),
    )


def ct_message(kind: int, flags: int, flow_id: int, *attrs: bytes) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + b"".join(attrs) + attr(ctevents.CTA_ID, struct.pack("!I", flow_id))
    return struct.pack("=IHHII", 16 + len(body), (1 << 8) | kind, flags, 0, 0) + body


def test_conntrack_events_new_update_destroy():
    new = ct_message(0, 0x400 | 0x200, 77,
                     nested(ctevents.CTA_TUPLE_ORIG, ct_tuple("192.168.50.2", "10.96.0.10", 6, 40000, 80)),
                     nested(ctevents.CTA_TUPLE_REPLY, ct_tuple("10.244.1.12", "192.168.50.1", 6, 80, 40000)))
    established = ct_message(0, 0, 77, nested(ctevents.CTA_PROTOINFO, nested(1, attr(1, bytes([3])))))
    closing = ct_message(0, 0, 77, nested(ctevents.CTA_PROTOINFO, nested(1, attr(1, bytes([7])))))
    destroy = ct_message(2, 0, 77)
    events: list = []
    ctevents.decode_events(new + established + closing + destroy + new[:30], events)
    assert events == [
        ctevents.CtEvent("new", 77, flow(4, 6, "192.168.50.2", "10.96.0.10", 40000, 80),
                         (socket.inet_aton("10.244.1.12"), 80)),
        ctevents.CtEvent("end", 77, None, None),
        ctevents.CtEvent("end", 77, None, None),
    ]


def test_a_table_dump_lists_live_flows_and_ends_at_done():
    orig = nested(ctevents.CTA_TUPLE_ORIG, ct_tuple("192.168.50.2", "10.96.0.10", 6, 40000, 80))
    reply = nested(ctevents.CTA_TUPLE_REPLY, ct_tuple("10.244.1.12", "192.168.50.1", 6, 80, 40000))
    live = ct_message(0, 0, 1, orig, reply, nested(ctevents.CTA_PROTOINFO, nested(1, attr(1, bytes([3])))))
    closing = ct_message(0, 0, 2, orig, reply, nested(ctevents.CTA_PROTOINFO, nested(1, attr(1, bytes([7])))))
    done = struct.pack("=IHHIIi", 20, ctevents.NLMSG_DONE, 2, 1, 0, 0)
    events: list = []
    assert ctevents.decode_events(live + closing, events, dump=True) is False
    assert ctevents.decode_events(done, events, dump=True) is True
    assert [(e.kind, e.flow_id) for e in events] == [("new", 1)]
