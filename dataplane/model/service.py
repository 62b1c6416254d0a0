"""The v1 Service, as immutable values.

A Service value is valid by construction: ports are in range, addresses are
canonical strings, enums hold known values. Nothing downstream re-checks them.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timezone
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from .annotations import PREFIX as ANNOTATION_PREFIX, read_annotations
from .errors import InvalidObject
from .fields import (DNS1035_LABEL, DNS1123_LABEL, DNS1123_SUBDOMAIN, IANA_SVC_NAME, NameRule, Reader, good_name,
                     ordinary_ipv4, shared, special_address)

# A Service carrying this label belongs to another proxy (kube-proxy skips it too).
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
DEFAULT_AFFINITY_TIMEOUT = 10800


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficPolicy(StrEnum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


class ServiceKey(NamedTuple):
    """namespace/name; a tuple so that hashing 10,000 of them stays cheap."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: Protocol
    port: int
    target_port: int | str  # a number, or the name of a container port
    node_port: int | None = None


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    type: ServiceType = ServiceType.CLUSTER_IP
    cluster_ips: tuple[str, ...] = ()  # empty for headless and ExternalName
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    session_affinity_timeout: int | None = None  # None: no ClientIP affinity
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    load_balancer_source_ranges: tuple[str, ...] = ()
    health_check_node_port: int | None = None
    selector: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    external_name: str = ""
    created: str = ""  # metadata.creationTimestamp, as UTC "YYYY-MM-DDTHH:MM:SSZ"; "" when not given
    lb_algorithm: str = ""  # dataplane.io/lb-algorithm, valid or ""
    lb_weights: tuple[tuple[str, int], ...] = ()  # dataplane.io/weights: (IP | node:NAME | zone:NAME, weight)

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)

    @property
    def headless(self) -> bool:
        return not self.cluster_ips and self.type != ServiceType.EXTERNAL_NAME

    @property
    def proxied(self) -> bool:
        """True when this node's data plane programs rules for it."""
        return bool(self.cluster_ips) and self.type != ServiceType.EXTERNAL_NAME

    @property
    def external_ips_all(self) -> tuple[str, ...]:
        """externalIPs and LoadBalancer ingress IPs: addresses reached from outside."""
        return self.external_ips + tuple(ip for ip in self.load_balancer_ips if ip not in self.external_ips)

    def port_named(self, name: str) -> ServicePort | None:
        return next((port for port in self.ports if port.name == name), None)


def is_foreign(obj: dict[str, Any]) -> bool:
    """A Service labelled for another service proxy is not ours to program."""
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    return isinstance(labels, dict) and SERVICE_PROXY_NAME_LABEL in labels


def object_ref(obj: dict[str, Any]) -> str:
    """`namespace/name` for messages, escaped so a hostile name stays on one line."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    ref = f"{meta.get('namespace') or 'default'}/{meta.get('name') or '<unnamed>'}"
    return ref if ref.isprintable() else ref.encode("unicode_escape").decode("ascii")


def read_metadata(reader: Reader, name_rule: NameRule = DNS1123_SUBDOMAIN) -> tuple[str, str]:
    """(namespace, name), both checked against Kubernetes' naming rules."""
    meta = reader.child("metadata")
    name = meta.name("name", name_rule)
    if not name:
        raise meta.fail("is required", "name")
    return meta.name("namespace", DNS1123_LABEL) or "default", name


def parse_service(obj: dict[str, Any], problems: list[InvalidObject] | None = None) -> Service:
    """Builds a Service from a v1 Service object; raises InvalidObject.

    Problems that leave the Service usable (a bad annotation, an ignored
    field) are appended to `problems` instead, each marked not skipped.
    """
    service = fast_service(obj)
    if service is not None:
        return service
    return _read_service(obj, problems if problems is not None else [])


_PROTOCOLS = {protocol.value: protocol for protocol in Protocol}
_FAST_TYPES = {None: ServiceType.CLUSTER_IP, "ClusterIP": ServiceType.CLUSTER_IP, "NodePort": ServiceType.NODE_PORT}
_POLICIES = {None: TrafficPolicy.CLUSTER, "Cluster": TrafficPolicy.CLUSTER, "Local": TrafficPolicy.LOCAL}


