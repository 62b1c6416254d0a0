"""Synthetic clusters written as real Kubernetes YAML, one file per Service."""

from __future__ import annotations

import ipaddress
from pathlib import Path

SERVICE_BASE = int(ipaddress.ip_address("10.96.0.0"))
POD_BASE = int(ipaddress.ip_address("10.128.0.0"))  # a /9: room for 30,000 x 10 endpoints
NODES = 100  # endpoints are spread over this many nodes; this node is node-0

_TEMPLATE = """\
apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  clusterIP: {cluster_ip}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{i}-abcde
  namespace: bench
  labels: {{kubernetes.io/service-name: svc-{i}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{endpoints}"""


def cluster_ip(i: int) -> str:
    return str(ipaddress.ip_address(SERVICE_BASE + 1 + i))


def pod_ip(i: int, j: int, generation: int = 0) -> str:
    return str(ipaddress.ip_address(POD_BASE + (i * 10 + j) * 2 + generation % 2))


def service_yaml(i: int, endpoints: int, generation: int = 0) -> str:
    """Service i; `generation` moves its last endpoint, which is one endpoint change."""
    lines = []
    for j in range(endpoints):
        ip = pod_ip(i, j, generation if j == endpoints - 1 else 0)
        lines.append(f"- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: node-{(i + j) % NODES}\n")
    return _TEMPLATE.format(i=i, cluster_ip=cluster_ip(i), endpoints="".join(lines))


def write_cluster(directory: Path, services: int, endpoints: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(services):
        (directory / f"svc-{i}.yaml").write_text(service_yaml(i, endpoints))
