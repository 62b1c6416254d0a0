"""EndpointSlices, legacy Endpoints and Pods, as immutable values.

All three end up as EndpointSlice values: legacy v1 Endpoints are converted
the way Kubernetes' mirroring controller would, and Pods are turned into
endpoints by snapshot.py when nothing else names a Service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidObject
from .fields import DNS1123_LABEL, DNS1123_SUBDOMAIN, IANA_SVC_NAME, Reader
from .service import Protocol, object_ref, read_metadata

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# When the change an EndpointSlice carries was triggered (kube-proxy's network programming latency).
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    address: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    hostname: str = ""
    zone_hints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    address_type: str  # IPv4, IPv6 or FQDN (FQDN is never proxied)
    endpoints: tuple[Endpoint, ...]
    ports: tuple[EndpointPort, ...]


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    node_name: str
    ips: tuple[str, ...]
    ready: bool
    terminating: bool
    container_ports: tuple[ContainerPort, ...]
    hostname: str = ""
    subdomain: str = ""


def parse_endpoint_slice(obj: dict[str, Any], problems: list[InvalidObject] | None = None) -> EndpointSlice:
    """Builds an EndpointSlice; raises InvalidObject. An endpoint without an address is left out
    alone and appended to `problems` (the slice's other endpoints still serve)."""
    problems = problems if problems is not None else []
    reader = Reader("EndpointSlice", object_ref(obj), obj)
    namespace, name = read_metadata(reader)
    labels = dict(reader.child("metadata").str_map("labels"))
    address_type = reader.choice("addressType", ("IPv4", "IPv6", "FQDN"), "IPv4")
    endpoints = []
    for item in reader.items("endpoints"):
        conditions = item.child("conditions")
        ready = conditions.bool("ready", True)
        hints = tuple(zone.str("name") for zone in item.child("hints").items("forZones"))
        common = dict(
            ready=ready,
            # As kube-proxy reads them: unset ready and serving mean true, unset terminating false.
            serving=conditions.bool("serving", True),
            terminating=conditions.bool("terminating", False),
            node_name=item.name("nodeName", DNS1123_SUBDOMAIN),
            zone=item.str("zone"),
            hostname=item.str("hostname"),
            zone_hints=hints,
        )
        addresses = list(item.items("addresses"))
        if not addresses:
            problems.append(item.fail("must hold one address at least; this endpoint is ignored", "addresses").kept())
            continue
        # Kubernetes: consumers use only the first address; FQDN slices are never proxied.
        if address_type != "FQDN":
            address = addresses[0].parse_ip(addresses[0].data, "")
            if (":" in address) != (address_type == "IPv6"):
                raise addresses[0].fail(f"must be an {address_type} address (the slice's addressType), "
                                        f"got {address!r}")
            endpoints.append(Endpoint(address=address, **common))
    ports = _ports(reader)
    if not labels.get(SERVICE_NAME_LABEL):
        # kube-proxy too refuses a slice that names no Service: nothing could ever use it.
        raise reader.child("metadata").fail("is required: the Service this slice belongs to",
                                            f"labels[{SERVICE_NAME_LABEL}]")
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=labels.get(SERVICE_NAME_LABEL, ""),
        address_type=address_type,
        endpoints=tuple(endpoints),
        ports=ports,
    )


def _ports(reader: Reader) -> tuple[EndpointPort, ...]:
    """The `ports` list of a slice or of an Endpoints subset: the same shape in both."""
    return tuple(
        EndpointPort(
            name=item.name("name", DNS1123_LABEL),
            port=item.port("port", required=True),
            protocol=Protocol(item.choice("protocol", tuple(Protocol), "TCP")),
        )
        for item in reader.items("ports")
    )


def parse_endpoints(obj: dict[str, Any]) -> tuple[EndpointSlice, ...]:
    """Converts a legacy v1 Endpoints object: one slice per subset."""
    reader = Reader("Endpoints", object_ref(obj), obj)
    namespace, name = read_metadata(reader)
    slices = []
    for index, subset in enumerate(reader.items("subsets")):
        ports = _ports(subset)
        endpoints = []
        for field, ready in (("addresses", True), ("notReadyAddresses", False)):
            for item in subset.items(field):
                endpoints.append(
                    Endpoint(
                        address=item.parse_ip(item.data.get("ip") if isinstance(item.data, dict) else None, "ip"),
                        ready=ready,
                        serving=ready,
                        node_name=item.name("nodeName", DNS1123_SUBDOMAIN),
                        hostname=item.str("hostname"),
                    )
                )
        slices.append(EndpointSlice(namespace, f"{name}-subset-{index}", name, "IPv4", tuple(endpoints), ports))
    return tuple(slices)


def parse_pod(obj: dict[str, Any]) -> Pod:
    reader = Reader("Pod", object_ref(obj), obj)
    namespace, name = read_metadata(reader)
    meta = reader.child("metadata")
    spec = reader.child("spec")
    status = reader.child("status")
    ips = [item.ip("ip") for item in status.items("podIPs")]
    ips = [ip for ip in ips if ip] or [ip for ip in [status.ip("podIP")] if ip]
    ready = any(
        cond.str("type") == "Ready" and cond.str("status") == "True" for cond in status.items("conditions")
    ) and status.str("phase", "Running") == "Running"
    ports = []
    for container in spec.items("containers"):
        for item in container.items("ports"):
            ports.append(
                ContainerPort(
                    name=item.name("name", IANA_SVC_NAME),
                    port=item.port("containerPort", required=True),
                    protocol=Protocol(item.choice("protocol", tuple(Protocol), "TCP")),
                )
            )
    return Pod(
        namespace=namespace,
        name=name,
        labels=meta.str_map("labels"),
        node_name=spec.name("nodeName", DNS1123_SUBDOMAIN),
        ips=tuple(dict.fromkeys(ips)),
        ready=ready,
        # Any value counts: YAML turns an unquoted timestamp into a datetime, not a string.
        terminating=meta.has("deletionTimestamp"),
        container_ports=tuple(ports),
        hostname=spec.str("hostname"),
        subdomain=spec.str("subdomain"),
    )
