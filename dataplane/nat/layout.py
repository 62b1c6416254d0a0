"""The fixed skeleton of the dataplane table: every name, chain and map.

The per-packet path never depends on how many Services exist:

  dst-NAT hooks  -> services: one vmap lookup on (daddr, proto, dport)
                    [+ one on (proto, dport) for node addresses]
                 -> cluster-N / external-N / nodeport-N  (N = endpoint count)
                 -> one dnat via a map keyed on (daddr, proto, dport, numgen mod N)
  filter hooks   -> endpoints-check: vmap of Services with no endpoint -> reject
  src-NAT hook   -> masquerading: marked packets and hairpin pairs

Endpoint maps are shared by every Service with the same endpoint count,
instead of one chain and map per Service: the kernel binds each rule to its
map, and binding thousands of per-Service maps is quadratic (12 s for 10,000
Services here, against under a second shared). See nat/README.md.
"""

from __future__ import annotations

from ..config import NodeSettings
from .ruleset import Chain, Container, Declaration

TABLE = "dataplane"

# Chains
SERVICES = "services"
ENDPOINTS_CHECK = "endpoints-check"
REJECT = "reject-packet"
MARK_FOR_MASQUERADE = "mark-for-masquerade"
MASQUERADING = "masquerading"

# Maps and sets
SERVICE_IPS = "service-ips"  # daddr . proto . port : verdict
SERVICE_NODEPORTS = "service-nodeports"  # proto . port : verdict
NO_ENDPOINT_SERVICES = "no-endpoint-services"  # daddr . proto . port : verdict
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"  # proto . port : verdict
NODEPORT_IPS = "nodeport-ips"  # this node's NodePort addresses
HAIRPIN = "hairpin"  # endpoint . endpoint: a Pod reaching itself through a Service

L4_PROTOCOLS = "{ tcp, udp, sctp }"


def cluster_chain(n: int) -> str:
    return f"cluster-{n}"


def external_chain(n: int) -> str:
    return f"external-{n}"


def nodeport_chain(n: int) -> str:
    return f"nodeport-{n}"


def endpoints_map(n: int) -> str:
    return f"endpoints-{n}"


def nodeport_endpoints_map(n: int) -> str:
    return f"nodeport-endpoints-{n}"


class Family:
    """Address-family specifics: nft family name, address type and match prefix."""

    def __init__(self, version: int):
        self.version = version
        self.nft = "ip" if version == 4 else "ip6"
        self.addr_type = "ipv4_addr" if version == 4 else "ipv6_addr"
        self.reject = "reject" if version == 4 else "reject with icmpv6 type port-unreachable"

    def holds(self, ip: str) -> bool:
        return (":" in ip) == (self.version == 6)


def skeleton(settings: NodeSettings, family: Family) -> list[Declaration]:
    """Declarations present whatever Services exist."""
    nft, addr = family.nft, family.addr_type
    masquerade_bit = f"0x{settings.masquerade_bit:x}"
    return [
        Container(SERVICE_IPS, f"type {addr} . inet_proto . inet_service : verdict"),
        Container(SERVICE_NODEPORTS, "type inet_proto . inet_service : verdict"),
        Container(NO_ENDPOINT_SERVICES, f"type {addr} . inet_proto . inet_service : verdict"),
        Container(NO_ENDPOINT_NODEPORTS, "type inet_proto . inet_service : verdict"),
        Container(NODEPORT_IPS, f"type {addr}", kind="set"),
        Container(HAIRPIN, f"type {addr} . {addr}", kind="set"),
        Chain(REJECT, (family.reject,)),
        Chain(MARK_FOR_MASQUERADE, (f"meta mark set meta mark | {masquerade_bit}",)),
        Chain(
            SERVICES,
            (
                f"{nft} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
                f"{nft} daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}",
            ),
        ),
        Chain(
            ENDPOINTS_CHECK,
            (
                f"{nft} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}",
                f"{nft} daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}",
            ),
        ),
        Chain(
            MASQUERADING,
            (
                f"ct status dnat {nft} saddr . {nft} daddr @{HAIRPIN} masquerade fully-random",
                f"meta mark & {masquerade_bit} == 0 return",
                f"meta mark set meta mark ^ {masquerade_bit}",
                "masquerade fully-random",
            ),
        ),
        # Rejects run before DNAT (dstnat - 10) so a Service without endpoints
        # is refused at once rather than routed on as is. Priorities are numbers
        # because nft 1.0 accepts the name "dstnat" in prerouting only.
        Chain("filter-prerouting", (f"ct state new jump {ENDPOINTS_CHECK}",), "type filter hook prerouting priority -110"),
        Chain("filter-output", (f"ct state new jump {ENDPOINTS_CHECK}",), "type filter hook output priority -110"),
        Chain("nat-prerouting", (f"jump {SERVICES}",), "type nat hook prerouting priority -100"),
        Chain("nat-output", (f"jump {SERVICES}",), "type nat hook output priority -100"),
        Chain("nat-postrouting", (f"jump {MASQUERADING}",), "type nat hook postrouting priority 100"),
    ]


def pick_declarations(n: int, settings: NodeSettings, family: Family) -> list[Declaration]:
    """Chains and maps shared by every Service port with n endpoints."""
    nft = family.nft
    # typeof, not type: the slot is numgen's plain 32-bit integer, which has no type name.
    slot_key = f"meta l4proto . th dport . numgen random mod 1 : {nft} daddr . th dport"
    pick = f"numgen random mod {n}"
    dnat = f"meta l4proto {L4_PROTOCOLS} dnat {nft} to"
    if settings.masquerade_all:
        masquerade_cluster = (f"jump {MARK_FOR_MASQUERADE}",)
    elif cidrs := [c for c in settings.cluster_cidrs if family.holds(c)]:
        # Traffic from outside the cluster would answer off-node without this.
        masquerade_cluster = (f"{nft} saddr != {{ {', '.join(cidrs)} }} jump {MARK_FOR_MASQUERADE}",)
    else:
        masquerade_cluster = ()
    return [
        Container(endpoints_map(n), f"typeof {nft} daddr . {slot_key}"),
        Container(nodeport_endpoints_map(n), f"typeof {slot_key}"),
        Chain(
            cluster_chain(n),
            masquerade_cluster + (f"{dnat} {nft} daddr . meta l4proto . th dport . {pick} map @{endpoints_map(n)}",),
        ),
        Chain(
            external_chain(n),
            (
                f"jump {MARK_FOR_MASQUERADE}",
                f"{dnat} {nft} daddr . meta l4proto . th dport . {pick} map @{endpoints_map(n)}",
            ),
        ),
        Chain(
            nodeport_chain(n),
            (
                f"jump {MARK_FOR_MASQUERADE}",
                f"{dnat} meta l4proto . th dport . {pick} map @{nodeport_endpoints_map(n)}",
            ),
        ),
    ]


def pick_size(name: str) -> int:
    """The endpoint count a pick declaration serves: 'cluster-3' -> 3."""
    return int(name.rsplit("-", 1)[1])


def pick_names(n: int) -> frozenset[str]:
    return frozenset(
        (endpoints_map(n), nodeport_endpoints_map(n), cluster_chain(n), external_chain(n), nodeport_chain(n))
    )
