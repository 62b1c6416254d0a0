"""EndpointSlices, legacy Endpoints and Pods, as immutable values.

All three end up as EndpointSlice values: legacy v1 Endpoints are converted
the way Kubernetes' mirroring controller would, and Pods are turned into
endpoints by snapshot.py when nothing else names a Service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidObject
from .fields import DNS1123_LABEL, DNS1123_SUBDOMAIN, IANA_SVC_NAME, Reader, canonical_ip, good_name, shared
from .service import Protocol, fast_port, object_ref, read_metadata

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
    endpoint_slice = fast_endpoint_slice(obj)
    if endpoint_slice is not None:
        return endpoint_slice
    return _read_endpoint_slice(obj, problems if problems is not None else [])



def _condition(value: Any, default: bool) -> bool | None:
    """An endpoint condition: unset is `default`; anything but a bool is None (the slow path says why)."""
    if value is None:
        return default
    return value if value is True or value is False else None


def fast_endpoint_slice(obj: dict[str, Any]) -> EndpointSlice | None:
    """The slice `_read_endpoint_slice` would build, when it would raise and report nothing; else None.

    The common well-formed case, read with plain dict lookups: a Reader per field cost
    2 s of a 10,000-Service cold start. Anything unusual (a wrong type, a bad value, an
    endpoint without addresses, an FQDN slice) returns None, and the slow path says
    exactly what is wrong, naming the object and the field. Equal results are a tested
    property (tests/unit/test_model_fast_path.py).
    """
    meta = obj.get("metadata")
    if type(meta) is not dict:
        return None
    name, namespace = good_name(meta.get("name"), DNS1123_SUBDOMAIN), good_name(meta.get("namespace"), DNS1123_LABEL)
    labels = meta.get("labels")
    if not name or namespace is None or type(labels) is not dict:
        return None
    namespace = namespace or "default"
    for key, value in labels.items():
        if type(key) is not str or type(value) is not str:
            return None
    service_name = labels.get(SERVICE_NAME_LABEL)
    address_type = obj.get("addressType")
    if address_type is None:
        address_type = "IPv4"
    elif address_type not in ("IPv4", "IPv6") or type(address_type) is not str:
        return None
    if not service_name:
        return None
    ipv6 = address_type == "IPv6"
    address_type = "IPv6" if ipv6 else "IPv4"  # the constant, not one decoded copy per slice
    endpoints = []
    items = obj.get("endpoints")
    if items is None:
        items = ()
    elif type(items) is not list:
        return None
    for item in items:
        if type(item) is not dict:
            return None
        addresses, conditions = item.get("addresses"), item.get("conditions")
        if type(addresses) is not list or not addresses or type(addresses[0]) is not str:
            return None
        if conditions is None:
            ready = serving = True
            terminating = False
        elif type(conditions) is dict:
            ready = _condition(conditions.get("ready"), True)
            serving = _condition(conditions.get("serving"), True)
            terminating = _condition(conditions.get("terminating"), False)
            if ready is None or serving is None or terminating is None:
                return None
        else:
            return None
        node_name, zone, hostname = good_name(item.get("nodeName"), DNS1123_SUBDOMAIN), item.get("zone"), \
            item.get("hostname")
        if node_name is None:
            return None
        if zone is None:
            zone = ""
        elif type(zone) is not str:
            return None
        else:
            zone = shared(zone)
        if hostname is None:
            hostname = ""
        elif type(hostname) is not str:
            return None
        hints = item.get("hints")
        if hints is None:
            zone_hints = ()
        else:
            zone_hints = _fast_hints(hints)
            if zone_hints is None:
                return None
        address = canonical_ip(addresses[0])
        if address is None or (":" in address) != ipv6:
            return None
        endpoints.append(Endpoint(address, ready, serving, terminating, node_name, zone, hostname, zone_hints))
    ports = _fast_ports(obj.get("ports"))
    if ports is None:
        return None
    return EndpointSlice(namespace, name, shared(service_name), address_type, tuple(endpoints), ports)


def _fast_hints(hints: Any) -> tuple[str, ...] | None:
    if type(hints) is not dict:
        return None
    zones = hints.get("forZones")
    if zones is None:
        return ()
    if type(zones) is not list:
        return None
    names = []
    for zone in zones:
        if type(zone) is not dict:
            return None
        name = zone.get("name")
        if name is None:
            name = ""
        elif type(name) is not str:
            return None
        names.append(shared(name))
    return tuple(names)


def _fast_ports(items: Any) -> tuple[EndpointPort, ...] | None:
    """A slice's `ports` as `_ports` reads them, or None where it might object."""
    if items is None:
        return ()
    if type(items) is not list:
        return None
    ports = []
    for item in items:
        common = fast_port(item)
        if common is None:
            return None
        ports.append(EndpointPort(*common))
    return tuple(ports)


def _read_endpoint_slice(obj: dict[str, Any], problems: list[InvalidObject]) -> EndpointSlice:
    """parse_endpoint_slice, field by field through a Reader: every input, every error message."""
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
