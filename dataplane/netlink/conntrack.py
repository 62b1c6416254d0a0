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
    """Flows of `protocol` answered by ip:port, no longer an endpoint of the Service."""

    protocol: str
    ip: str
    port: int


def clear(stale: list[StaleFlows]) -> int:
    """Deletes the matching entries; returns how many. Never raises for a vanished entry."""
    deleted = 0
    if not stale:
        return 0
    with Conntrack() as conntrack:
        for flows in stale:
            family = socket.AF_INET6 if ":" in flows.ip else socket.AF_INET
            reply = NFCTAttrTuple(family=family, saddr=flows.ip, proto=_PROTOCOLS[flows.protocol], sport=flows.port)
            for entry in list(conntrack.dump_entries(tuple_reply=reply)):
                if entry.tuple_orig.daddr == flows.ip:
                    continue  # not NATed: a client talking to the Pod directly
                try:
                    conntrack.entry("del", tuple_orig=entry.tuple_orig)
                    deleted += 1
                except OSError as error:  # gone meanwhile
                    log.debug("conntrack entry already gone: %s", error)
    return deleted
