"""sessionAffinity: ClientIP, in the kernel: a dynamic set of clients per endpoint.

A Service port with affinity gets chains of its own (it cannot share the
per-endpoint-count maps: the choice must be remembered per client):

  <base>-cluster   [masquerade off-cluster sources]  goto <base>-pick-internal|all
  <base>-external  masquerade                        goto <base>-pick-all
  <base>-local     (externalTrafficPolicy: Local) Pods -> pick-all, the node
                   -> external, others -> pick-local, or drop
  <base>-pick-X    saddr in @<base>-clients-E ? goto <base>-endpoint-E  (each E)
                   else numgen random over X's endpoints, or, for a Service balanced by
                   a table (Maglev, weights: nat/tables.py), `jhash ... vmap { slot : goto E }`
  <base>-endpoint-E  update @<base>-clients-E { saddr }  dnat to E

The sets time out after timeoutSeconds, refreshed by every new connection;
they are shared by every address of the Service (ClusterIP, NodePort,
LoadBalancer, externalIPs), so a client keeps its endpoint across them.
Affinity Services are few; their cost grows with their endpoints, as
kube-proxy's does.
"""

from __future__ import annotations

import hashlib
import ipaddress

from ..config import NodeSettings
from ..lb import tables as lb_tables
from ..model import Backend, Service, ServicePort
from . import layout
from .expr import L4PROTO, PROTOCOLS, AnonMap, Match, Nat, Rule, SetRef, SetUpdate, Verdict, Vmap, numgen
from .ruleset import Chain, Container, Declaration


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


class AffinityChains:
    """The chains and sets of one Service port with ClientIP affinity, for one family."""

    def __init__(self, service: Service, port: ServicePort, settings: NodeSettings, family: layout.Family,
                 table: tuple[int, int] | None = None):
        proto = port.protocol.lower()
        # Names come from validated DNS labels; the hash keeps them apart whatever their length.
        ident = f"{service.namespace}/{service.name}/{proto}/{port.name or port.port}"
        self.base = f"aff-{_short_hash(ident)}-{ident}"
        self.proto = proto
        self.settings = settings
        self.family = family
        self.timeout = service.session_affinity_timeout
        self.service = service
        self.table = table  # (slots, seed) of its balancing table; None: numgen
        self.declarations: list[Declaration] = []
        self._endpoints: dict[str, tuple[str, str]] = {}  # "ip . port" -> (endpoint chain, clients set)

    @property
    def cluster(self) -> str:
        return f"{self.base}-cluster"

    @property
    def external(self) -> str:
        return f"{self.base}-external"

    @property
    def local(self) -> str:
        return f"{self.base}-local"

    def build(self, cluster: tuple[Backend, ...], local: tuple[Backend, ...], internal: tuple[Backend, ...],
              external_local: bool) -> list[Declaration]:
        pick_all = self._pick("all", cluster)
        if internal:
            pick_internal = pick_all if internal == cluster else self._pick("internal", internal)
            self.declarations.append(Chain(self.cluster, layout.masquerade_cluster_rules(self.settings, self.family)
                                           + (Rule.of(layout.goto(pick_internal)),)))
        self.declarations.append(Chain(self.external, (Rule.of(layout.jump(layout.MARK_FOR_MASQUERADE)),
                                                       Rule.of(layout.goto(pick_all)))))
        if external_local:
            rules = []
            pods = layout.pod_sources(self.settings, self.family)
            if pods:
                rules.append(Rule.of(pods, layout.goto(pick_all)))
            rules.append(Rule.of(layout.is_(layout.FIB_SADDR_TYPE, "local"), layout.goto(self.external)))
            rules.append(Rule.of(layout.goto(self._pick("local", local)) if local else Verdict("drop")))
            self.declarations.append(Chain(self.local, tuple(rules)))
        return self.declarations

    def _pick(self, which: str, endpoints: tuple[Backend, ...]) -> str:
        endpoint_chains = [self._endpoint(e) for e in endpoints]
        saddr = (self.family.saddr,)
        rules = [Rule.of(Match(saddr, "", SetRef(clients)), layout.goto(chain)) for chain, clients in endpoint_chains]
        if self.table is not None:
            size, seed = self.table
            chain_of = {(e.ip, e.port): chain for e, (chain, _) in zip(endpoints, endpoint_chains)}
            slots = lb_tables.fill(self.service, endpoints, size)
            targets = tuple(((slot,), layout.goto(chain_of[(e.ip, e.port)])) for slot, e in enumerate(slots))
            rules.append(Rule.of(Vmap((layout.flow_slot(self.family, size, seed),), AnonMap(targets))))
        else:
            targets = tuple(((i,), layout.goto(chain)) for i, (chain, _) in enumerate(endpoint_chains))
            rules.append(Rule.of(Vmap((numgen(len(targets)),), AnonMap(targets))))
        name = f"{self.base}-pick-{which}"
        self.declarations.append(Chain(name, tuple(rules)))
        return name

    def _endpoint(self, endpoint: Backend) -> tuple[str, str]:
        """The endpoint's chain and its set of clients."""
        target = f"{endpoint.ip} . {endpoint.port}"
        if target in self._endpoints:
            return self._endpoints[target]
        suffix = _short_hash(target)
        chain, clients = f"{self.base}-endpoint-{suffix}", f"{self.base}-clients-{suffix}"
        self.declarations.append(Container(clients, (self.family.addr_type,), kind="set",
                                           flags=("dynamic", "timeout"), timeout=self.timeout, dynamic=True))
        self.declarations.append(Chain(chain, (
            Rule.of(SetUpdate("update", clients, (self.family.saddr,))),
            Rule.of(Match((L4PROTO,), "", (PROTOCOLS[self.proto],)),
                    Nat("dnat", self.family.nft, address=ipaddress.ip_address(endpoint.ip), port=endpoint.port)),
        )))
        self._endpoints[target] = chain, clients
        return chain, clients