def fast_service(obj: dict[str, Any]) -> Service | None:
    """The Service `_read_service` would build, when it would raise and report nothing; else None.

    The common case (ClusterIP or NodePort, one address per family, plain ports,
    no dataplane.io annotations), read with plain dict lookups; whatever is unusual
    (LoadBalancer, ExternalName, headless, external IPs, ClientIP affinity, any
    wrong type or value) returns None and the slow path reads it, naming the object
    and the field of any error. Equal results are a tested property
    (tests/unit/test_model_fast_path.py).
    """
    meta, spec = obj.get("metadata"), obj.get("spec")
    if type(meta) is not dict or type(spec) is not dict:
        return None
    name, namespace = good_name(meta.get("name"), DNS1035_LABEL), good_name(meta.get("namespace"), DNS1123_LABEL)
    if not name or namespace is None:
        return None
    namespace = namespace or "default"
    labels, annotations = _fast_str_map(meta.get("labels")), _fast_str_map(meta.get("annotations"))
    if labels is None or annotations is None or any(key.startswith(ANNOTATION_PREFIX) for key, _ in annotations):
        return None
    created = meta.get("creationTimestamp")
    if created is None or created == "":
        created = ""
    elif (created := _fast_timestamp(created)) is None:
        return None
    service_type = spec.get("type")
    if type(service_type) not in (str, type(None)) or (service_type := _FAST_TYPES.get(service_type)) is None:
        return None
    external_policy, internal_policy = spec.get("externalTrafficPolicy"), spec.get("internalTrafficPolicy")
    if type(external_policy) not in (str, type(None)) or type(internal_policy) not in (str, type(None)):
        return None
    external_policy, internal_policy = _POLICIES.get(external_policy), _POLICIES.get(internal_policy)
    affinity, external_name, health_port = spec.get("sessionAffinity"), spec.get("externalName"), \
        spec.get("healthCheckNodePort")
    if (external_policy is None or internal_policy is None or affinity not in (None, "None")
            or type(affinity) not in (str, type(None)) or type(external_name) not in (str, type(None))
            or health_port is not None and (type(health_port) is not int or not 1 <= health_port <= 65535)):
        return None
    for field in ("externalIPs", "loadBalancerSourceRanges"):
        value = spec.get(field)
        if value is not None and (type(value) is not list or value):
            return None  # the slow path reads these, or says why it cannot
    selector = _fast_str_map(spec.get("selector"))
    cluster_ips = _fast_cluster_ips(spec.get("clusterIP"), spec.get("clusterIPs"))
    ports = _fast_ports(spec.get("ports"), service_type)
    if selector is None or cluster_ips is None or ports is None:
        return None
    return Service(namespace, name, service_type, cluster_ips, ports, (), (), None, external_policy, internal_policy,
                   (), health_port, selector, labels, annotations, external_name or "", created)


def _fast_str_map(value: Any) -> tuple[tuple[str, str], ...] | None:
    """A map of strings as `Reader.str_map` reads it (keys shared), or None where it might object."""
    if value is None:
        return ()
    if type(value) is not dict:
        return None
    for key, item in value.items():
        if type(key) is not str or type(item) is not str:
            return None
    return tuple(sorted((shared(key), item) for key, item in value.items()))


def _fast_timestamp(value: Any) -> str | None:
    if type(value) is not str:
        return None
    try:
        when = datetime.fromisoformat(value)
        if when.tzinfo is None:
            return None
        return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, TypeError, OverflowError):
        return None


def _fast_cluster_ips(single: Any, listed: Any) -> tuple[str, ...] | None:
    """One IPv4 ClusterIP, given as clusterIP, clusterIPs or both (agreeing); None for anything else."""
    if listed is None or listed == []:
        if type(listed) not in (list, type(None)):
            return None
        ip = single
    elif type(listed) is list and len(listed) == 1:
        ip = listed[0]
        if single is not None and single != "" and single != ip:
            return None
    else:
        return None
    if type(ip) is not str or (ip := ordinary_ipv4(ip)) is None:
        return None
    if single is not None and type(single) is not str:
        return None
    return (ip,)


