"""Joins Services with their endpoints into one immutable state snapshot.

Precedence for one Service, as in a cluster: EndpointSlices that name it
(label kubernetes.io/service-name, all merged); else legacy v1 Endpoints;
else the ready Pods its selector matches, as the endpoint controller would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from .endpoints import Endpoint, EndpointSlice, Pod
from .service import Service, ServiceKey, ServicePort


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    """One endpoint of one Service port: where a connection may be sent."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    zone_hints: tuple[str, ...] = ()
    hostname: str = ""

    @property
    def family(self) -> int:
        return 6 if ":" in self.ip else 4


@dataclass(frozen=True, slots=True)
class ServiceState:
    """A Service and, aligned with service.ports, each port's backends.

    `endpoints` lists every endpoint whatever its ports, which is what DNS
    needs for headless Services (they may have no ports at all).
    """

    service: Service
    backends: tuple[tuple[Backend, ...], ...]
    endpoints: tuple[Endpoint, ...] = ()

    def port_backends(self) -> Iterable[tuple[ServicePort, tuple[Backend, ...]]]:
        return zip(self.service.ports, self.backends)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Snapshot:
    services: Mapping[ServiceKey, ServiceState] = field(default_factory=dict)
    pods: Mapping[tuple[str, str], Pod] = field(default_factory=dict)
    # Lineage: the snapshot this one follows, and the Services changed since.
    # A consumer that saw `previous` need only look at `changed`.
    previous: Callable[[], "Snapshot | None"] | None = field(default=None, compare=False)
    changed: frozenset[ServiceKey] | None = field(default=None, compare=False)

    def follows(self, other: "Snapshot") -> bool:
        """True when `changed` lists every Service that differs from `other`."""
        return self.changed is not None and self.previous is not None and self.previous() is other

    def changed_since(self, other: "Snapshot") -> Iterable[ServiceKey]:
        """Keys of Services that may differ from `other` (all of them without lineage)."""
        return self.changed if self.follows(other) else self.services.keys() | other.services.keys()


def join_service(
    service: Service,
    slices: Iterable[EndpointSlice] = (),
    legacy: Iterable[EndpointSlice] = (),
    pods: Iterable[Pod] = (),
) -> ServiceState:
    """Resolves each Service port to its backends; never raises."""
    slices = tuple(slices) or tuple(legacy)
    if slices:
        backends = tuple(_from_slices(port, slices) for port in service.ports)
        found = {}
        for endpoint_slice in slices:
            for endpoint in endpoint_slice.endpoints:
                if endpoint.address not in found or (endpoint.ready and not found[endpoint.address].ready):
                    found[endpoint.address] = endpoint
        endpoints = _sorted_by_key(found)
    elif service.selector:
        matching = [
            pod for pod in pods if pod.namespace == service.namespace and _selects(service.selector, pod.labels)
        ]
        backends = tuple(_from_pods(port, matching) for port in service.ports)
        endpoints = tuple(sorted(_pod_endpoints(service, matching)))
    else:
        backends = tuple(() for _ in service.ports)
        endpoints = ()
    return ServiceState(service, backends, endpoints)


def _pod_endpoints(service: Service, pods: list[Pod]) -> Iterable[Endpoint]:
    for pod in pods:
        # The endpoint controller publishes a hostname only for Pods in the Service's subdomain.
        hostname = pod.hostname if pod.subdomain == service.name else ""
        for ip in pod.ips:
            yield Endpoint(
                address=ip,
                ready=pod.ready and not pod.terminating,
                serving=pod.ready,
                terminating=pod.terminating,
                node_name=pod.node_name,
                hostname=hostname,
            )


def _from_slices(port: ServicePort, slices: tuple[EndpointSlice, ...]) -> tuple[Backend, ...]:
    found: dict[tuple[str, int], Backend] = {}
    for endpoint_slice in slices:
        # The EndpointSlice controller names slice ports after Service ports.
        slice_port = next(
            (p for p in endpoint_slice.ports if p.name == port.name and p.protocol == port.protocol), None
        )
        if slice_port is None:
            continue
        number = slice_port.port
        for endpoint in endpoint_slice.endpoints:
            key = (endpoint.address, number)
            previous = found.get(key)
            if previous is None or (endpoint.ready and not previous.ready):
                found[key] = Backend(endpoint.address, number, endpoint.ready, endpoint.serving, endpoint.terminating,
                                     endpoint.node_name, endpoint.zone, endpoint.zone_hints, endpoint.hostname)
    return _sorted_by_key(found)


def _sorted_by_key(found: dict) -> tuple:
    """The values in the order of their keys. Each key is the value's leading fields, unique, so
    this is the values' own order, reached by comparing tuples rather than dataclasses."""
    return tuple(found[key] for key in sorted(found))


def _from_pods(port: ServicePort, pods: list[Pod]) -> tuple[Backend, ...]:
    found: dict[tuple[str, int], Backend] = {}
    for pod in pods:
        target = _resolve_target_port(port, pod)
        if target is None:
            continue
        for ip in pod.ips:
            found[(ip, target)] = Backend(
                ip=ip,
                port=target,
                ready=pod.ready and not pod.terminating,
                serving=pod.ready,
                terminating=pod.terminating,
                node_name=pod.node_name,
                hostname=pod.hostname,
            )
    return _sorted_by_key(found)


def _resolve_target_port(port: ServicePort, pod: Pod) -> int | None:
    if isinstance(port.target_port, int):
        return port.target_port
    for container_port in pod.container_ports:
        if container_port.name == port.target_port and container_port.protocol == port.protocol:
            return container_port.port
    return None


def _selects(selector: tuple[tuple[str, str], ...], labels: tuple[tuple[str, str], ...]) -> bool:
    have = dict(labels)
    return all(have.get(key) == value for key, value in selector)
