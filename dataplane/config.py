"""Node settings: what this node is and how it should proxy, from the command line."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_MASQUERADE_BIT = 0x4000  # the same bit kube-proxy marks, so other tooling reads it alike
DEFAULT_HASH_SEED = 0x64706C62  # balancing tables: one seed on every node, so every node hashes a flow alike
DEFAULT_TABLE_SLOTS = 1 << 20  # balancing tables: slots per address family, at most (a slot: 70 B kernel, 350 B daemon)


@dataclass(frozen=True, slots=True)
class NodeSettings:
    node_name: str = ""
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    # NodePort addresses: () = every non-loopback address; CIDRs narrow it; "primary" = the main one.
    nodeport_cidrs: tuple[str, ...] = ()
    nodeport_primary_only: bool = False
    masquerade_bit: int = DEFAULT_MASQUERADE_BIT
    service_cidrs: tuple[str, ...] = ()  # unallocated addresses in them are dropped
    node_zone: str = ""  # topology.kubernetes.io/zone of this node, for zone hints
    lb_algorithm: str = "random"  # Services without dataplane.io/lb-algorithm (maglev: a kernel table, nat/tables.py)
    hash_seed: int = DEFAULT_HASH_SEED
    table_slots: int = DEFAULT_TABLE_SLOTS


def parse_cidrs(text: str, flag: str) -> tuple[str, ...]:
    """'10.0.0.0/8, fd00::/64' -> canonical CIDRs; raises ValueError naming the flag."""
    cidrs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            cidrs.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(f"{flag}: {part!r} is not a CIDR") from None
    return tuple(cidrs)


def select_nodeport_ips(settings: NodeSettings, addresses: list[str], primary: str | None) -> tuple[str, ...]:
    """The node addresses NodePorts answer on; never loopback or link-local."""
    usable = []
    for text in addresses:
        ip = ipaddress.ip_address(text)
        if ip.is_loopback or ip.is_link_local or ip.is_multicast:
            continue
        usable.append(ip)
    if settings.nodeport_primary_only:
        usable = [ip for ip in usable if str(ip) == primary]
    if settings.nodeport_cidrs:
        networks = [ipaddress.ip_network(c) for c in settings.nodeport_cidrs]
        usable = [ip for ip in usable if any(ip.version == n.version and ip in n for n in networks)]
    return tuple(sorted({str(ip) for ip in usable}, key=lambda s: ipaddress.ip_address(s).packed))
