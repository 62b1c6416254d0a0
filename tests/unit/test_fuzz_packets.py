"""A seeded, bounded packet fuzzer (issue 13) for the forwarder's two decoders: `packet.parse`
(the 5-tuple of a queued packet) and `nfqueue.decode_packets` (the NFQUEUE datagram), whatever
the bytes. Neither may raise; each must give exactly what a well-formed input holds (the
generator builds the input from its fields, so it knows the answer) and nothing impossible
for a damaged one.

The compiled loop (queue/_nfqueue.c, where it is built) reads the same untrusted bytes in C:
its packet parser must find the pick-table key of exactly the IPv4 flows `parse` finds (and
nothing else), and its datagram walk must hand back exactly the packets `decode_packets`
returns, for every input, damaged or not.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from dataplane.marks import KEEP_MASK
from dataplane.packet import Flow, PacketQueued, parse
from dataplane.queue import nfqueue, picks

compiled = pytest.mark.skipif(nfqueue.compiled is None, reason="dataplane.queue._nfqueue is not built")

PACKET_CASES = 10_000
QUEUE_CASES = 5_000
TCP, UDP, SCTP = 6, 17, 132
HOP, ROUTING, FRAGMENT, AH, DSTOPTS, ESP, NONE = 0, 43, 44, 51, 60, 50, 59


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))


def build(rng: random.Random) -> tuple[bytes, Flow | None]:
    """A packet from random fields, and the flow a correct parser reads from it (None: no flow)."""
    protocol = rng.choice([TCP, UDP, SCTP, TCP, 1, 58, 47])
    sport, dport = rng.randrange(65536), rng.randrange(65536)
    l4 = struct.pack("!HH", sport, dport) + bytes(rng.randrange(256) for _ in range(rng.choice([0, 4, 16])))
    if rng.random() < 0.5:
        saddr, daddr = rng.randbytes(4), rng.randbytes(4)
        options = rng.randbytes(4 * rng.randrange(11))
        ihl = 5 + len(options) // 4
        later_fragment = rng.random() < 0.1
        frag = (rng.randrange(1, 0x2000) if later_fragment else 0) | (rng.choice([0, 0x2000, 0x4000]))
        total = 4 * ihl + len(l4)
        header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, rng.randrange(65536), frag, 64, protocol, 0,
                             saddr, daddr)
        expected = Flow(4, protocol, saddr, daddr, sport, dport) if protocol in (TCP, UDP, SCTP) \
            and not later_fragment else None
        return header + options + l4, expected
    saddr, daddr = rng.randbytes(16), rng.randbytes(16)
    chain, extensions, first = [], b"", True
    for _ in range(rng.choice([0, 0, 1, 2, 3, 9])):
        chain.append(rng.choice([HOP, ROUTING, DSTOPTS, FRAGMENT, AH, ESP]))
    chain.append(protocol)
    expected_ok = protocol in (TCP, UDP, SCTP) and len(chain) - 1 <= 8
    for index, kind in enumerate(chain[:-1]):
        following = chain[index + 1]
        if kind in (HOP, ROUTING, DSTOPTS):
            units = rng.randrange(3)
            extensions += bytes([following, units]) + rng.randbytes(6 + 8 * units)
        elif kind == FRAGMENT:
            offset = rng.choice([0, 0, rng.randrange(1, 0x2000)])
            first = first and offset == 0
            extensions += struct.pack("!BBHI", following, 0, (offset << 3) | rng.randrange(2), rng.randrange(2**32))
        elif kind == AH:
            units = rng.randrange(1, 4)  # payload length in 4-octet units, minus 2
            extensions += bytes([following, units]) + rng.randbytes(2 + 4 * (units + 2) - 4)
        else:  # ESP: what follows is encrypted, no ports to read
            expected_ok = False
            extensions += rng.randbytes(8)
            break
    header = struct.pack("!IHBB16s16s", 0x60000000, len(extensions) + len(l4), chain[0], 64, saddr, daddr)
    expected = Flow(6, protocol, saddr, daddr, sport, dport) if expected_ok and first else None
    return header + extensions + l4, expected


@st.composite
def packets(draw):
    rng = random.Random(draw(st.integers(0, 2**64)))
    data, expected = build(rng)
    damage = rng.choice(["none", "none", "truncate", "flip", "random", "prefix"])
    if damage == "truncate":
        data = data[: rng.randrange(len(data) + 1)]
    elif damage == "flip":
        data = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        data = bytes(data)
    elif damage == "random":
        data = bytes([rng.choice([0x45, 0x4F, 0x60, 0x00, 0xFF])]) + rng.randbytes(rng.randrange(120))
    elif damage == "prefix":
        data = data[:1]
    return data, expected, damage


@_settings(PACKET_CASES)
@given(packets())
def test_packet_parse_never_raises_and_reads_exactly_what_a_packet_holds(case):
    data, expected, damage = case
    found = parse(data)
    assert parse(memoryview(data)) == found
    if damage == "none":
        assert found == expected
    elif found is not None:
        assert found.family == data[0] >> 4 and found.protocol in (TCP, UDP, SCTP)
        assert len(found.saddr) == len(found.daddr) == (4 if found.family == 4 else 16)
        assert 0 <= found.sport < 65536 and 0 <= found.dport < 65536
        if damage == "truncate" and expected is not None:
            assert found == expected  # a shorter packet never reads other ports


@compiled
@_settings(PACKET_CASES)
@given(packets())
def test_the_compiled_parser_keys_exactly_the_ipv4_flows_parse_reads(case):
    data, _, _ = case
    found = parse(data)
    expected = picks.key(found.daddr, found.protocol, found.dport) if found is not None and found.family == 4 else -1
    assert nfqueue.compiled.flow_key(data) == expected


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def datagram(rng: random.Random) -> tuple[bytes, list[PacketQueued], int]:
    """Netlink messages of every kind the socket may carry, and what a correct decoder returns."""
    out, expected, error = b"", [], 0
    for _ in range(rng.randrange(1, 6)):
        kind = rng.choice(["packet", "packet", "packet", "error", "done", "other"])
        if kind == "packet":
            queue, packet_id = rng.randrange(65536), rng.randrange(2**32)
            mark = rng.choice([None, rng.randrange(2**32)])
            payload = rng.randbytes(rng.randrange(130))
            attrs = [_attr(nfqueue.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 0))]
            if mark is not None:
                attrs.append(_attr(nfqueue.NFQA_MARK, struct.pack("!I", mark)))
            attrs.append(_attr(nfqueue.NFQA_PAYLOAD, payload))
            attrs += [_attr(rng.choice([4, 5, 11, 16, 20]), rng.randbytes(rng.randrange(12)))
                      for _ in range(rng.randrange(3))]
            rng.shuffle(attrs)
            has_id = rng.random() < 0.95
            if not has_id:
                attrs = [a for a in attrs if struct.unpack_from("=H", a, 2)[0] != nfqueue.NFQA_PACKET_HDR]
            body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(queue)) + b"".join(attrs)
            message_type = (nfqueue.NFNL_SUBSYS_QUEUE << 8) | nfqueue.NFQNL_MSG_PACKET
            if has_id:
                expected.append(PacketQueued(queue, packet_id, mark or 0, payload))
        elif kind == "error":
            code = rng.choice([0, 1, 2, 105])
            body = struct.pack("=i", -code) + rng.randbytes(16)
            message_type = nfqueue.NLMSG_ERROR
            error = error or code
        else:
            body = rng.randbytes(rng.randrange(20))
            message_type = 3 if kind == "done" else rng.randrange(4, 2**16)
        out += struct.pack("=IHHII", 16 + len(body), message_type, 0, rng.randrange(2**32), 0) + body
        out += b"\0" * (-len(out) % 4)
    return out, expected, error


@st.composite
def datagrams(draw):
    rng = random.Random(draw(st.integers(0, 2**64)))
    data, expected, error = datagram(rng)
    damage = rng.choice(["none", "none", "truncate", "flip", "length", "random"])
    if damage == "truncate":
        data = data[: rng.randrange(len(data) + 1)]
    elif damage == "flip":
        data = bytearray(data)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        data = bytes(data)
    elif damage == "length":  # a length field that lies: too short, too long, or huge
        data = struct.pack("=I", rng.choice([0, 3, 15, 17, len(data) + 1, 2**32 - 1])) + data[4:]
    elif damage == "random":
        data = rng.randbytes(rng.randrange(200))
    return data, expected, error, damage


@_settings(QUEUE_CASES)
@given(datagrams())
def test_nfqueue_decode_never_raises_and_returns_exactly_the_queued_packets(case):
    data, expected, error, damage = case
    found: list[PacketQueued] = []
    code = nfqueue.decode_packets(data, found)
    assert isinstance(code, int)
    if damage == "none":
        assert (found, code) == (expected, error)
        return
    for queued in found:
        assert 0 <= queued.queue < 65536 and 0 <= queued.packet_id < 2**32 and 0 <= queued.mark < 2**32
        assert isinstance(queued.payload, bytes) and len(queued.payload) <= len(data)


class _Kernel:
    """A socketpair standing in for the netlink socket: datagrams in, the compiled loop's answers out."""

    def __init__(self):
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.scratch = bytearray(64 * 4096)

    def serve(self, data: bytes, table: dict) -> tuple[int, int, list[PacketQueued], float]:
        self.theirs.send(data)
        return nfqueue.compiled.serve(self.ours.fileno(), self.scratch, [table], KEEP_MASK, 1, False, PacketQueued,
                                      None)


_kernel: list[_Kernel] = []


@compiled
@_settings(QUEUE_CASES)
@given(datagrams())
def test_the_compiled_walk_hands_back_exactly_the_packets_decode_returns(case):
    data, _, _, _ = case
    if not _kernel:
        _kernel.append(_Kernel())
    expected: list[PacketQueued] = []
    nfqueue.decode_packets(data, expected)
    datagrams_read, decided, rest, _ = _kernel[0].serve(data, {})  # no table entry: every packet comes back
    assert (datagrams_read, decided, rest) == (1, 0, expected)
