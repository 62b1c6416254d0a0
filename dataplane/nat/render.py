"""Snapshot -> Ruleset: a pure function, and a cache that makes it cheap to repeat.

Each Service becomes one Fragment: its entries in the dispatch maps, its
endpoints in the shared endpoint map for its endpoint count, and its rejects
when it has none. The node's NodePort addresses are one more fragment.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
import weakref
from typing import Hashable, Iterable

from ..config import NodeSettings
from ..model import Backend, Selection, Service, ServicePort, ServiceState, Snapshot, TrafficPolicy
from ..lb import tables as lb_tables
from . import layout
from .affinity import AffinityChains
from .ruleset import EMPTY, Declaration, Element, Fragment, Ruleset
from .tables import TableIdAllocator, id_text

log = logging.getLogger(__name__)

NODE = "node"  # the owner of node-level elements (NodePort addresses)


def render(
    snapshot: Snapshot, settings: NodeSettings, node_ips: Iterable[str] = (), family: int = 4
) -> Ruleset:
    """The whole ruleset for one address family; pure, never touches the kernel."""
    return RulesetBuilder(settings, family).build(snapshot, node_ips)


class RulesetBuilder:
    """Renders Rulesets, reusing the fragments of Services that did not change.

    A snapshot names the Services changed since the one before it; when that
    is the snapshot this builder saw last, only those are rendered again.
    """

    def __init__(self, settings: NodeSettings, family: int = 4):
        self.settings = settings
        self.family = layout.Family(family)
        self._declarations = {d.name: d for d in layout.skeleton(settings, self.family)}
        self._always = frozenset(self._declarations)
        self._groups: dict[layout.Need, tuple[str, ...]] = {}  # need -> the names declared for it
        self._last_snapshot: weakref.ref[Snapshot] | None = None
        self._last: Ruleset | None = None
        self._last_node_ips: tuple[str, ...] = ()
        self._table_ids = TableIdAllocator()
        self._slots: dict[Hashable, int] = {}  # owner -> balancing-table slots it holds
        self._slot_total = 0

    def build(self, snapshot: Snapshot, node_ips: Iterable[str] = ()) -> Ruleset:
        last = self._last
        node_ips = tuple(sorted(node_ips))
        seen = self._last_snapshot() if self._last_snapshot is not None else None
        if last is not None and seen is not None and snapshot.follows(seen) and node_ips == self._last_node_ips:
            # The snapshot says what changed since the one we built last.
            fragments = dict(last.fragments)
            candidates = snapshot.changed
        else:
            fragments, candidates = {}, snapshot.services.keys()
            self._slots, self._slot_total = {}, 0
            self._table_ids.retain(snapshot.services.keys())
        changed = set()
        for key in candidates:
            state = snapshot.services.get(key)
            fragment = self._fragment(key, state, node_ips) if state is not None else EMPTY
            if state is None:
                self._table_ids.keep(key, set())
                self._slot_total -= self._slots.pop(key, 0)
            missing = fragment.needs - self._groups.keys()
            if missing:
                # Copy on write: Rulesets already handed out keep their own mappings.
                declarations, groups = dict(self._declarations), dict(self._groups)
                for need in missing:
                    group = layout.declare(need, self.settings, self.family)
                    declarations.update((d.name, d) for d in group)
                    groups[need] = tuple(d.name for d in group)
                self._declarations, self._groups = declarations, groups
            if fragment.elements:
                fragments[key] = fragment
            else:
                fragments.pop(key, None)
            changed.add(key)
        node = node_fragment(node_ips, self.family)
        previous_node = last.fragments.get(NODE) if last is not None else None
        if previous_node == node:
            node = previous_node  # identical object: the planner skips it at once
        else:
            changed.add(NODE)
        fragments[NODE] = node
        incremental = candidates is snapshot.changed
        ruleset = Ruleset(
            self.family.nft, layout.TABLE, self._declarations, self._always, fragments, self._groups,
            previous=weakref.ref(last) if incremental else None,
            changed=frozenset(changed) if incremental else None,
        )
        self._last, self._last_snapshot, self._last_node_ips = ruleset, weakref.ref(snapshot), node_ips
        return ruleset


    def _fragment(self, key: Hashable, state: ServiceState, node_ips: tuple[str, ...]) -> Fragment:
        """The Service's fragment; without balancing tables when they would cross the node's slot bound."""
        held = self._slots.pop(key, 0)
        self._slot_total -= held
        fragment = service_fragment(state, self.settings, self.family, node_ips, self._table_ids, key)
        slots = _slot_count(fragment)
        if slots and self._slot_total + slots > self.settings.table_slots:
            log.error("Service %s/%s: its balancing tables would take %d slots, %d of %d held: kernel's random "
                      "pick instead", state.service.namespace, state.service.name, slots, self._slot_total,
                      self.settings.table_slots)
            fragment = service_fragment(state, self.settings, self.family, node_ips, self._table_ids, key,
                                        tables=False)
            slots = 0
        if slots:
            self._slots[key] = slots
            self._slot_total += slots
        return fragment


def _slot_count(fragment: Fragment) -> int:
    return sum(1 for e in fragment.elements if e.container.startswith("slots-"))


def node_fragment(node_ips: Iterable[str], family: layout.Family) -> Fragment:
    return Fragment(tuple(dict.fromkeys(Element(layout.NODEPORT_IPS, ip) for ip in node_ips if family.holds(ip))))


def service_fragment(
    state: ServiceState, settings: NodeSettings, family: layout.Family, node_ips: tuple[str, ...] = (),
    table_ids: TableIdAllocator | None = None, owner: Hashable = None, tables: bool = True,
) -> Fragment:
    """The elements one Service contributes, for one address family.

    `table_ids` keeps the ids of its balancing tables (Maglev, weights) between calls; without
    one every call numbers them from 1. `tables=False`: the kernel's random pick even so.
    """
    service = state.service
    cluster_ips = [ip for ip in service.cluster_ips if family.holds(ip)] if service.proxied else []
    owner = owner if owner is not None else (service.namespace, service.name)
    ids = table_ids if table_ids is not None else TableIdAllocator()
    if not cluster_ips:
        ids.keep(owner, set())
        return Fragment()
    balanced = tables and lb_tables.table_balanced(service, settings.lb_algorithm)
    out = _FragmentBuilder(f"{service.namespace}/{service.name}", ids, owner, balanced, settings.hash_seed,
                           settings.table_slots)
    out.add(layout.CLUSTER_IPS, *((ip, "") for ip in cluster_ips))
    external_ips = [ip for ip in service.external_ips_all if family.holds(ip)]
    for port, backends in state.port_backends():
        _render_port(out, service, port, [b for b in backends if family.holds(b.ip)], cluster_ips, external_ips,
                     settings, family, node_ips)
    ids.keep(owner, out.tables)
    return out.fragment()


class _FragmentBuilder:
    def __init__(self, name: str, table_ids: TableIdAllocator | None = None, owner: Hashable = None,
                 balanced: bool = False, seed: int = 0, slot_bound: int = lb_tables.MAX_TABLE_SIZE):
        self.name = name
        self.elements: list[Element] = []
        self.needs: set[layout.Need] = set()
        self.owned: list[Declaration] = []
        self.table_ids = table_ids
        self.owner = owner
        self.balanced = balanced  # False: no balancing tables (the kernel's numgen pick)
        self.slot_bound = slot_bound
        self.seed = seed
        self.tables: set[Hashable] = set()  # the tables this Service has now (table_ids keys)

    def table_size(self, service: Service, listed: int) -> int | None:
        """The port's table size (lb/tables.table_size, from the `listed` endpoints); None: no table."""
        return lb_tables.table_size(service, None, listed, self.slot_bound) if self.balanced else None

    def table(self, service: Service, port: ServicePort, role: str, backends: tuple[Backend, ...], size: int) -> str:
        """A balancing table of the port's `role` endpoints: its slots added, its id as mark text."""
        key = (port.protocol, port.port, role)
        assert self.table_ids is not None
        table_id = self.table_ids.get(self.owner, key, f"{self.name}/{port.protocol}/{port.port}/{role}")
        self.tables.add(key)
        self.elements.extend(self.table_ids.slots.render(service, backends, size, table_id))
        return id_text(table_id)

    def add(self, container: str, *items: tuple[str, str], comment: str = "") -> None:
        self.elements.extend(Element(container, key, value, comment) for key, value in items)

    def endpoints(self, container: str, key: str, endpoints: tuple[Backend, ...]) -> None:
        self.elements.extend(
            Element(container, f"{key} . {slot}", f"{e.ip} . {e.port}") for slot, e in enumerate(endpoints)
        )

    def fragment(self) -> Fragment:
        # Each element once (a Pod behind two ports of the Service is one hairpin entry), in render order.
        return Fragment(tuple(dict.fromkeys(self.elements)), _shared_needs(frozenset(self.needs)), tuple(self.owned))


