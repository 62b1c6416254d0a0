"""Conntrack events (ctnetlink multicast), decoded with struct: which flows start and end.

least-conn needs the flows the kernel really holds, at the rate new flows
arrive; pyroute2's generic message classes cost far more per event than
this walk over three attributes, so events are read on a socket of our own
and decoded here. `decode_events` is pure; `EventSocket` owns the socket.

A flow counts as started when conntrack confirms it (NEW) and as ended when
it is destroyed, or as soon as TCP leaves ESTABLISHED for FIN_WAIT or later.
When the socket overflows (ENOBUFS) events are lost: `EventSocket.lost`
counts it, and the reader recounts from `dump_flows`, in a thread.
"""

from __future__ import annotations

import errno
import socket
from typing import NamedTuple

from ..packet import Flow
from . import codec
from .codec import BE16 as _BE16, BE32 as _BE32, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, message_type
from .codec import attributes as _attrs, messages, netfilter_socket

NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY = 1, 2, 3
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE = 0, 2
IPCTNL_MSG_CT_GET = 1
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_PROTOINFO, CTA_ID = 1, 2, 4, 12
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
TCP_CONNTRACK_FIN_WAIT = 4


class CtEvent(NamedTuple):
    kind: str  # "new", "end"
    flow_id: int
    flow: Flow | None  # original direction (new only)
    endpoint: tuple[bytes, int] | None  # (reply source address, port): where the flow went (new only)


def _tuple(data: bytes, span: tuple[int, int]) -> tuple[int, bytes, bytes, int, int, int] | None:
    parts = _attrs(data, *span)
    if CTA_TUPLE_IP not in parts or CTA_TUPLE_PROTO not in parts:
        return None
    ip = _attrs(data, *parts[CTA_TUPLE_IP])
    proto = _attrs(data, *parts[CTA_TUPLE_PROTO])
    if CTA_IP_V4_SRC in ip and CTA_IP_V4_DST in ip:
        family, src, dst = 4, ip[CTA_IP_V4_SRC], ip[CTA_IP_V4_DST]
    elif CTA_IP_V6_SRC in ip and CTA_IP_V6_DST in ip:
        family, src, dst = 6, ip[CTA_IP_V6_SRC], ip[CTA_IP_V6_DST]
    else:
        return None
    if CTA_PROTO_NUM not in proto:
        return None
    number = data[proto[CTA_PROTO_NUM][0]]
    sport = _BE16.unpack_from(data, proto[CTA_PROTO_SRC_PORT][0])[0] if CTA_PROTO_SRC_PORT in proto else 0
    dport = _BE16.unpack_from(data, proto[CTA_PROTO_DST_PORT][0])[0] if CTA_PROTO_DST_PORT in proto else 0
    return family, bytes(data[src[0]:src[1]]), bytes(data[dst[0]:dst[1]]), number, sport, dport


def decode_events(data: bytes, into: list[CtEvent], dump: bool = False) -> bool:
    """Appends the events of one netlink datagram; malformed messages are skipped, never raised.

    `dump`: the datagram answers a table dump, where every entry is a flow
    that exists (TCP ones past ESTABLISHED excepted). Returns True at the
    dump's end (NLMSG_DONE).
    """
    for kind, flags, _, offset, end in messages(data):
        if kind == NLMSG_DONE:
            return True
        if kind >> 8 == NFNL_SUBSYS_CTNETLINK and kind & 0xFF in (IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE) \
                and end - offset >= 20:
            attrs = _attrs(data, offset + 20, end)
            if CTA_ID in attrs:
                flow_id = _BE32.unpack_from(data, attrs[CTA_ID][0])[0]
                if kind & 0xFF == IPCTNL_MSG_CT_DELETE:
                    into.append(CtEvent("end", flow_id, None, None))
                elif flags & NLM_F_CREATE or (dump and not _closing(data, attrs)):
                    orig = _tuple(data, attrs[CTA_TUPLE_ORIG]) if CTA_TUPLE_ORIG in attrs else None
                    reply = _tuple(data, attrs[CTA_TUPLE_REPLY]) if CTA_TUPLE_REPLY in attrs else None
                    if orig is not None and reply is not None:
                        family, saddr, daddr, number, sport, dport = orig
                        into.append(CtEvent("new", flow_id, Flow(family, number, saddr, daddr, sport, dport),
                                            (reply[1], reply[4])))
                elif not dump and _closing(data, attrs):
                    into.append(CtEvent("end", flow_id, None, None))
    return False


def _closing(data: bytes, attrs: dict[int, tuple[int, int]]) -> bool:
    """True for a TCP flow in FIN_WAIT or later."""
    if CTA_PROTOINFO not in attrs:
        return False
    info = _attrs(data, *attrs[CTA_PROTOINFO])
    if CTA_PROTOINFO_TCP not in info:
        return False
    tcp = _attrs(data, *info[CTA_PROTOINFO_TCP])
    return CTA_PROTOINFO_TCP_STATE in tcp and data[tcp[CTA_PROTOINFO_TCP_STATE][0]] >= TCP_CONNTRACK_FIN_WAIT


def dump_flows(family: int = socket.AF_UNSPEC) -> list[CtEvent]:
    """Every flow in the conntrack table now, as "new" events (TCP past ESTABLISHED left out).

    The one conntrack dump (netlink/conntrack.py's cleanup reads it too). Blocking, about
    13 us per entry: call it in a thread, never on a loop that carries packets. Raises OSError.
    It is decoded here rather than by pyroute2, which takes 20-40 times as long and leaves
    about 80 objects in reference cycles per entry until the dump ends; their collection
    then stops the whole process (0.6 s for 4,000 entries), the forwarder with it.
    """
    request = codec.request(message_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET), NLM_F_REQUEST | NLM_F_DUMP, 1,
                            family)
    found: list[CtEvent] = []
    with netfilter_socket(1 << 20) as sock:
        sock.settimeout(5)
        sock.send(request)
        while not decode_events(sock.recv(1 << 20), found, dump=True):
            pass
    return found


class EventSocket:
    """A non-blocking socket subscribed to conntrack's new, update and destroy events."""

    def __init__(self, rcvbuf: int = 16 << 20):
        groups = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_UPDATE - 1)) | (
            1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
        self.sock = netfilter_socket(rcvbuf, groups)
        self.sock.setblocking(False)
        self.lost = 0  # times the kernel dropped events for want of buffer space (ENOBUFS): recount

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, into: list[CtEvent], limit: int = 4096) -> None:
        for _ in range(limit):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                raise
            decode_events(data, into)

    def close(self) -> None:
        self.sock.close()