def fast_port(item: Any) -> tuple[str, int, Protocol] | None:
    """(name, port, protocol) of a Service or EndpointSlice port, or None where the Reader path might object."""
    if type(item) is not dict:
        return None
    name, port, protocol = good_name(item.get("name"), DNS1123_LABEL), item.get("port"), item.get("protocol")
    if name is None or type(port) is not int or not 1 <= port <= 65535:
        return None
    if protocol is None:
        return name, port, Protocol.TCP
    protocol = _PROTOCOLS.get(protocol) if type(protocol) is str else None
    return None if protocol is None else (name, port, protocol)


def _fast_ports(items: Any, service_type: ServiceType) -> tuple[ServicePort, ...] | None:
    """Service ports as `_parse_port` and `_check_unique_ports` read them, or None where they might object."""
    if items is None:
        return ()
    if type(items) is not list:
        return None
    ports, seen = [], set()
    for item in items:
        common = fast_port(item)
        if common is None:
            return None
        name, port, protocol = common
        target, node_port = item.get("targetPort"), item.get("nodePort")
        if target is None or target == "":
            target = port
        elif type(target) is int:
            if not 1 <= target <= 65535:
                return None
        elif type(target) is not str or target.isdigit() or (target := IANA_SVC_NAME.good(target)) is None:
            return None
        if node_port is not None:
            if service_type is not ServiceType.NODE_PORT or type(node_port) is not int \
                    or not 1 <= node_port <= 65535 or (node_port, protocol, "node") in seen:
                return None
            seen.add((node_port, protocol, "node"))
        if (port, protocol) in seen or ("name", name) in seen:
            return None
        seen.add((port, protocol))
        seen.add(("name", name))
        ports.append(ServicePort(name, protocol, port, target, node_port))
    return tuple(ports)


def _read_service(obj: dict[str, Any], problems: list[InvalidObject]) -> Service:
    """parse_service, field by field through a Reader: every input, every error message."""
    reader = Reader("Service", object_ref(obj), obj)
    namespace, name = read_metadata(reader, DNS1035_LABEL)
    meta = reader.child("metadata")
    spec = reader.child("spec")
    service_type = ServiceType(spec.choice("type", tuple(ServiceType), ServiceType.CLUSTER_IP))

    cluster_ips = _cluster_ips(spec, problems) if service_type != ServiceType.EXTERNAL_NAME else ()
    if not cluster_ips and service_type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER) \
            and spec.str("clusterIP") == "None":
        raise spec.fail(f"may not be 'None' (headless) for type {service_type}", "clusterIP")
    ports = tuple(_parse_port(item, service_type, problems) for item in spec.items("ports"))
    _check_unique_ports(spec, ports)
    external_name = spec.str("externalName")
    if service_type == ServiceType.EXTERNAL_NAME and not external_name:
        raise spec.fail("is required for type ExternalName", "externalName")

    affinity = spec.choice("sessionAffinity", ("None", "ClientIP"), "None")
    timeout = None
    if affinity == "ClientIP":
        timeout = (
            spec.child("sessionAffinityConfig").child("clientIP").int("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT, 1, 86400)
        )
    external_ips = []
    for index, item in enumerate(spec.items("externalIPs")):
        ip = item.service_ip(item.data, "")
        if ip in cluster_ips:
            # Its own ClusterIP again: two entries for one address and port would contradict each other.
            problems.append(item.fail(f"is the Service's own clusterIP, got {ip!r}; ignored").kept())
        elif ip not in external_ips:
            external_ips.append(ip)
    ingress_ips = []
    if service_type == ServiceType.LOAD_BALANCER:
        for item in reader.child("status").child("loadBalancer").items("ingress"):
            # Written by a cloud controller, not by the Service's author: a bad entry is left out alone.
            ip = item.ip("ip")
            kind = special_address(ip) if ip else None
            if kind is not None or ip in cluster_ips:
                why = f"a {kind} address" if kind else "the Service's own clusterIP"
                problems.append(item.fail(f"may not be {why}, got {ip!r}; this entry is ignored", "ip").kept())
            elif ip and ip not in ingress_ips:
                ingress_ips.append(ip)
    labels = meta.str_map("labels")
    annotations = meta.str_map("annotations")
    algorithm, weights, annotation_problems = read_annotations(meta, dict(annotations))
    problems.extend(annotation_problems)
    return Service(
        namespace=namespace,
        name=name,
        type=service_type,
        cluster_ips=cluster_ips,
        ports=ports,
        external_ips=tuple(external_ips),
        load_balancer_ips=tuple(ingress_ips),
        session_affinity_timeout=timeout,
        external_traffic_policy=TrafficPolicy(spec.choice("externalTrafficPolicy", tuple(TrafficPolicy), "Cluster")),
        internal_traffic_policy=TrafficPolicy(spec.choice("internalTrafficPolicy", tuple(TrafficPolicy), "Cluster")),
        load_balancer_source_ranges=spec.cidr_list("loadBalancerSourceRanges"),
        health_check_node_port=spec.port("healthCheckNodePort"),
        selector=spec.str_map("selector"),
        labels=labels,
        annotations=annotations,
        external_name=external_name,
        created=_timestamp(meta, "creationTimestamp", problems),
        lb_algorithm=algorithm,
        lb_weights=weights,
    )


def _timestamp(meta: Reader, field: str, problems: list[InvalidObject]) -> str:
    """An RFC 3339 time as UTC "YYYY-MM-DDTHH:MM:SSZ" (which sorts as text), or "" when absent or bad."""
    value = meta.data.get(field) if isinstance(meta.data, dict) else None
    if value is None or value == "":
        return ""
    try:
        when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        if when.tzinfo is None:
            raise ValueError("no time zone")
        return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, TypeError, OverflowError):
        problems.append(meta.fail(f"must be an RFC 3339 time, got {str(value)[:80]!r}; ignored", field).kept())
        return ""


