"""Netlink framing for the netfilter families we speak directly (nfnetlink_queue, ctnetlink): pure, plus one socket.

A netfilter netlink message is an nlmsghdr (host byte order), an nfgenmsg
(family, version, res_id: the queue number, big-endian), then attributes
(length and type in host order, payloads big-endian; a type may carry the
NLA_F_NESTED / NLA_F_NET_BYTEORDER bits, which `TYPE_MASK` strips). Names
follow include/uapi/linux/netlink.h and netfilter/nfnetlink.h.

Decoders never raise on bad bytes: a message or attribute whose length does
not fit ends the walk. `netfilter_socket` is the only thing here with a
file descriptor; the modules that own sockets (queue/nfqueue.py,
netlink/ctevents.py) open theirs through it.
"""

from __future__ import annotations

import socket
import struct
from typing import Iterable, Iterator

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_CREATE = 1, 4, 0x300, 0x400
TYPE_MASK = 0x3FFF  # an attribute type without NLA_F_NESTED and NLA_F_NET_BYTEORDER

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (already big-endian)
ATTR = struct.Struct("=HH")  # nlattr: length, type
HEADER_SIZE, NFGEN_SIZE = HEADER.size, NFGENMSG.size
BE16, BE32 = struct.Struct("!H"), struct.Struct("!I")
_ERRNO = struct.Struct("=i")


def message_type(subsystem: int, kind: int) -> int:
    """nlmsghdr.type of a netfilter message: the nfnetlink subsystem in the high byte."""
    return (subsystem << 8) | kind


def messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, sequence, start, end) of each whole message in a datagram; start is the nlmsghdr's offset."""
    offset, size = 0, len(data)
    while offset + HEADER_SIZE <= size:
        length, kind, flags, sequence, _ = HEADER.unpack_from(data, offset)
        if length < HEADER_SIZE or offset + length > size:
            return
        yield kind, flags, sequence, offset, offset + length
        offset += (length + 3) & ~3


def attributes(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (payload start, payload end) for the attributes in data[start:end]."""
    found = {}
    while start + 4 <= end:
        length, kind = ATTR.unpack_from(data, start)
        if length < 4 or start + length > end:
            break
        found[kind & TYPE_MASK] = (start + 4, start + length)
        start += (length + 3) & ~3
    return found


def error_code(data: bytes, start: int) -> int:
    """The errno an NLMSG_ERROR message at `start` carries (0: an ACK)."""
    if start + HEADER_SIZE + 4 > len(data):
        return 0
    return -_ERRNO.unpack_from(data, start + HEADER_SIZE)[0]


def attribute(kind: int, payload: bytes) -> bytes:
    return ATTR.pack(4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def request(kind: int, flags: int, sequence: int = 0, family: int = socket.AF_UNSPEC, res_id: int = 0,
            attrs: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """One message: nlmsghdr, nfgenmsg (res_id in host order here, sent big-endian), attributes."""
    body = NFGENMSG.pack(family, 0, socket.htons(res_id)) + b"".join(attribute(k, p) for k, p in attrs)
    return HEADER.pack(HEADER_SIZE + len(body), kind, flags, sequence, 0) + body


def netfilter_socket(rcvbuf: int, groups: int = 0, no_enobufs: bool = False) -> socket.socket:
    """A bound NETLINK_NETFILTER socket with a receive buffer of `rcvbuf` bytes (forced past rmem_max when root).

    `groups`: the multicast groups to join (a bit mask); `no_enobufs`: an
    overrun is not reported to us as ENOBUFS. Raises OSError; closes the socket then.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if no_enobufs:
            sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock
