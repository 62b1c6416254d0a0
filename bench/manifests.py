"""Synthetic clusters: one description, written as real Kubernetes YAML (one file per Service).

A `ServiceSpec` is what the harness means by "a Service with its endpoints";
the YAML the daemon reads and the kube-proxy-style iptables reference
(`iptables_reference.py`) are both rendered from the same specs, so both
data planes are handed the same cluster.

Address plan: ClusterIPs count up from 10.96.0.1; synthetic endpoints live in
10.128.0.0/9 (room for 30,000 x 10) on 100 made-up nodes, none of them the
node under test; the measured Service (latency labs) is the last one and its
endpoints are the lab Pod's own addresses (`dataplane.lab` plan, 10.244.1.x).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

SERVICE_BASE = int(ipaddress.ip_address("10.96.0.0"))
POD_BASE = int(ipaddress.ip_address("10.128.0.0"))  # a /9: room for 30,000 x 10 endpoints
NODES = 100  # endpoints are spread over this many nodes; this node is node-0
NAMESPACE = "bench"


@dataclass(frozen=True, slots=True)
class PortSpec:
    name: str
    protocol: str  # TCP or UDP
    port: int
    target_port: int


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One ClusterIP Service and its ready endpoints (all ports served by every endpoint)."""

    name: str
    cluster_ip: str
    ports: tuple[PortSpec, ...]
    endpoints: tuple[tuple[str, str], ...]  # (address, nodeName)
    namespace: str = NAMESPACE
    annotations: tuple[tuple[str, str], ...] = ()


SYNTHETIC_PORTS = (PortSpec("http", "TCP", 80, 8080),)


def cluster_ip(i: int) -> str:
    return str(ipaddress.ip_address(SERVICE_BASE + 1 + i))


def pod_ip(i: int, j: int, generation: int = 0) -> str:
    return str(ipaddress.ip_address(POD_BASE + (i * 10 + j) * 2 + generation % 2))


def synthetic_spec(i: int, endpoints: int, generation: int = 0) -> ServiceSpec:
    """Service i; `generation` moves its last endpoint, which is one endpoint change."""
    addresses = tuple(
        (pod_ip(i, j, generation if j == endpoints - 1 else 0), f"node-{(i + j) % NODES}") for j in range(endpoints)
    )
    return ServiceSpec(f"svc-{i}", cluster_ip(i), SYNTHETIC_PORTS, addresses)


def measured_spec(i: int, pod_ips: list[str], node_name: str, port: int, target_port: int) -> ServiceSpec:
    """The Service the latency paths go through: TCP and UDP `port` -> the lab Pod's addresses."""
    ports = (PortSpec("tcp", "TCP", port, target_port), PortSpec("udp", "UDP", port, target_port))
    return ServiceSpec(f"measured-{i}", cluster_ip(i), ports, tuple((ip, node_name) for ip in pod_ips))


def spec_yaml(spec: ServiceSpec) -> str:
    """The Service and its one EndpointSlice, as a two-document YAML file."""
    ports = ", ".join(f"{{name: {p.name}, port: {p.port}, targetPort: {p.target_port}, protocol: {p.protocol}}}"
                      for p in spec.ports)
    slice_ports = ", ".join(f"{{name: {p.name}, port: {p.target_port}, protocol: {p.protocol}}}" for p in spec.ports)
    endpoints = "".join(f"- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: {node}\n"
                        for ip, node in spec.endpoints)
    annotations = "".join(f", annotations: {{{k}: {v}}}" for k, v in spec.annotations)
    return (
        "apiVersion: v1\nkind: Service\n"
        f"metadata: {{name: {spec.name}, namespace: {spec.namespace}{annotations}}}\n"
        f"spec:\n  clusterIP: {spec.cluster_ip}\n  ports: [{ports}]\n"
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
        f"metadata:\n  name: {spec.name}-abcde\n  namespace: {spec.namespace}\n"
        f"  labels: {{kubernetes.io/service-name: {spec.name}}}\n"
        f"addressType: IPv4\nports: [{slice_ports}]\nendpoints:\n{endpoints}"
    )


def service_yaml(i: int, endpoints: int, generation: int = 0) -> str:
    """Synthetic Service i as YAML; `generation` moves its last endpoint, which is one endpoint change."""
    return spec_yaml(synthetic_spec(i, endpoints, generation))


def synthetic_cluster(services: int, endpoints: int) -> list[ServiceSpec]:
    return [synthetic_spec(i, endpoints) for i in range(services)]


def write_specs(directory: Path, specs: list[ServiceSpec]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        (directory / f"{spec.name}.yaml").write_text(spec_yaml(spec))


def write_cluster(directory: Path, services: int, endpoints: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(services):
        (directory / f"svc-{i}.yaml").write_text(service_yaml(i, endpoints))
