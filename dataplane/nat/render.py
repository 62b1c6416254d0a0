"""Snapshot -> Ruleset: a pure function, and a cache that makes it cheap to repeat.

Each Service becomes one Fragment: its entries in the dispatch maps, its
endpoints in the shared endpoint map for its endpoint count, and its rejects
when it has none. The node's NodePort addresses are one more fragment.
"""

from __future__ import annotations

import weakref
from typing import Hashable, Iterable

from ..config import NodeSettings
from ..lb.endpoints import usable_endpoints
from ..model import ServiceState, Snapshot
from . import layout
from .ruleset import EMPTY, Element, Fragment, Ruleset

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
        self._last_snapshot: weakref.ref[Snapshot] | None = None
        self._last: Ruleset | None = None

    def build(self, snapshot: Snapshot, node_ips: Iterable[str] = ()) -> Ruleset:
        last = self._last
        seen = self._last_snapshot() if self._last_snapshot is not None else None
        if last is not None and seen is not None and snapshot.follows(seen):
            # The snapshot says what changed since the one we built last.
            fragments = dict(last.fragments)
            candidates = snapshot.changed
        else:
            fragments, candidates = {}, snapshot.services.keys()
        changed = set()
        for key in candidates:
            state = snapshot.services.get(key)
            fragment = service_fragment(state, self.settings, self.family) if state is not None else EMPTY
            for name in fragment.needs - self._declarations.keys():
                self._add_pick_declarations(layout.pick_size(name))
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
            self.family.nft, layout.TABLE, self._declarations, self._always, fragments,
            previous=weakref.ref(last) if incremental else None,
            changed=frozenset(changed) if incremental else None,
        )
        self._last, self._last_snapshot = ruleset, weakref.ref(snapshot)
        return ruleset

    def _add_pick_declarations(self, n: int) -> None:
        # Copy on write: Rulesets already handed out keep their own mapping.
        declarations = dict(self._declarations)
        declarations.update((d.name, d) for d in layout.pick_declarations(n, self.settings, self.family))
        self._declarations = declarations


def node_fragment(node_ips: Iterable[str], family: layout.Family) -> Fragment:
    return Fragment(frozenset(Element(layout.NODEPORT_IPS, ip) for ip in node_ips if family.holds(ip)))


def service_fragment(state: ServiceState, settings: NodeSettings, family: layout.Family) -> Fragment:
    """The elements one Service contributes, for one address family."""
    service = state.service
    if not service.proxied:
        return Fragment()
    cluster_ips = [ip for ip in service.cluster_ips if family.holds(ip)]
    if not cluster_ips:
        return Fragment()
    external_ips = [ip for ip in service.external_ips_all if family.holds(ip)]
    elements: list[Element] = []
    needs: set[str] = set()
    for port, backends in state.port_backends():
        proto = port.protocol.lower()
        comment = f"{service.namespace}/{service.name}:{port.name or port.port}"
        endpoints = sorted(b for b in usable_endpoints(backends) if family.holds(b.ip))
        addresses = [(ip, layout.cluster_chain) for ip in cluster_ips] + [(ip, layout.external_chain) for ip in external_ips]
        if not endpoints:
            for ip, _ in addresses:
                elements.append(
                    Element(layout.NO_ENDPOINT_SERVICES, f"{ip} . {proto} . {port.port}", f"goto {layout.REJECT}", comment)
                )
            if port.node_port:
                elements.append(
                    Element(layout.NO_ENDPOINT_NODEPORTS, f"{proto} . {port.node_port}", f"goto {layout.REJECT}", comment)
                )
            continue
        n = len(endpoints)
        needs |= layout.pick_names(n)
        targets = [f"{e.ip} . {e.port}" for e in endpoints]
        for ip, chain in addresses:
            key = f"{ip} . {proto} . {port.port}"
            elements.append(Element(layout.SERVICE_IPS, key, f"goto {chain(n)}", comment))
            elements.extend(Element(layout.endpoints_map(n), f"{key} . {i}", t) for i, t in enumerate(targets))
        if port.node_port:
            key = f"{proto} . {port.node_port}"
            elements.append(Element(layout.SERVICE_NODEPORTS, key, f"goto {layout.nodeport_chain(n)}", comment))
            elements.extend(Element(layout.nodeport_endpoints_map(n), f"{key} . {i}", t) for i, t in enumerate(targets))
        # Only a Pod on this node can reach itself through this node's rules.
        elements.extend(
            Element(layout.HAIRPIN, f"{e.ip} . {e.ip}")
            for e in endpoints
            if e.node_name in (settings.node_name, "")
        )
    return Fragment(frozenset(elements), frozenset(needs))
