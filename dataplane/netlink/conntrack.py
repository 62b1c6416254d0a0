"""Deletes conntrack entries that would keep UDP and SCTP clients on dead endpoints.

UDP has no connection to reset: while a conntrack entry lives, every packet
of the flow follows the NAT binding it was given, to an endpoint that may be
gone (kube-proxy's stale-UDP problem). So when an endpoint leaves a Service,
the entries whose replies come from it are deleted, and the client's next
packet is balanced anew.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

log = logging.getLogger(__name__)

_PROTOCOLS = {"UDP": socket.IPPROTO_UDP, "SCTP": socket.IPPROTO_SCTP}


@dataclass(frozen=True, slots=True, order=True)
class StaleFlows:
    """UDP/SCTP conntrack entries that would send a client nowhere.

    kind "endpoint": flows answered by ip:port, no longer a serving endpoint
    (deleted Pod, Service scaled to zero or deleted: kubernetes#139628).
    kind "frontend": flows to the Service address ip:port (ip "" for a
    NodePort) that were never translated, created while the Service had no
    rules; they would bypass the endpoints it has now (kubernetes#48370).
    """

    protocol: str
    ip: str
    port: int
    kind: str = "endpoint"


def clear(stale: list[StaleFlows]) -> int:
    """Deletes the matching entries; returns how many. Never raises for a vanished entry."""
    deleted = 0
    if not stale:
        return 0
    with Conntrack() as conntrack:
        for flows in stale:
            for entry in list(_matching(conntrack, flows)):
                try:
                    conntrack.entry("del", tuple_orig=entry.tuple_orig)
                    deleted += 1
                except OSError as error:  # gone meanwhile
                    log.debug("conntrack entry already gone: %s", error)
    return deleted


def _matching(conntrack: Conntrack, flows: StaleFlows):
    proto = _PROTOCOLS[flows.protocol]
    families = [socket.AF_INET6 if ":" in flows.ip else socket.AF_INET] if flows.ip else [socket.AF_INET, socket.AF_INET6]
    for family in families:
        if flows.kind == "endpoint":
            reply = NFCTAttrTuple(family=family, saddr=flows.ip, proto=proto, sport=flows.port)
            for entry in conntrack.dump_entries(tuple_reply=reply):
                if entry.tuple_orig.daddr != flows.ip:  # NATed to the endpoint, not a direct client
                    yield entry
        else:
            orig = NFCTAttrTuple(family=family, daddr=flows.ip or None, proto=proto, dport=flows.port)
            for entry in conntrack.dump_entries(tuple_orig=orig):
                if (entry.tuple_reply.saddr, entry.tuple_reply.sport) == (entry.tuple_orig.daddr, entry.tuple_orig.dport):
                    yield entry  # never translated
