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
    """Deletes the matching entries; returns how many. Never raises for a vanished entry.

    One dump per family and protocol, whatever the number of stale flows: the
    table may hold a million entries, and a dump per flow would read it again
    and again. Addresses are compared here, as canonical text (pyroute2 0.9.7
    cannot filter IPv6 addresses in the kernel).
    """
    deleted = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        flows = [f for f in stale if not f.ip or (":" in f.ip) == (family == socket.AF_INET6)]
        if not flows:
            continue
        endpoints = {(f.protocol, f.ip, f.port) for f in flows if f.kind == "endpoint"}
        frontends = {(f.protocol, f.ip, f.port) for f in flows if f.kind == "frontend"}
        names = {number: name for name, number in _PROTOCOLS.items()}
        with Conntrack(nfgen_family=family) as conntrack:
            for protocol in sorted({f.protocol for f in flows}):
                query = NFCTAttrTuple(family=family, proto=_PROTOCOLS[protocol])
                for entry in list(conntrack.dump_entries(tuple_orig=query)):
                    orig, reply = entry.tuple_orig, entry.tuple_reply
                    name = names.get(orig.proto)
                    translated = (reply.saddr, reply.sport) != (orig.daddr, orig.dport)
                    stale_endpoint = translated and (name, reply.saddr, reply.sport) in endpoints
                    # Never translated, to a Service address (or any address, for a NodePort).
                    stale_frontend = not translated and ((name, orig.daddr, orig.dport) in frontends
                                                         or (name, "", orig.dport) in frontends)
                    if not (stale_endpoint or stale_frontend):
                        continue
                    try:
                        conntrack.entry("del", tuple_orig=orig)
                        deleted += 1
                    except OSError as error:  # gone meanwhile
                        log.debug("conntrack entry already gone: %s", error)
    return deleted
