"""`/status` and `dataplane status`: how the running daemon balances, as JSON and as text.

Userspace mode: `body` builds the JSON from values already in memory (no I/O:
it runs on the event loop); `format_status` is the CLI's rendering of it. Its
`services` are every Service port, each with its `path`: the forwarder's (with
flow counts), or a kernel balancing table's (Maglev, weights: never queued).

Kernel mode: `kernel_status()` is pure: from the snapshot the last successful
sync put in the kernel, each Service port with its addresses (ClusterIPs,
external and LoadBalancer IPs, the NodePort), its traffic policies, and its
endpoints: how many, how many serving, which are on this node. Kernel mode's
rules keep no per-Service packet counters (the per-packet path is one map
lookup), so the counters shown are the daemon's own.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

from ..lb.policy import PortTable
from ..model import Snapshot
from ..nat.tables import FORWARDER, KERNEL_TABLE

if TYPE_CHECKING:
    from .userspace import UserspaceMode


def body(mode: UserspaceMode | None) -> dict:
    """The /status document; kernel mode has no per-Service balancing to show."""
    if mode is None:
        return {"mode": "kernel", "services": []}
    snapshot = mode.forwarder.snapshot()
    return {
        "mode": "userspace",
        "queues": list(mode.forwarder.queues),
        "queue_mechanism": "nft" if mode.queue.in_nft else "iptables",
        "default_algorithm": mode.algorithm,
        "packets_queued": snapshot["packets"],
        "packets_per_queue": snapshot["per_queue"],
        "undecided": snapshot["undecided"],
        "queue_fanout": mode.queue.fanout,
        "forwarder_cpu_seconds": snapshot.get("cpu_seconds"),
        "forwarder_cpu_user_seconds": snapshot.get("cpu_user_seconds"),
        "fail_open": mode.fail_open.value,
        "services": sorted([{**port, "path": FORWARDER} for port in snapshot["services"]]
                           + [_table_port(port) for ports in mode.tabled.values() for port in ports],
                           key=lambda port: port["service"]),
    }


def _table_port(port: PortTable) -> dict:
    """A Service port the kernel balances by its table (Maglev, weights): the forwarder never sees
    its flows, so it has no flow counts, only its endpoints and their weights (slot shares)."""
    return {"service": port.name, "path": KERNEL_TABLE, "algorithm": port.algorithm,
            "affinity_timeout": port.affinity_timeout, "affinity_entries": None, "maglev_table": None,
            "endpoints": [{"endpoint": t.name, "id": t.id, "weight": t.weight, "active": None, "decided": None}
                          for t in port.targets]}


def format_status(body: dict, out: Callable[[str], None] = print) -> None:
    """`dataplane status` as text: per Service port, its algorithm and endpoints with their flows."""
    per_queue = body.get("packets_per_queue") or {}
    per_queue = f" ({', '.join(f'queue {q}: {n}' for q, n in sorted(per_queue.items()))})" if len(per_queue) > 1 else ""
    out(f"mode {body.get('mode')}: queues {body.get('queues')} via {body.get('queue_mechanism')}, "
        f"default algorithm {body.get('default_algorithm')}; packets queued {body.get('packets_queued')}{per_queue}, "
        f"undecided {body.get('undecided')}, fail-open {body.get('fail_open')}")
    for service in body.get("services", []):
        affinity = service.get("affinity_timeout")
        extra = f", ClientIP affinity {affinity} s ({service['affinity_entries']} entries)" if affinity else ""
        tabled = service.get("path") == KERNEL_TABLE
        out(f"{service['service']}  {service['algorithm']}{extra}{'  (kernel table)' if tabled else ''}")
        for endpoint in service["endpoints"]:
            if tabled:  # the kernel decides: no flow counts
                out(f"    {endpoint['endpoint']:<24} weight {endpoint['weight']}")
                continue
            out(f"    {endpoint['endpoint']:<24} weight {endpoint['weight']:<4} active {endpoint['active']:<6} "
                f"decided {endpoint['decided']}")


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
