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
Services here, against about 1.3 s shared, as measured by `nft -f`). See nat/README.md.
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

FIREWALL_CHECK = "firewall-check"

# Maps and sets
SERVICE_IPS = "service-ips"  # daddr . proto . port : verdict
SERVICE_NODEPORTS = "service-nodeports"  # proto . port : verdict
NO_ENDPOINT_SERVICES = "no-endpoint-services"  # daddr . proto . port : reject or drop
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"  # proto . port : reject or drop
NODEPORT_IPS = "nodeport-ips"  # this node's NodePort addresses
CLUSTER_IPS = "cluster-ips"  # every live ClusterIP: other ports on it are refused
CLUSTER_IP_PORTS = "cluster-ip-ports"  # ClusterIP . proto . port of every Service port
HAIRPIN = "hairpin"  # endpoint . endpoint: a Pod reaching itself through a Service
FIREWALL_IPS = "firewall-ips"  # LoadBalancer daddr . proto . port with loadBalancerSourceRanges
FIREWALL_ALLOW = "firewall-allow"  # ... . saddr range: the sources allowed in
FIREWALL_LOCAL = "firewall-local"  # ... whose ranges hold a node address: the node itself may connect

L4_PROTOCOLS = "{ tcp, udp, sctp }"


def cluster_chain(n: int) -> str:
    return f"cluster-{n}"


def external_chain(n: int) -> str:
    return f"external-{n}"


def nodeport_chain(n: int) -> str:
    return f"nodeport-{n}"


def local_chain(m: int, n: int) -> str:
    """External traffic to an externalTrafficPolicy: Local Service with m local of n endpoints."""
    return f"local-{m}-of-{n}"


def nodeport_local_chain(m: int, n: int) -> str:
    return f"nodeport-local-{m}-of-{n}"


def nodeport_direct_chain(n: int) -> str:
    """NodePort to every endpoint, unmasqueraded: Pods short-circuited past a Local policy."""
    return f"nodeport-direct-{n}"


def local_pick_chain(m: int) -> str:
    return f"local-pick-{m}"


def nodeport_local_pick_chain(m: int) -> str:
    return f"nodeport-local-pick-{m}"


def endpoints_map(n: int) -> str:
    return f"endpoints-{n}"


def nodeport_endpoints_map(n: int) -> str:
    return f"nodeport-endpoints-{n}"


def local_endpoints_map(m: int) -> str:
    """This node's endpoints, keyed apart: with m == n, `endpoints-n` holds other ones."""
    return f"local-endpoints-{m}"