def _cluster_ips(spec: Reader, problems: list[InvalidObject]) -> tuple[str, ...]:
    listed = list(spec.items("clusterIPs"))
    single = spec.str("clusterIP")
    if listed:
        raw = [(item.data, f"clusterIPs[{index}]") for index, item in enumerate(listed)]
        if single and single != raw[0][0]:
            # The API server keeps clusterIP == clusterIPs[0]; here clusterIPs wins, and says so.
            problems.append(spec.fail(f"must be clusterIPs[0] ({raw[0][0]!r}) when both are set, got {single!r}; "
                                      "clusterIPs is used", "clusterIP").kept())
    else:
        raw = [(single, "clusterIP")]
    if raw[0][0] in ("None", ""):
        return ()
    ips = tuple(spec.service_ip(value, field) for value, field in raw)
    if len({ipaddress.ip_address(ip).version for ip in ips}) != len(ips):
        raise spec.fail("must hold at most one address per IP family", "clusterIPs")
    return ips


def _parse_port(item: Reader, service_type: ServiceType, problems: list[InvalidObject]) -> ServicePort:
    port = item.port("port", required=True)
    assert port is not None
    target = item.data.get("targetPort") if isinstance(item.data, dict) else None
    if target is None or target == "":
        target = port
    elif isinstance(target, str) and target.isdigit():
        target = int(target)
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise item.fail(f"must be a port number or name, got {target!r}", "targetPort")
    if isinstance(target, int) and not 1 <= target <= 65535:
        raise item.fail(f"must be between 1 and 65535, got {target}", "targetPort")
    if isinstance(target, str):
        item.name("targetPort", IANA_SVC_NAME)
    node_port = item.port("nodePort")
    if node_port is not None and service_type not in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER):
        problems.append(item.fail(f"is only used with type NodePort or LoadBalancer, not {service_type}; "
                                  "ignored", "nodePort").kept())
        node_port = None
    return ServicePort(
        # Kubernetes: Service port names are DNS-1123 labels (container port names are IANA names).
        name=item.name("name", DNS1123_LABEL),
        protocol=Protocol(item.choice("protocol", tuple(Protocol), "TCP")),
        port=port,
        target_port=target,
        node_port=node_port,
    )


def _check_unique_ports(spec: Reader, ports: tuple[ServicePort, ...]) -> None:
    seen: set[object] = set()
    for index, port in enumerate(ports):
        for key, what in (((port.port, port.protocol), "port"), (("name", port.name), "name")):
            if key in seen:
                raise spec.fail(f"duplicate {what} {key[0] if what == 'port' else port.name!r}", f"ports[{index}]")
            seen.add(key)
        if port.node_port is not None:
            if (port.node_port, port.protocol, "node") in seen:
                raise spec.fail(f"duplicate nodePort {port.node_port}", f"ports[{index}].nodePort")
            seen.add((port.node_port, port.protocol, "node"))
