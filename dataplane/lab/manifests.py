"""Kubernetes manifests for labs: builders for the objects, and a directory the daemon watches.

Builders return the plain dicts `kubectl get -o yaml` would show (only the
fields the data plane reads); `ManifestDir` writes them as YAML. A write is
atomic (a dotfile renamed into place), so a watcher never reads half a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]


def port(name: str, port: int, target: int | str | None = None, protocol: str = "TCP",
         node_port: int | None = None) -> Manifest:
    """A Service port; `target` may be a number or a container port name."""
    spec: Manifest = {"name": name, "protocol": protocol, "port": port, "targetPort": port if target is None else target}
    if node_port is not None:
        spec["nodePort"] = node_port
    return spec


def service(name: str, cluster_ip: str | None, ports: Sequence[Manifest], *, type: str = "ClusterIP",
            selector: dict[str, str] | None = None, namespace: str = "default",
            external_ips: Sequence[str] = (), ingress_ips: Sequence[str] = (), **spec: Any) -> Manifest:
    """A v1 Service. `ingress_ips` become status.loadBalancer.ingress; `spec` adds raw spec fields."""
    body: Manifest = {"type": type, "ports": list(ports), **spec}
    if cluster_ip is not None:
        body["clusterIP"] = cluster_ip
    if selector:
        body["selector"] = dict(selector)
    if external_ips:
        body["externalIPs"] = list(external_ips)
    manifest: Manifest = {"apiVersion": "v1", "kind": "Service",
                          "metadata": {"name": name, "namespace": namespace}, "spec": body}
    if ingress_ips:
        manifest["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress_ips]}}
    return manifest


def endpoint_slice(service_name: str, addresses: Iterable[str], ports: Sequence[tuple[str, int, str]], *,
                   namespace: str = "default", name: str | None = None, node: str = "node1",
                   not_ready: Iterable[str] = (), address_type: str | None = None) -> Manifest:
    """A discovery.k8s.io/v1 EndpointSlice for `service_name`.

    `ports` are (name, port, protocol), named like the Service ports they serve.
    Addresses in `not_ready` are listed with ready: false. `address_type` is
    IPv4 or IPv6 (a slice holds one family); by default, the first address's.
    """
    not_ready = set(not_ready)
    addresses = list(addresses)
    if address_type is None:
        address_type = "IPv6" if addresses and ":" in addresses[0] else "IPv4"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service_name}-abc12", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type,
        "endpoints": [
            {"addresses": [ip], "nodeName": node,
             "conditions": {"ready": ip not in not_ready, "serving": ip not in not_ready, "terminating": False}}
            for ip in addresses
        ],
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
    }


def pod(name: str, ip: str, labels: dict[str, str], container_ports: Sequence[tuple[str, int, str]] = (), *,
        namespace: str = "default", node: str = "node1", ready: bool = True) -> Manifest:
    """A v1 Pod with status.podIP and a Ready condition; `container_ports` are (name, port, protocol)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "echo",
                "image": "dataplane-echo",
                "ports": [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in container_ports],
            }],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def dump(documents: Manifest | Iterable[Manifest]) -> str:
    """YAML text: one document per manifest, separated by `---`."""
    if isinstance(documents, dict):
        documents = [documents]
    return yaml.safe_dump_all(list(documents), sort_keys=False)


class ManifestDir:
    """A directory of manifest files (the daemon's `--source`)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, filename: str, documents: Manifest | Iterable[Manifest] | str) -> Path:
        """Atomically replaces `filename` with `documents` (manifests, or raw text written as is)."""
        text = documents if isinstance(documents, str) else dump(documents)
        target = self.path / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(text)
        os.replace(temporary, target)
        return target

    def remove(self, filename: str) -> None:
        """Deletes `filename`; no error when it is not there."""
        (self.path / filename).unlink(missing_ok=True)