def nodeport_local_endpoints_map(m: int) -> str:
    return f"nodeport-local-endpoints-{m}"


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
        Container(CLUSTER_IPS, f"type {addr}", kind="set"),
        Container(CLUSTER_IP_PORTS, f"type {addr} . inet_proto . inet_service", kind="set"),
        Container(HAIRPIN, f"type {addr} . {addr}", kind="set"),
        Container(FIREWALL_IPS, f"type {addr} . inet_proto . inet_service", kind="set"),
        Container(FIREWALL_ALLOW, f"type {addr} . inet_proto . inet_service . {addr} ; flags interval", kind="set"),
        Container(FIREWALL_LOCAL, f"type {addr} . inet_proto . inet_service", kind="set"),
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
                # A port no Service defines on a live ClusterIP: refused, as if nothing listened.
                # (Not a lookup in @service-ips: a verdict map looked up here would make the
                # kernel validate its nat targets against this filter chain, and refuse them.)
                f"{nft} daddr @{CLUSTER_IPS} {nft} daddr . meta l4proto . th dport != @{CLUSTER_IP_PORTS} goto {REJECT}",
                *_unallocated(settings, family),
            ),
        ),
        Chain(
            FIREWALL_CHECK,
            (
                f"{nft} daddr . meta l4proto . th dport . {nft} saddr @{FIREWALL_ALLOW} return",
                f"fib saddr type local {nft} daddr . meta l4proto . th dport @{FIREWALL_LOCAL} return",
                f"{nft} daddr . meta l4proto . th dport @{FIREWALL_IPS} drop",
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
        Chain("filter-prerouting", _filter_jumps(), "type filter hook prerouting priority -110"),
        Chain("filter-output", _filter_jumps(), "type filter hook output priority -110"),
        Chain("nat-prerouting", (f"jump {SERVICES}",), "type nat hook prerouting priority -100"),
        Chain("nat-output", (f"jump {SERVICES}",), "type nat hook output priority -100"),
        Chain("nat-postrouting", (f"jump {MASQUERADING}",), "type nat hook postrouting priority 100"),
    ]


def _filter_jumps() -> tuple[str, ...]:
    # Source ranges first: a LoadBalancer's firewall holds whether or not it has endpoints.
    return (f"ct state new jump {FIREWALL_CHECK}", f"ct state new jump {ENDPOINTS_CHECK}")


def _unallocated(settings: NodeSettings, family: Family) -> tuple[str, ...]:
    cidrs = [c for c in settings.service_cidrs if family.holds(c)]
    if not cidrs:
        return ()
    nft = family.nft
    return (f"{nft} daddr {{ {', '.join(cidrs)} }} {nft} daddr != @{CLUSTER_IPS} drop",)


def masquerade_cluster_rules(settings: NodeSettings, family: Family) -> tuple[str, ...]:
    """ClusterIP traffic is masqueraded when it comes from outside the Pod CIDRs (or always)."""
    if settings.masquerade_all:
        return (f"jump {MARK_FOR_MASQUERADE}",)
    pods = pod_sources(settings, family)
    if pods:
        # Traffic from outside the cluster would answer off-node without this.
        return (f"{pods.replace(' saddr ', ' saddr != ', 1)} jump {MARK_FOR_MASQUERADE}",)
    return ()


def pod_sources(settings: NodeSettings, family: Family) -> str | None:
    """The match for traffic from Pods (the cluster CIDRs), or None when they are unknown."""
    cidrs = [c for c in settings.cluster_cidrs if family.holds(c)]
    return f"{family.nft} saddr {{ {', '.join(cidrs)} }}" if cidrs else None


def declare(name: str, settings: NodeSettings, family: Family) -> list[Declaration]:
    """The declarations behind a name a Service needs: 'cluster-3', 'local-1-of-3', ...

    A map and the rules that read it are always declared together, in one
    group: nft 1.0.6 cannot add a rule that reads an existing `typeof` map
    keyed on `th dport` (it misreads the map back from the kernel), so no
    transaction may do that.
    """
    parts = name.split("-")
    if parts[0] in ("local", "nodeport") and parts[-2] == "of":
        m, n = int(parts[-3]), int(parts[-1])
        return [_local_chain(m, n, settings, family, nodeport=parts[0] == "nodeport")]
    if name in local_pick_names(int(parts[-1])):
        return _local_pick_declarations(int(parts[-1]), family)
    return _pick_declarations(int(parts[-1]), settings, family)


def _slot_map_spec(family: Family, by_address: bool) -> str:
    # typeof, not type: the slot is numgen's plain 32-bit integer, which has no type name.
    key = f"meta l4proto . th dport . numgen random mod 1 : {family.nft} daddr . th dport"
    return f"typeof {family.nft} daddr . {key}" if by_address else f"typeof {key}"


def _dnat(family: Family, key: str, n: int, map_name: str) -> str:
    # The slot is `numgen random mod n`: uniform over the n endpoints in the map.
    return f"meta l4proto {L4_PROTOCOLS} dnat {family.nft} to {key} . numgen random mod {n} map @{map_name}"


def _keys(family: Family) -> tuple[str, str]:
    """The lookup keys: by Service address, and by NodePort."""
    return f"{family.nft} daddr . meta l4proto . th dport", "meta l4proto . th dport"


def _pick_declarations(n: int, settings: NodeSettings, family: Family) -> list[Declaration]:
    """Chains and maps shared by every Service port with n endpoints."""
    address_key, nodeport_key = _keys(family)
    masquerade_cluster = masquerade_cluster_rules(settings, family)
    return [
        Container(endpoints_map(n), _slot_map_spec(family, by_address=True)),
        Container(nodeport_endpoints_map(n), _slot_map_spec(family, by_address=False)),
        Chain(cluster_chain(n), masquerade_cluster + (_dnat(family, address_key, n, endpoints_map(n)),)),
        Chain(external_chain(n), (f"jump {MARK_FOR_MASQUERADE}", _dnat(family, address_key, n, endpoints_map(n)))),
        Chain(
            nodeport_chain(n),
            (f"jump {MARK_FOR_MASQUERADE}", _dnat(family, nodeport_key, n, nodeport_endpoints_map(n))),
        ),
        Chain(nodeport_direct_chain(n), (_dnat(family, nodeport_key, n, nodeport_endpoints_map(n)),)),
    ]


def _local_pick_declarations(m: int, family: Family) -> list[Declaration]:
    """This node's m endpoints of externalTrafficPolicy: Local Services: maps and their dnat."""
    address_key, nodeport_key = _keys(family)
    return [
        Container(local_endpoints_map(m), _slot_map_spec(family, by_address=True)),
        Container(nodeport_local_endpoints_map(m), _slot_map_spec(family, by_address=False)),
        Chain(local_pick_chain(m), (_dnat(family, address_key, m, local_endpoints_map(m)),)),
        Chain(nodeport_local_pick_chain(m), (_dnat(family, nodeport_key, m, nodeport_local_endpoints_map(m)),)),
    ]


def _local_chain(m: int, n: int, settings: NodeSettings, family: Family, nodeport: bool) -> Chain:
    """externalTrafficPolicy: Local, for external traffic with m local endpoints of n.

    Pods are short-circuited to every endpoint, unmasqueraded; the node
    itself reaches every endpoint, masqueraded; anyone else reaches only
    this node's endpoints and keeps its source address, or is dropped.
    """
    rules = []
    pods = pod_sources(settings, family)
    if pods:
        # cluster-N masquerades only sources outside the Pod CIDRs: these are inside.
        rules.append(f"{pods} goto {nodeport_direct_chain(n) if nodeport else cluster_chain(n)}")
    rules.append(f"fib saddr type local goto {nodeport_chain(n) if nodeport else external_chain(n)}")
    if m:
        rules.append(f"goto {nodeport_local_pick_chain(m) if nodeport else local_pick_chain(m)}")
    else:
        rules.append("drop")
    return Chain(nodeport_local_chain(m, n) if nodeport else local_chain(m, n), tuple(rules))


def pick_names(n: int) -> frozenset[str]:
    return frozenset((endpoints_map(n), nodeport_endpoints_map(n), cluster_chain(n), external_chain(n),
                      nodeport_chain(n), nodeport_direct_chain(n)))


def local_pick_names(m: int) -> frozenset[str]:
    return frozenset((local_endpoints_map(m), nodeport_local_endpoints_map(m), local_pick_chain(m),
                      nodeport_local_pick_chain(m)))
