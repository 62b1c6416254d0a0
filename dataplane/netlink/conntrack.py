"""Deletes conntrack entries that would keep UDP and SCTP clients on dead endpoints.

UDP has no connection to reset: while a conntrack entry lives, every packet
of the flow follows the NAT binding it was given, to an endpoint that may be
gone (kube-proxy's stale-UDP problem). So when an endpoint leaves a Service,
the entries whose replies come from it are deleted, and the client's next
packet is balanced anew.

The entries are found with the table dump least-conn counts from
(`ctevents.dump_flows`): one conntrack dump in this program.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from ..packet import Flow
from .ctevents import dump_flows

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

    One dump of the table (`ctevents.dump_flows`, the one conntrack dump), whatever
    the number of stale flows: the table may hold a million entries, and a dump per
    flow would read it again and again. Blocking: the daemon calls it in a thread.
    pyroute2 sends the deletes, one per entry.
    """
    if not stale:
        return 0
    endpoints = {(_PROTOCOLS[f.protocol], _packed(f.ip), f.port) for f in stale if f.kind == "endpoint"}
    frontends = {(_PROTOCOLS[f.protocol], _packed(f.ip) if f.ip else b"", f.port)
                 for f in stale if f.kind == "frontend"}
    protocols = {_PROTOCOLS[f.protocol] for f in stale}
    doomed: list[Flow] = []
    for event in dump_flows():
        flow = event.flow
        if flow.protocol not in protocols:
            continue
        translated = event.endpoint != (flow.daddr, flow.dport)
        stale_endpoint = translated and (flow.protocol, *event.endpoint) in endpoints
        # Never translated, to a Service address (or any address, for a NodePort).
        stale_frontend = not translated and ((flow.protocol, flow.daddr, flow.dport) in frontends
                                             or (flow.protocol, b"", flow.dport) in frontends)
        if stale_endpoint or stale_frontend:
            doomed.append(flow)
    deleted = 0
    for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        flows = [f for f in doomed if f.family == version]
        if not flows:
            continue
        with Conntrack(nfgen_family=family) as conntrack:
            for flow in flows:
                orig = NFCTAttrTuple(family=family, saddr=socket.inet_ntop(family, flow.saddr),
                                     daddr=socket.inet_ntop(family, flow.daddr), proto=flow.protocol,
                                     sport=flow.sport, dport=flow.dport)
                try:
                    conntrack.entry("del", tuple_orig=orig)
                    deleted += 1
                except OSError as error:  # gone meanwhile
                    log.debug("conntrack entry already gone: %s", error)
    return deleted


def _packed(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
