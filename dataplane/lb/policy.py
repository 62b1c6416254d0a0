"""What the forwarder needs to know about a Service port, from the snapshot: pure functions.

A `PortTable` is one Service port as the balancer sees it: where its new
flows arrive (Service addresses, NodePort), its endpoints with their ids
and weights (the same usable endpoints kernel mode programs: `usable_endpoints`),
its algorithm and its ClientIP affinity.

Annotations on the Service (`dataplane.io/lb-algorithm`, `dataplane.io/weights`,
see model/annotations.py) are parsed and checked with the Service, and a
bad one is reported there, once per change, like any invalid field; here
only their valid values are used: an IP beats a node, a node beats a zone,
endpoints matched by nothing weigh 1, and weight 0 takes no new flows while
another endpoint has weight.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Callable

from ..model import Protocol, Selection, ServiceState, TrafficPolicy
from ..model.annotations import ALGORITHM_ANNOTATION, ALGORITHMS, MAX_WEIGHT, WEIGHTS_ANNOTATION, weight_items

__all__ = ["ALGORITHM_ANNOTATION", "ALGORITHMS", "MAX_WEIGHT", "WEIGHTS_ANNOTATION", "PortTable", "Target",
           "frontends", "packed", "parse_weights", "port_tables", "weight_of"]
PROTOCOL_NUMBERS = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.SCTP: 132}


@dataclass(frozen=True, slots=True)
class Target:
    """One endpoint of one Service port, with the id its mark carries."""

    id: int
    ip: str
    port: int
    weight: int = 1

    @property
    def name(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class PortTable:
    name: str  # "namespace/name:port", for metrics and logs
    protocol: int  # IP protocol number
    addresses: tuple[bytes, ...]  # packed Service addresses (ClusterIPs, external and LoadBalancer IPs)
    port: int
    node_port: int | None
    targets: tuple[Target, ...]
    algorithm: str
    affinity_timeout: int | None  # seconds of ClientIP affinity; None: none
    family: int = 4  # 4 or 6: a NodePort-only table has no address to tell its family by


def packed(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


def port_tables(
    state: ServiceState, ids: Callable[[tuple[str, int]], int | None], default_algorithm: str, family: int = 4,
    node_name: str = "", zone: str = "",
) -> tuple[tuple[PortTable, ...], list[str]]:
    """The Service's ports as the balancer sees them, and problems (none since annotations are
    checked with the Service, in model/annotations.py; kept for callers that log them).

    Endpoints are those kernel mode would pick among (model.Selection):
    for Service addresses, Cluster or, with internalTrafficPolicy Local, this
    node's; for external addresses and NodePorts, Cluster. External traffic
    of an externalTrafficPolicy: Local Service is not the forwarder's (see
    `frontends` below), so it has no table here. With internal and
    external endpoint sets differing, a port gets two tables, `...:port` and
    `...:port/external` (when it has an external address or a NodePort). A family the Service
    has no address in gives no table. Endpoints without an id (not programmed yet) are left out.
    """
    service = state.service
    if not service.proxied:
        return (), []
    problems: list[str] = []  # annotations are checked (and reported) when the Service is parsed
    algorithm = service.lb_algorithm or default_algorithm
    rules = dict(service.lb_weights)
    holds = (lambda ip: ":" in ip) if family == 6 else (lambda ip: ":" not in ip)
    internal, external = frontends(state, holds)
    if not internal and not external:
        return (), problems  # a family the Service does not have
    dual_stack = any(":" not in ip for ip in (*service.cluster_ips, *service.external_ips_all))
    tables = []

    def targets_of(backends) -> tuple[Target, ...]:
        targets = []
        for backend in backends:
            endpoint_id = ids((backend.ip, backend.port)) if holds(backend.ip) else None
            if endpoint_id is not None:
                weight = weight_of(rules, backend.ip, backend.node_name, backend.zone)
                targets.append(Target(endpoint_id, backend.ip, backend.port, weight))
        return tuple(sorted(targets, key=lambda t: (t.ip, t.port)))

    for port, backends in state.port_backends():
        selection = Selection.of(backends, node_name, zone)
        local = service.internal_traffic_policy == TrafficPolicy.LOCAL
        inside = targets_of(selection.local if local else selection.cluster)
        outside = targets_of(selection.cluster) if external is not None else inside
        name = f"{service.namespace}/{service.name}:{port.name or port.port}"
        if family == 6 and dual_stack:  # each family its own endpoints and balancing state: names must not meet
            name += "/ipv6"
        common = dict(protocol=PROTOCOL_NUMBERS[port.protocol], port=port.port, algorithm=algorithm,
                      affinity_timeout=service.session_affinity_timeout, family=family)
        node_port = port.node_port if external is not None else None
        if inside == outside:
            tables.append(PortTable(name=name, addresses=internal + (external or ()), node_port=node_port,
                                    targets=inside, **common))
        else:
            tables.append(PortTable(name=name, addresses=internal, node_port=None, targets=inside, **common))
            if external or node_port:  # an external table needs something external to be reached by
                tables.append(PortTable(name=f"{name}/external", addresses=external, node_port=node_port,
                                        targets=outside, **common))
    return tuple(tables), problems


def frontends(state: ServiceState, holds: Callable[[str], bool]) -> tuple[tuple[bytes, ...], tuple[bytes, ...] | None]:
    """(Service addresses, external addresses) whose new flows the forwarder decides, packed.

    External addresses (and NodePorts) are None for externalTrafficPolicy:
    Local, whose external traffic the kernel keeps to local endpoints itself.
    """
    service = state.service
    internal = tuple(packed(ip) for ip in service.cluster_ips if holds(ip))
    if service.external_traffic_policy == TrafficPolicy.LOCAL:
        return internal, None
    return internal, tuple(packed(ip) for ip in service.external_ips_all if holds(ip))


def parse_weights(text: str, where: str, problems: list[str]) -> dict[str, int]:
    """`10.0.0.1=3, node:n1=2, zone:a=1` -> {'10.0.0.1': 3, 'node:n1': 2, 'zone:a': 1}; bad items are described in
    `problems` and skipped. The daemon reads weights from `Service.lb_weights`; this is for tools and tests."""
    rules, bad = weight_items(text)
    problems.extend(f"{where}: annotation {WEIGHTS_ANNOTATION}: {item[:80]!r} is not IP=N, node:NAME=N "
                    f"or zone:NAME=N with N in 0..{MAX_WEIGHT}; ignored" for item in bad)
    return rules


def weight_of(rules: dict[str, int], ip: str, node: str, zone: str) -> int:
    if not rules:
        return 1
    for key in (ip, f"node:{node}" if node else None, f"zone:{zone}" if zone else None):
        if key is not None and key in rules:
            return rules[key]
    return 1
