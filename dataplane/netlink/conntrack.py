"""Deletes conntrack entries that would keep UDP and SCTP clients on dead endpoints.

UDP has no connection to reset: while a conntrack entry lives, every packet
of the flow follows the NAT binding it was given, to an endpoint that may be
gone (kube-proxy's stale-UDP problem). So when an endpoint leaves a Service,
the entries whose replies come from it are deleted, and the client's next
packet is balanced anew.
"""

from __future__ import annotations

import ipaddress
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
    for family in (socket.AF_INET, socket.AF_INET6):
        flows = [f for f in stale if not f.ip or (":" in f.ip) == (family == socket.AF_INET6)]
        if not flows:
            continue
        with Conntrack(nfgen_family=family) as conntrack:
            for flow in flows:
                for entry in list(_matching(conntrack, family, flow)):
                    try:
                        conntrack.entry("del", tuple_orig=entry.tuple_orig)
                        deleted += 1
                    except OSError as error:  # gone meanwhile
                        log.debug("conntrack entry already gone: %s", error)
    return deleted


def _same(a: str | None, b: str) -> bool:
    return a is not None and ipaddress.ip_address(a) == ipaddress.ip_address(b)


def _matching(conntrack: Conntrack, family: int, flows: StaleFlows):
    # The kernel filters by protocol and port; addresses are compared here, because
    # pyroute2 0.9.7 cannot filter IPv6 addresses (EINVAL, or nothing matches).
    proto = _PROTOCOLS[flows.protocol]
    if flows.kind == "endpoint":
        reply = NFCTAttrTuple(family=family, proto=proto, sport=flows.port)
        for entry in conntrack.dump_entries(tuple_reply=reply):
            # Answered by the endpoint, and NATed to it: not a client talking to the Pod directly.
            if _same(entry.tuple_reply.saddr, flows.ip) and not _same(entry.tuple_orig.daddr, flows.ip):
                yield entry
    else:
        orig = NFCTAttrTuple(family=family, proto=proto, dport=flows.port)
        for entry in conntrack.dump_entries(tuple_orig=orig):
            if flows.ip and not _same(entry.tuple_orig.daddr, flows.ip):
                continue
            if (entry.tuple_reply.saddr, entry.tuple_reply.sport) == (entry.tuple_orig.daddr, entry.tuple_orig.dport):
                yield entry  # never translated
