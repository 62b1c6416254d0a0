"""`dataplane status` in kernel mode: what the programmed snapshot says, per Service port.

`kernel_status()` is pure: from the snapshot the last successful sync put in
the kernel, each Service port with its addresses (ClusterIPs, external and
LoadBalancer IPs, the NodePort), its traffic policies, and its endpoints:
how many, how many serving, which are on this node. Kernel mode's rules keep
no per-Service packet counters (the per-packet path is one map lookup), so the
counters shown are the daemon's own.
"""

from __future__ import annotations

import json
from typing import Callable

from ..model import Snapshot


def kernel_status(snapshot: Snapshot, node_name: str, figures: dict) -> dict:
    services = []
    for key, state in sorted(snapshot.services.items()):
        service = state.service
        for port, backends in state.port_backends():
            addresses = [f"{ip}:{port.port}" for ip in (*service.cluster_ips, *service.external_ips_all)]
            if port.node_port:
                addresses.append(f"nodes:{port.node_port}")
            serving = [b for b in backends if b.serving]
            services.append({
                "service": f"{key.namespace}/{key.name}:{port.name or port.port}/{port.protocol.value}",
                "type": service.type.value,
                "addresses": addresses,
                "external_traffic_policy": service.external_traffic_policy.value,
                "internal_traffic_policy": service.internal_traffic_policy.value,
                "endpoints": len(backends),
                "serving": len(serving),
                "local": [f"{b.ip}:{b.port}" for b in serving if b.node_name == node_name],
                "affinity_timeout": service.session_affinity_timeout,
            })
    return {"mode": "kernel", "node": node_name, **figures, "services": services}


def answer(body: dict) -> tuple[int, str, bytes]:
    return 200, "application/json", (json.dumps(body, indent=1) + "\n").encode()


def format_kernel_status(body: dict, out: Callable[[str], None] = print) -> None:
    figures = ", ".join(f"{k.replace('_', ' ')} {body[k]}" for k in ("services_programmed", "endpoint_entries",
                                                                     "syncs", "sync_failures",
                                                                     "conntrack_entries_deleted") if k in body)
    out(f"mode kernel on {body.get('node')}: {figures}")
    for service in body.get("services", []):
        policies = []
        if service["external_traffic_policy"] == "Local":
            policies.append("externalTrafficPolicy Local")
        if service["internal_traffic_policy"] == "Local":
            policies.append("internalTrafficPolicy Local")
        if service.get("affinity_timeout"):
            policies.append(f"ClientIP affinity {service['affinity_timeout']} s")
        out(f"{service['service']}  {service['type']}{'  ' + ', '.join(policies) if policies else ''}")
        out(f"    addresses  {', '.join(service['addresses']) or 'none (headless)'}")
        local = service["local"]
        out(f"    endpoints  {service['endpoints']} ({service['serving']} serving), {len(local)} on this node"
            + (f": {', '.join(local)}" if local else ""))
