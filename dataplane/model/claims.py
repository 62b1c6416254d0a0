"""One owner per address and port: which Service keeps a contested ClusterIP:port, external IP:port or NodePort.

In a cluster the API server never lets two Services hold one ClusterIP, and
kube-proxy has no rule for it. Manifests on disk (and a misbehaving API)
can, so the store decides each conflict once, before rendering, and the
renderer never sees the loser's claim: no map holds it (the no-endpoint
reject of a loser would otherwise run before the winner's DNAT).

The first keeps it, in `precedence` order: the older creationTimestamp,
then (equal or absent; absent sorts after any time) namespace/name. That
order is the same on every node and after every restart, whichever file or
event came first.

A problem names the Service that held the claim when it was lost.
A Service port that loses any of its address claims is left out whole (a
client would otherwise reach it on one address and not another); a port
that loses only its NodePort keeps its addresses without the NodePort.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from .errors import InvalidObject
from .service import Protocol, Service, ServiceKey
from .snapshot import ServiceState

# ("ip", address, protocol, port) or ("nodeport", protocol, port)
Claim = tuple


def precedence(service: Service) -> tuple:
    """Sorts the Service that keeps a contested claim first."""
    return (service.created == "", service.created, service.namespace, service.name)


def claims_of(state: ServiceState) -> dict[Claim, int]:
    """Every address:port and NodePort the Service would program, with the index of its port."""
    service = state.service
    if not service.proxied:
        return {}
    claims: dict[Claim, int] = {}
    addresses = service.cluster_ips + service.external_ips_all
    for index, port in enumerate(service.ports):
        for ip in addresses:
            claims.setdefault(("ip", ip, port.protocol, port.port), index)
        if port.node_port:
            claims.setdefault(("nodeport", port.protocol, port.node_port), index)
    return claims


def describe(claim: Claim) -> str:
    if claim[0] == "nodeport":
        return f"NodePort {claim[2]}/{claim[1]}"
    _, ip, protocol, port = claim
    return f"{f'[{ip}]' if ':' in ip else ip}:{port}/{Protocol(protocol)}"


def without(state: ServiceState, lost: Mapping[Claim, ServiceKey], source: str = "") -> tuple[ServiceState,
                                                                                               list[InvalidObject]]:
    """The Service without the claims it lost (each to the Service named), and one problem per port affected."""
    service = state.service
    ref = str(service.key)
    claims = claims_of(state)
    by_port: dict[int, list[Claim]] = {}
    for claim in lost:
        by_port.setdefault(claims[claim], []).append(claim)
    ports, backends, problems = [], [], []
    for index, (port, port_backends) in enumerate(zip(service.ports, state.backends)):
        taken = sorted(by_port.get(index, ()))
        if not taken:
            ports.append(port)
            backends.append(port_backends)
            continue
        holders = ", ".join(f"{describe(c)} by Service {lost[c]}" for c in taken[:3])
        more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        addresses = [c for c in taken if c[0] == "ip"]
        if addresses:
            problem = f"is already served ({holders}{more}), which keeps it; this port is left out"
            problems.append(InvalidObject("Service", ref, f"spec.ports[{index}]", problem, source, skipped=False))
            continue
        problem = f"is already served ({holders}), which keeps it; this port is served without it"
        problems.append(InvalidObject("Service", ref, f"spec.ports[{index}].nodePort", problem, source,
                                      skipped=False))
        ports.append(replace(port, node_port=None))
        backends.append(port_backends)
    resolved = ServiceState(replace(service, ports=tuple(ports)), tuple(backends), state.endpoints)
    return resolved, problems
