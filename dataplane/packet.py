"""A queued packet, and its headers: the flow's 5-tuple, from raw bytes (struct, no copies, no scapy).

Invariant: `parse()` never raises, whatever the bytes. A packet it cannot
read as the first fragment of a TCP, UDP or SCTP datagram over IPv4 or IPv6
yields None, and the forwarder lets it go on unchanged (it then takes the
kernel's own pick). Conntrack reassembles fragments before our hooks, so a
non-first fragment only arrives here when something is already odd.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

TCP, UDP, SCTP = 6, 17, 132
L4 = frozenset((TCP, UDP, SCTP))

# IPv6 extension headers we step over: hop-by-hop, routing, destination options (len in 8-octet
# units, excluding the first 8), fragment (fixed 8), AH (len in 4-octet units, excluding the first 2).
_HOP, _ROUTING, _FRAGMENT, _AH, _DSTOPTS = 0, 43, 44, 51, 60
_MAX_EXTENSIONS = 8

_V4 = struct.Struct("!BBHHHBBH4s4s")
_PORTS = struct.Struct("!HH")
_u16 = struct.Struct("!H").unpack_from


class PacketQueued(NamedTuple):
    """One packet the kernel queued to us: its queue, id (for the verdict), mark and first bytes.

    The one packet type of userspace mode: queue/nfqueue.py decodes into it, lb/balancer.py decides on it.
    """

    queue: int
    packet_id: int
    mark: int
    payload: bytes


class Flow(NamedTuple):
    """A flow as the forwarder sees it; addresses are packed bytes (4 or 16)."""

    family: int  # 4 or 6
    protocol: int  # 6, 17 or 132
    saddr: bytes
    daddr: bytes
    sport: int
    dport: int


def parse(data: bytes | memoryview) -> Flow | None:
    """The 5-tuple of an IPv4/IPv6 TCP, UDP or SCTP packet; None for anything else or anything malformed."""
    size = len(data)
    if size < 1:
        return None
    version = data[0] >> 4
    if version == 4:
        if size < 20:
            return None
        vihl, _, total, _, frag, _, protocol, _, saddr, daddr = _V4.unpack_from(data)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or protocol not in L4 or frag & 0x1FFF:  # options may follow; a later fragment has no ports
            return None
        if total < ihl + 4 or size < ihl + 4:
            return None
        sport, dport = _PORTS.unpack_from(data, ihl)
        return Flow(4, protocol, bytes(saddr), bytes(daddr), sport, dport)
    if version == 6:
        if size < 40:
            return None
        header = data[6]
        offset = 40
        for _ in range(_MAX_EXTENSIONS):
            if header in L4:
                if size < offset + 4:
                    return None
                sport, dport = _PORTS.unpack_from(data, offset)
                return Flow(6, header, bytes(data[8:24]), bytes(data[24:40]), sport, dport)
            if size < offset + 8:
                return None
            if header in (_HOP, _ROUTING, _DSTOPTS):
                header, offset = data[offset], offset + (data[offset + 1] + 1) * 8
            elif header == _FRAGMENT:
                if _u16(data, offset + 2)[0] & 0xFFF8:  # not the first fragment
                    return None
                header, offset = data[offset], offset + 8
            elif header == _AH:
                header, offset = data[offset], offset + (data[offset + 1] + 2) * 4
            else:  # ESP, no next header, or an unknown one: no ports to read
                return None
        return None
    return None
