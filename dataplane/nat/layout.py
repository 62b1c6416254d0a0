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

import ipaddress
import sys
from dataclasses import dataclass

from ..config import NodeSettings
from ..marks import ID_MASK
from .expr import (
    CT_STATE, CT_STATUS, DPORT, FIB_SADDR_TYPE, L4PROTO, MARK, SPORT, AnonSet, BinOp, Expr, Interval, Jhash, Lookup,
    Masquerade, Match, Nat, Reject, Rule, Selector, SetMeta, SetRef, Verdict, Vmap, daddr, numgen, saddr,
)
from .ruleset import BaseChain, Chain, Container, Declaration

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

# Balancing tables (nat/tables.py): a Service address -> its table's id, carried in the mark
TABLE_IDS = "table-ids"  # daddr . proto . port : table id (as a mark)
NODEPORT_TABLE_IDS = "nodeport-table-ids"  # proto . port : table id
LOCAL_TABLE_IDS = "local-table-ids"  # externalTrafficPolicy: Local, external sources: the local table's id
NODEPORT_LOCAL_TABLE_IDS = "nodeport-local-table-ids"

L4_PROTOCOLS = Match((L4PROTO,), "", AnonSet(((6,), (17,), (132,))))  # meta l4proto { tcp, udp, sctp }


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
    return sys.intern(f"endpoints-{n}")  # the container of many elements: one string for all


def nodeport_endpoints_map(n: int) -> str:
    return sys.intern(f"nodeport-endpoints-{n}")


def local_endpoints_map(m: int) -> str:
    """This node's endpoints, keyed apart: with m == n, `endpoints-n` holds other ones."""
    return sys.intern(f"local-endpoints-{m}")


def nodeport_local_endpoints_map(m: int) -> str:
    return sys.intern(f"nodeport-local-endpoints-{m}")


def slots_map(m: int) -> str:
    """Every balancing table of m slots: table id . slot : endpoint."""
    return sys.intern(f"slots-{m}")


def hash_chain(kind: str, m: int) -> str:
    """hash-cluster-M, hash-external-M, hash-nodeport-M, hash-nodeport-direct-M, hash-local-M,
    hash-nodeport-local-M, hash-pick-M: the pick chains of Service ports with an m-slot table."""
    return f"hash-{kind}-{m}"


class Family:
    """Address-family specifics: nft family name, address type, selectors and reject."""

    def __init__(self, version: int):
        self.version = version
        self.nft = "ip" if version == 4 else "ip6"
        self.addr_type = "ipv4_addr" if version == 4 else "ipv6_addr"
        self.saddr: Selector = saddr(self.nft)
        self.daddr: Selector = daddr(self.nft)
        self.reject = Reject() if version == 4 else Reject("icmpv6 type port-unreachable")

    def holds(self, ip: str) -> bool:
        return (":" in ip) == (self.version == 6)

    def address_key(self) -> Expr:
        """The lookup key of a Service address: daddr . l4proto . dport."""
        return (self.daddr, L4PROTO, DPORT)


NODEPORT_KEY: Expr = (L4PROTO, DPORT)


def goto(chain: str) -> Verdict:
    return Verdict("goto", chain)


def jump(chain: str) -> Verdict:
    return Verdict("jump", chain)


def is_(selector: Selector, flag: str) -> Match:
    """`ct state new`, `fib saddr type local`: a flag-typed selector holds `flag`."""
    return Match((selector,), "", (frozenset({flag}),))


def in_set(expr: Expr, name: str, negate: bool = False) -> Match:
    return Match(expr, "!=" if negate else "", SetRef(name))


def in_cidrs(selector: Selector, cidrs: list[str], negate: bool = False) -> Match:
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    keys = tuple((_interval(n),) for n in networks)
    return Match((selector,), "!=" if negate else "", AnonSet(keys))


def _interval(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Interval:
    return Interval(network.network_address, network.broadcast_address)


def mark_bit(bit: int) -> BinOp:
    return BinOp(MARK, "&", bit)


def skeleton(settings: NodeSettings, family: Family) -> list[Declaration]:
    """Declarations present whatever Services exist."""
    addr = family.addr_type
    bit = settings.masquerade_bit
    service_key = ("inet_proto", "inet_service")
    address_key = (addr, *service_key)
    key = family.address_key()
    return [
        Container(SERVICE_IPS, address_key, ("verdict",)),
        Container(SERVICE_NODEPORTS, service_key, ("verdict",)),
        Container(NO_ENDPOINT_SERVICES, address_key, ("verdict",)),
        Container(NO_ENDPOINT_NODEPORTS, service_key, ("verdict",)),
        Container(NODEPORT_IPS, (addr,), kind="set"),
        Container(CLUSTER_IPS, (addr,), kind="set"),
        Container(CLUSTER_IP_PORTS, address_key, kind="set"),
        Container(HAIRPIN, (addr, addr), kind="set"),
        Container(FIREWALL_IPS, address_key, kind="set"),
        Container(FIREWALL_ALLOW, (*address_key, addr), kind="set", flags=("interval",)),
        Container(FIREWALL_LOCAL, address_key, kind="set"),
        Chain(REJECT, (Rule.of(family.reject),)),
        Chain(MARK_FOR_MASQUERADE, (Rule.of(SetMeta(MARK, BinOp(MARK, "|", bit))),)),
        Chain(
            SERVICES,
            (
                Rule.of(Vmap(key, SetRef(SERVICE_IPS))),
                Rule.of(in_set((family.daddr,), NODEPORT_IPS), Vmap(NODEPORT_KEY, SetRef(SERVICE_NODEPORTS))),
            ),
        ),
        Chain(
            ENDPOINTS_CHECK,
            (
                Rule.of(Vmap(key, SetRef(NO_ENDPOINT_SERVICES))),
                Rule.of(in_set((family.daddr,), NODEPORT_IPS), Vmap(NODEPORT_KEY, SetRef(NO_ENDPOINT_NODEPORTS))),
                # A port no Service defines on a live ClusterIP: refused, as if nothing listened.
                # (Not a lookup in @service-ips: a verdict map looked up here would make the
                # kernel validate its nat targets against this filter chain, and refuse them.)
                Rule.of(in_set((family.daddr,), CLUSTER_IPS), in_set(key, CLUSTER_IP_PORTS, negate=True), goto(REJECT)),
                *_unallocated(settings, family),
            ),
        ),
        Chain(
            FIREWALL_CHECK,
            (
                Rule.of(in_set((*key, family.saddr), FIREWALL_ALLOW), Verdict("return")),
                Rule.of(is_(FIB_SADDR_TYPE, "local"), in_set(key, FIREWALL_LOCAL), Verdict("return")),
                Rule.of(in_set(key, FIREWALL_IPS), Verdict("drop")),
            ),
        ),
        Chain(
            MASQUERADING,
            (
                Rule.of(is_(CT_STATUS, "dnat"), in_set((family.saddr, family.daddr), HAIRPIN),
                        Masquerade(("fully-random",))),
                Rule.of(Match((mark_bit(bit),), "==", (0,)), Verdict("return")),
                Rule.of(SetMeta(MARK, BinOp(MARK, "^", bit))),
                Rule.of(Masquerade(("fully-random",))),
            ),
        ),
        # Rejects run before DNAT (dstnat - 10) so a Service without endpoints
        # is refused at once rather than routed on as is. Priorities are numbers
        # because nft 1.0 accepts the name "dstnat" in prerouting only.
        Chain("filter-prerouting", _filter_jumps(), BaseChain("filter", "prerouting", -110)),
        Chain("filter-output", _filter_jumps(), BaseChain("filter", "output", -110)),
        Chain("nat-prerouting", (Rule.of(jump(SERVICES)),), BaseChain("nat", "prerouting", -100)),
        Chain("nat-output", (Rule.of(jump(SERVICES)),), BaseChain("nat", "output", -100)),
        Chain("nat-postrouting", (Rule.of(jump(MASQUERADING)),), BaseChain("nat", "postrouting", 100)),
    ]


def _filter_jumps() -> tuple[Rule, ...]:
    # Source ranges first: a LoadBalancer's firewall holds whether or not it has endpoints.
    return (Rule.of(is_(CT_STATE, "new"), jump(FIREWALL_CHECK)), Rule.of(is_(CT_STATE, "new"), jump(ENDPOINTS_CHECK)))


def _unallocated(settings: NodeSettings, family: Family) -> tuple[Rule, ...]:
    cidrs = [c for c in settings.service_cidrs if family.holds(c)]
    if not cidrs:
        return ()
    return (Rule.of(in_cidrs(family.daddr, cidrs), in_set((family.daddr,), CLUSTER_IPS, negate=True),
                    Verdict("drop")),)


def masquerade_cluster_rules(settings: NodeSettings, family: Family) -> tuple[Rule, ...]:
    """ClusterIP traffic is masqueraded when it comes from outside the Pod CIDRs (or always)."""
    if settings.masquerade_all:
        return (Rule.of(jump(MARK_FOR_MASQUERADE)),)
    cidrs = pod_cidrs(settings, family)
    if cidrs:
        # Traffic from outside the cluster would answer off-node without this.
        return (Rule.of(in_cidrs(family.saddr, cidrs, negate=True), jump(MARK_FOR_MASQUERADE)),)
    return ()


def pod_cidrs(settings: NodeSettings, family: Family) -> list[str]:
    return [c for c in settings.cluster_cidrs if family.holds(c)]


def pod_sources(settings: NodeSettings, family: Family) -> Match | None:
    """The match for traffic from Pods (the cluster CIDRs), or None when they are unknown."""
    cidrs = pod_cidrs(settings, family)
    return in_cidrs(family.saddr, cidrs) if cidrs else None


@dataclass(frozen=True, slots=True)
class Pick:
    """The chains and maps shared by every Service port with n endpoints."""

    n: int


@dataclass(frozen=True, slots=True)
class LocalPick:
    """The maps and dnat of m local endpoints (externalTrafficPolicy: Local)."""

    m: int


@dataclass(frozen=True, slots=True)
class LocalChain:
    """External traffic to an externalTrafficPolicy: Local Service with m local of n endpoints."""

    m: int
    n: int
    nodeport: bool


@dataclass(frozen=True, slots=True)
class TableIds:
    """The maps from a Service address to its balancing table's id (every table-balanced Service)."""


@dataclass(frozen=True, slots=True)
class HashPick:
    """The chains and slot map of every balancing table of m slots."""

    m: int


Need = Pick | LocalPick | LocalChain | TableIds | HashPick  # dataclasses, not tuples: Pick(1), LocalPick(1) differ


def declare(need: Need, settings: NodeSettings, family: Family) -> list[Declaration]:
    """The declarations behind a need of a Service.

    A map and the rules that read it are always declared together, in one
    group: nft 1.0.6 cannot add a rule that reads an existing `typeof` map
    keyed on `th dport` (it misreads the map back from the kernel), so no
    transaction may do that.
    """
    if isinstance(need, LocalChain):
        return [_local_chain(need.m, need.n, settings, family, need.nodeport)]
    if isinstance(need, LocalPick):
        return _local_pick_declarations(need.m, family)
    if isinstance(need, TableIds):
        return _table_id_maps(family)
    if isinstance(need, HashPick):
        return _hash_declarations(need.m, settings, family)
    return _pick_declarations(need.n, settings, family)


def _slot_map(name: str, family: Family, by_address: bool) -> Container:
    # typeof, not type: the slot is numgen's plain 32-bit integer, which has no type name.
    key = (*(family.address_key() if by_address else NODEPORT_KEY), numgen(1))
    return Container(name, key, (family.daddr, DPORT), typeof=True)


def holds_endpoints(declaration: Declaration) -> bool:
    """A map of endpoints by Service address and slot (not the NodePort copy): one entry per endpoint
    of each Service address, which is what the programmed-endpoints figure counts."""
    return (isinstance(declaration, Container) and declaration.typeof and bool(declaration.key)
            and declaration.key[0] == declaration.value[0] and any(part.modulus for part in declaration.key))


def _dnat(family: Family, key: Expr, n: int, map_name: str) -> Rule:
    # The slot is `numgen random mod n`: uniform over the n endpoints in the map.
    return Rule.of(L4_PROTOCOLS, Nat("dnat", family.nft, expr=(*key, numgen(n)), map=map_name))


def _pick_declarations(n: int, settings: NodeSettings, family: Family) -> list[Declaration]:
    """Chains and maps shared by every Service port with n endpoints."""
    address_key = family.address_key()
    masquerade_cluster = masquerade_cluster_rules(settings, family)
    mark = Rule.of(jump(MARK_FOR_MASQUERADE))
    return [
        _slot_map(endpoints_map(n), family, by_address=True),
        _slot_map(nodeport_endpoints_map(n), family, by_address=False),
        Chain(cluster_chain(n), masquerade_cluster + (_dnat(family, address_key, n, endpoints_map(n)),)),
        Chain(external_chain(n), (mark, _dnat(family, address_key, n, endpoints_map(n)))),
        Chain(nodeport_chain(n), (mark, _dnat(family, NODEPORT_KEY, n, nodeport_endpoints_map(n)))),
        Chain(nodeport_direct_chain(n), (_dnat(family, NODEPORT_KEY, n, nodeport_endpoints_map(n)),)),
    ]


def _local_pick_declarations(m: int, family: Family) -> list[Declaration]:
    """This node's m endpoints of externalTrafficPolicy: Local Services: maps and their dnat."""
    return [
        _slot_map(local_endpoints_map(m), family, by_address=True),
        _slot_map(nodeport_local_endpoints_map(m), family, by_address=False),
        Chain(local_pick_chain(m), (_dnat(family, family.address_key(), m, local_endpoints_map(m)),)),
        Chain(nodeport_local_pick_chain(m), (_dnat(family, NODEPORT_KEY, m, nodeport_local_endpoints_map(m)),)),
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
        rules.append(Rule.of(pods, goto(nodeport_direct_chain(n) if nodeport else cluster_chain(n))))
    rules.append(Rule.of(is_(FIB_SADDR_TYPE, "local"), goto(nodeport_chain(n) if nodeport else external_chain(n))))
    if m:
        rules.append(Rule.of(goto(nodeport_local_pick_chain(m) if nodeport else local_pick_chain(m))))
    else:
        rules.append(Rule.of(Verdict("drop")))
    return Chain(nodeport_local_chain(m, n) if nodeport else local_chain(m, n), tuple(rules))


def _table_id_maps(family: Family) -> list[Declaration]:
    # type, not typeof: the hash chains of a table size added later read them.
    address_key = (family.addr_type, "inet_proto", "inet_service")
    return [
        Container(TABLE_IDS, address_key, ("mark",)),
        Container(NODEPORT_TABLE_IDS, ("inet_proto", "inet_service"), ("mark",)),
        Container(LOCAL_TABLE_IDS, address_key, ("mark",)),
        Container(NODEPORT_LOCAL_TABLE_IDS, ("inet_proto", "inet_service"), ("mark",)),
    ]


def table_id(key: Expr, map_name: str) -> SetMeta:
    """`meta mark set KEY map @ids`: the table id rides in the mark to the dnat (a miss ends the rule)."""
    return SetMeta(MARK, Lookup(key, map_name))


def flow_slot(family: Family, m: int, seed: int) -> Jhash:
    """The flow's slot: its source address and port, hashed. Not the destination: a NodePort's
    (this node's address) differs between nodes, and every node must send a flow alike."""
    return Jhash((family.saddr, SPORT), m, seed)


def _hash_declarations(m: int, settings: NodeSettings, family: Family) -> list[Declaration]:
    """The slot map of m-slot tables, declared with the chains that read it (see `declare`)."""
    address_key = family.address_key()
    slot = flow_slot(family, m, settings.hash_seed)
    dnat = Rule.of(L4_PROTOCOLS, Nat("dnat", family.nft, expr=(BinOp(MARK, "&", ID_MASK), slot), map=slots_map(m)))
    set_id = Rule.of(table_id(address_key, TABLE_IDS))
    set_nodeport_id = Rule.of(table_id(NODEPORT_KEY, NODEPORT_TABLE_IDS))
    mark = Rule.of(jump(MARK_FOR_MASQUERADE))
    pods = pod_sources(settings, family)
    local_node = is_(FIB_SADDR_TYPE, "local")

    def local(nodeport: bool) -> Chain:
        direct, via_node = ("nodeport-direct", "nodeport") if nodeport else ("cluster", "external")
        ids, key = (NODEPORT_LOCAL_TABLE_IDS, NODEPORT_KEY) if nodeport else (LOCAL_TABLE_IDS, address_key)
        rules = [Rule.of(pods, goto(hash_chain(direct, m)))] if pods else []
        rules += [Rule.of(local_node, goto(hash_chain(via_node, m))),
                  # No local endpoint: no local table id, the lookup misses and the packet is dropped.
                  Rule.of(table_id(key, ids), goto(hash_chain("pick", m))),
                  Rule.of(Verdict("drop"))]
        return Chain(hash_chain("nodeport-local" if nodeport else "local", m), tuple(rules))

    # typeof numgen, not jhash: the same 32-bit integer, and nft 1.0.6 segfaults listing a map
    # declared `typeof ... jhash ...` (README, "Balancing tables").
    slots = Container(slots_map(m), (MARK, numgen(1)), (family.daddr, DPORT), typeof=True)
    return [
        slots,
        Chain(hash_chain("pick", m), (dnat,)),
        Chain(hash_chain("cluster", m), (set_id, *masquerade_cluster_rules(settings, family), dnat)),
        Chain(hash_chain("external", m), (set_id, mark, dnat)),
        Chain(hash_chain("nodeport", m), (set_nodeport_id, mark, dnat)),
        Chain(hash_chain("nodeport-direct", m), (set_nodeport_id, dnat)),
        local(nodeport=False),
        local(nodeport=True),
    ]