# A verdict names one of a few shared chains: one string for every element that jumps there.
_verdict = sys.intern

# Most Services need what many others need ({Pick(10)}): one frozenset for all of them, not one
# each (2 MB at 10,000 Services). Bounded: endpoint counts come from untrusted objects.
_NEEDS: dict[frozenset, frozenset] = {}


def _shared_needs(needs: frozenset) -> frozenset:
    known = _NEEDS.get(needs)
    if known is None:
        if len(_NEEDS) >= 4096:
            _NEEDS.clear()
        known = _NEEDS[needs] = needs
    return known


def _render_port(out: _FragmentBuilder, service: Service, port: ServicePort, backends: list[Backend],
                 cluster_ips: list[str], external_ips: list[str], settings: NodeSettings,
                 family: layout.Family, node_ips: tuple[str, ...]) -> None:
    proto = port.protocol.lower()
    comment = f"{out.name}:{port.name or port.port}"
    chosen = Selection.of(backends, settings.node_name, settings.node_zone)
    lb_ips = [ip for ip in service.load_balancer_ips if family.holds(ip)]
    if service.load_balancer_source_ranges and lb_ips:
        _firewall(out, service, port, proto, lb_ips, family, node_ips)
    # Each address's key text once, for every map it is a key of.
    cluster_keys = [f"{ip} . {proto} . {port.port}" for ip in cluster_ips]
    out.add(layout.CLUSTER_IP_PORTS, *((key, "") for key in cluster_keys))
    if not chosen.any_usable:
        # No endpoint at all: refuse at once (ICMP port unreachable), as kube-proxy does.
        reject = _verdict(f"goto {layout.REJECT}")
        out.add(layout.NO_ENDPOINT_SERVICES, *((key, reject) for key in
                                                cluster_keys + [f"{ip} . {proto} . {port.port}" for ip in external_ips]),
                comment=comment)
        if port.node_port:
            out.add(layout.NO_ENDPOINT_NODEPORTS, (f"{proto} . {port.node_port}", reject), comment=comment)
        return
    n, m = len(chosen.cluster), len(chosen.local)
    internal = chosen.local if service.internal_traffic_policy == TrafficPolicy.LOCAL else chosen.cluster
    local_policy = service.external_traffic_policy == TrafficPolicy.LOCAL
    # A Pod reaching itself must be masqueraded, or it would answer itself. Only a Pod on
    # this node sends its ClusterIP traffic through this node; but a Local policy lets
    # Pods of other nodes in unmasqueraded through a NodePort, so those count too.
    used = {e.ip for e in chosen.cluster + chosen.local
            if local_policy or e.node_name in (settings.node_name, "")}
    out.add(layout.HAIRPIN, *((f"{ip} . {ip}", "") for ip in sorted(used)))
    # Sized by every endpoint listed, ready or not (lb/tables.default_table_size: no resize on a readiness flap).
    size = out.table_size(service, len(backends))
    size = size if size is not None and n < size else None
    affinity = None
    if service.session_affinity_timeout:
        # ClientIP affinity: the Service port's own chains, whatever the address (nat/affinity.py);
        # with a balancing table, a new client is placed by it.
        affinity = AffinityChains(service, port, settings, family,
                                  table=(size, settings.hash_seed) if size else None)
        out.owned.extend(affinity.build(chosen.cluster, chosen.local, internal, local_policy))
    elif size:
        _render_table_port(out, service, port, chosen, internal, local_policy, cluster_ips, external_ips, size,
                           comment)
        return
    else:
        out.needs |= {layout.Pick(n)} | ({layout.Pick(len(internal))} if internal else set())

    for key in cluster_keys:
        if not internal:  # internalTrafficPolicy: Local and no endpoint here: drop, do not refuse
            out.add(layout.NO_ENDPOINT_SERVICES, (key, "drop"), comment=comment)
            continue
        if affinity:
            target = affinity.cluster
        else:
            target = layout.cluster_chain(len(internal))
            out.endpoints(layout.endpoints_map(len(internal)), key, internal)
        out.add(layout.SERVICE_IPS, (key, _verdict(f"goto {target}")), comment=comment)

    # From outside: external addresses, keyed by address, and the NodePort, keyed by port alone.
    outside = [(f"{ip} . {proto} . {port.port}", False) for ip in external_ips]
    if port.node_port:
        outside.append((f"{proto} . {port.node_port}", True))
    for key, nodeport in outside:
        if affinity:
            chain = affinity.local if local_policy else affinity.external
        elif local_policy:
            chain = (layout.nodeport_local_chain if nodeport else layout.local_chain)(m, n)
            out.needs |= {layout.LocalChain(m, n, nodeport)} | ({layout.LocalPick(m)} if m else set())
            local_map = layout.nodeport_local_endpoints_map(m) if nodeport else layout.local_endpoints_map(m)
            out.endpoints(local_map, key, chosen.local)
        else:
            chain = layout.nodeport_chain(n) if nodeport else layout.external_chain(n)
        if not affinity:
            out.endpoints(layout.nodeport_endpoints_map(n) if nodeport else layout.endpoints_map(n), key,
                          chosen.cluster)
        out.add(layout.SERVICE_NODEPORTS if nodeport else layout.SERVICE_IPS, (key, _verdict(f"goto {chain}")),
                comment=comment)


def _render_table_port(out: _FragmentBuilder, service: Service, port: ServicePort, chosen: Selection,
                       internal: tuple[Backend, ...], local_policy: bool, cluster_ips: list[str],
                       external_ips: list[str], size: int, comment: str) -> None:
    """A Service port balanced by its table (nat/tables.py): ids and slots, no per-Service rule."""
    proto = port.protocol.lower()
    out.needs |= {layout.TableIds(), layout.HashPick(size)}
    cluster_id = out.table(service, port, "cluster", chosen.cluster, size)
    for ip in cluster_ips:
        key = f"{ip} . {proto} . {port.port}"
        if not internal:  # internalTrafficPolicy: Local and no endpoint here: drop, do not refuse
            out.add(layout.NO_ENDPOINT_SERVICES, (key, "drop"), comment=comment)
            continue
        internal_id = cluster_id if internal == chosen.cluster else out.table(service, port, "internal", internal, size)
        out.add(layout.TABLE_IDS, (key, internal_id))
        out.add(layout.SERVICE_IPS, (key, _verdict(f"goto {layout.hash_chain('cluster', size)}")),
                comment=comment)
    local_id = out.table(service, port, "local", chosen.local, size) if local_policy and chosen.local else None
    outside = [(f"{ip} . {proto} . {port.port}", False) for ip in external_ips]
    if port.node_port:
        outside.append((f"{proto} . {port.node_port}", True))
    for key, nodeport in outside:
        out.add(layout.NODEPORT_TABLE_IDS if nodeport else layout.TABLE_IDS, (key, cluster_id))
        if local_policy:
            chain = layout.hash_chain("nodeport-local" if nodeport else "local", size)
            if local_id is not None:  # none: the local lookup misses and the chain drops
                out.add(layout.NODEPORT_LOCAL_TABLE_IDS if nodeport else layout.LOCAL_TABLE_IDS, (key, local_id))
        else:
            chain = layout.hash_chain("nodeport" if nodeport else "external", size)
        out.add(layout.SERVICE_NODEPORTS if nodeport else layout.SERVICE_IPS, (key, _verdict(f"goto {chain}")),
                comment=comment)


def _firewall(out: _FragmentBuilder, service: Service, port: ServicePort, proto: str, lb_ips: list[str],
              family: layout.Family, node_ips: tuple[str, ...]) -> None:
    """loadBalancerSourceRanges: LoadBalancer IPs only; other sources are dropped before DNAT.

    When a range holds a node address the node itself stays allowed, whatever
    source address it picks (kube-proxy: a VIP bound locally loops back with
    the VIP as source).
    """
    ranges = [r for r in service.load_balancer_source_ranges if family.holds(r)]
    node_inside = any(ipaddress.ip_address(ip) in ipaddress.ip_network(r)
                      for ip in node_ips if family.holds(ip) for r in ranges)
    for ip in lb_ips:
        key = f"{ip} . {proto} . {port.port}"
        out.add(layout.FIREWALL_IPS, (key, ""))
        out.add(layout.FIREWALL_ALLOW, *((f"{key} . {r}", "") for r in ranges))
        if node_inside:
            out.add(layout.FIREWALL_LOCAL, (key, ""))
