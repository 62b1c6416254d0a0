"""Userspace mode's part of the table: queue a new flow's first packet, DNAT by the forwarder's mark.

    prerouting/output  filter -160  userspace-prerouting/-output
        ct state new, not yet confirmed, to a Service address or NodePort in userspace mode
        -> meta mark |= QUEUE_BIT                     (and `queue` where nft has it)
    prerouting/output  mangle -150  iptables NFQUEUE on QUEUE_BIT, --queue-bypass   (xtables.py)
        -> the forwarder's verdict sets the mark: ID bits = the chosen endpoint's id
    nat -100  every pick chain, before its `numgen` dnat (or an affinity chain's `numgen` vmap):
        ID bits set      -> dnat to @endpoint-ids[mark & ID_MASK]
                            (affinity: goto the chosen endpoint's chain, which also remembers the client)
        QUEUE_BIT set    -> counter fail-open (no decision came: dead, stuck or full queue)
        otherwise        -> the kernel's own numgen pick, exactly as in kernel mode

Invariants:
- Only the first packet of a flow is queued: once conntrack confirmed the
  flow, its NAT binding carries the choice and nothing is queued again.
- Fail-open: a packet without a decision takes the kernel-mode path
  unchanged; Service traffic never depends on the forwarder being alive.
- An endpoint id names one address:port while any decision made with it
  may be in flight: an id is reused only `quarantine` seconds after its
  endpoint left, oldest first, and a packet carrying an id that left the
  map falls back to numgen rather than reaching another endpoint.

Kernel mode's layout is not edited: `extend()` adds this module's
declarations and elements to a rendered Ruleset and gives every rule that
picks at random (`expr.Rule.picks`, found by type in shared and
per-Service chains alike) a mark-driven twin (see `_twins`).
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections import deque
from typing import Callable, Collection, Hashable, Iterable, Mapping

from ..config import NodeSettings
from ..lb.policy import frontends, packed
from ..marks import ID_MASK, KEEP_MASK, MAX_ID, QUEUE_BIT, mark_for
from ..model import Selection, ServiceKey, ServiceState, Snapshot
from . import layout
from .expr import CT_STATE, CT_STATUS, MARK, AnonMap, BinOp, Counter, Match, Nat, Queue, Rule, SetMeta, Vmap
from .layout import NODEPORT_IPS, Family
from .ruleset import BaseChain, Chain, Container, Declaration, Element, Fragment, Ruleset
from .tables import table_keys

ENDPOINT_IDS = "endpoint-ids"  # mark & ID_MASK : endpoint address . port
USERSPACE_SERVICES = "userspace-services"  # daddr . proto . port of Service addresses to queue
USERSPACE_NODEPORTS = "userspace-nodeports"  # proto . port of NodePorts to queue
CLASSIFY = "userspace-classify"
FAIL_OPEN = "fail-open"  # named counter: new flows that reached a pick without a decision
PRIORITY = -160  # after conntrack (-200), before mangle (-150) where iptables queues
IDS_PER_OWNER = 256  # endpoint-id elements are owned in blocks, so a change re-plans one block


@dataclasses.dataclass(frozen=True, slots=True)
class QueueSpec:
    """Where queued packets go: queues first..first+count-1; `in_nft`: nft's own `queue` statement exists.

    `fanout`: a packet goes to queue first + (its CPU % count), so it is decided on the CPU it arrived on;
    otherwise the kernel spreads flows over the queues by a hash of their addresses.
    """

    count: int = 1
    first: int = 0
    in_nft: bool = False
    fanout: bool = False

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def nft_statement(self) -> Queue:
        target = str(self.first) if self.count == 1 else f"{self.first}-{self.last}"
        return Queue(target, bypass=True, fanout=self.fanout and self.count > 1)


class EndpointIds:
    """Stable ids for endpoint address:port pairs, recycled only after a quarantine.

    `update()` takes the whole set in use and returns the ids that appeared
    and disappeared; ids never collide with one in use or in quarantine
    unless all 2^29 are taken (then the oldest quarantined one is reused).
    """

    def __init__(self, quarantine: float = 60.0, clock: Callable[[], float] = time.monotonic, limit: int = MAX_ID):
        self.quarantine = quarantine
        self.clock = clock
        self.limit = limit
        self.ids: dict[tuple[str, int], int] = {}
        self._next = 1
        self._free: deque[tuple[float, int]] = deque()  # (released at, id), oldest first

    def get(self, endpoint: tuple[str, int]) -> int | None:
        return self.ids.get(endpoint)

    def update(self, in_use: Iterable[tuple[str, int]]) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
        """Brings the ids to `in_use`; returns (added, removed), each endpoint -> id."""
        in_use = set(in_use)
        now = self.clock()
        removed = {e: i for e, i in self.ids.items() if e not in in_use}
        for endpoint, endpoint_id in removed.items():
            del self.ids[endpoint]
            self._free.append((now, endpoint_id))
        added = {}
        for endpoint in sorted(in_use - self.ids.keys()):
            added[endpoint] = self.ids[endpoint] = self._allocate(now)
        return added, removed

    def _allocate(self, now: float) -> int:
        if self._free and now - self._free[0][0] >= self.quarantine:
            return self._free.popleft()[1]
        if self._next <= self.limit:
            self._next += 1
            return self._next - 1
        if self._free:  # every id taken: reuse the one that left longest ago
            return self._free.popleft()[1]
        raise OverflowError(f"more than {self.limit} endpoints in userspace mode")


def skeleton(settings: NodeSettings, family: Family, queue: QueueSpec) -> list[Declaration]:
    """Declarations of userspace mode, present whatever Services exist."""
    addr = family.addr_type
    mark: tuple = (SetMeta(MARK, BinOp(BinOp(MARK, "&", KEEP_MASK), "|", QUEUE_BIT)),)
    if queue.in_nft:
        mark += (queue.nft_statement(),)
    new_flow = (layout.is_(CT_STATE, "new"), Match((CT_STATUS,), "!", (frozenset({"confirmed"}),)))
    return [
        # type, not typeof: nft 1.0.6 refuses a later rule that reads a typeof map keyed on th dport.
        Container(ENDPOINT_IDS, ("mark",), (addr, "inet_service")),
        Container(USERSPACE_SERVICES, (addr, "inet_proto", "inet_service"), kind="set"),
        Container(USERSPACE_NODEPORTS, ("inet_proto", "inet_service"), kind="set"),
        Container(FAIL_OPEN, kind="counter"),
        Chain(
            CLASSIFY,
            (
                Rule.of(layout.in_set(family.address_key(), USERSPACE_SERVICES), *mark),
                Rule.of(layout.in_set((family.daddr,), NODEPORT_IPS),
                        layout.in_set(layout.NODEPORT_KEY, USERSPACE_NODEPORTS), *mark),
            ),
        ),
        Chain("userspace-prerouting", (Rule.of(*new_flow, layout.jump(CLASSIFY)),),
              BaseChain("filter", "prerouting", PRIORITY)),
        Chain("userspace-output", (Rule.of(*new_flow, layout.jump(CLASSIFY)),), BaseChain("filter", "output", PRIORITY)),
    ]


DECIDED = BinOp(MARK, "&", ID_MASK)  # the forwarder's decision: an endpoint id, or 0


def _twins(chain: Chain, family: Family, endpoint_of: Callable[[str], int | None]) -> Chain:
    """`chain` with, before each rule that picks at random, the forwarder's decision and a fail-open count.

    A `numgen` dnat is preceded by a dnat through @endpoint-ids keyed on the
    mark; an affinity `numgen` vmap over endpoint chains by a vmap from the
    mark to the same chains (`endpoint_of` names the id of an endpoint
    chain), so the client set that makes later connections sticky is updated
    for the forwarder's choice too. Both keep the pick's own conditions (its
    l4proto match), so they apply exactly where the kernel pick would have.
    """
    rules: list[Rule] = []
    for rule in chain.rules:
        if rule.picks:
            conditions = rule.matches
            pick = rule.statements[len(conditions)]
            if isinstance(pick, Nat):
                decided = Nat("dnat", family.nft, expr=(DECIDED,), map=ENDPOINT_IDS)
            else:
                entries = []
                for _, verdict in pick.map.entries:
                    endpoint_id = endpoint_of(verdict.chain)
                    if endpoint_id is not None:
                        entries.append(((mark_for(endpoint_id),), verdict))
                decided = Vmap((DECIDED,), AnonMap(tuple(sorted(entries, key=lambda e: e[0]))))
            if not isinstance(decided, Vmap) or decided.map.entries:
                rules.append(Rule.of(*conditions, Match((DECIDED,), "!=", (0,)), decided))
            rules.append(Rule.of(*conditions, Match((BinOp(MARK, "&", QUEUE_BIT),), "!=", (0,)), Counter(FAIL_OPEN)))
        rules.append(rule)
    return dataclasses.replace(chain, rules=tuple(rules))


def _fixed_target(chain: Chain) -> tuple[str, int] | None:
    """The one address:port a chain dnats to (an affinity endpoint chain), if it has one."""
    for rule in chain.rules:
        for statement in rule.statements:
            if isinstance(statement, Nat) and not statement.map and statement.port is not None:
                return str(statement.address), statement.port
    return None


def service_fragment(state: ServiceState, family: Family, tabled: Collection[str] = frozenset()) -> Fragment:
    """The addresses and NodePorts of one Service whose new flows go to the forwarder (lb/policy.frontends).

    `tabled`: the dispatch keys the kernel balances by a table (nat/tables.table_keys); a port with
    any of them is not queued at all (its every address shares the table), the Service's other ports are.
    """
    service = state.service
    if not service.proxied or not any(family.holds(ip) for ip in service.cluster_ips):
        return Fragment()
    internal, external = frontends(state, family.holds)
    addresses = [ip for ip in (*service.cluster_ips, *service.external_ips_all)
                 if family.holds(ip) and packed(ip) in internal + (external or ())]
    every_address = [ip for ip in (*service.cluster_ips, *service.external_ips_all) if family.holds(ip)]
    elements = []
    for port, backends in state.port_backends():
        if not any(family.holds(b.ip) for b in backends):
            continue  # nothing to decide: the kernel refuses or drops
        proto = port.protocol.lower()
        if tabled and (any(f"{ip} . {proto} . {port.port}" in tabled for ip in every_address)
                       or (port.node_port and f"{proto} . {port.node_port}" in tabled)):
            continue  # balanced by its kernel table: nothing to decide per flow
        elements += [Element(USERSPACE_SERVICES, f"{ip} . {proto} . {port.port}") for ip in addresses]
        if port.node_port and external is not None:
            elements.append(Element(USERSPACE_NODEPORTS, f"{proto} . {port.node_port}"))
    return Fragment(frozenset(elements))


def queued_ports(fragment: Fragment) -> frozenset[tuple[str, int]]:
    """(protocol, port) of each Service port a `service_fragment` queues, protocol as the model
    spells it (TCP, UDP, SCTP): every queued port has its ClusterIPs in it."""
    found = set()
    for element in fragment.elements:
        if element.container == USERSPACE_SERVICES:
            _, proto, port = element.key.split(" . ")
            found.add((proto.upper(), int(port)))
    return frozenset(found)


def endpoints_in_use(state: ServiceState, family: Family, node_name: str = "", zone: str = "") -> set[tuple[str, int]]:
    """Every endpoint address:port a decision for this Service may name (any traffic policy)."""
    if not state.service.proxied:
        return set()
    found = set()
    for _, backends in state.port_backends():
        selection = Selection.of(backends, node_name, zone)
        found |= {(b.ip, b.port) for b in (*selection.cluster, *selection.local) if family.holds(b.ip)}
    return found


class UserspaceRules:
    """Extends each rendered Ruleset with userspace mode's declarations and elements.

    Keeps, between syncs, which endpoints each Service uses (to maintain the
    ids) and the fragments it built, so a sync costs O(changed Services).
    """

    def __init__(self, settings: NodeSettings, family: Family, queue: QueueSpec, ids: EndpointIds | None = None):
        self.family = family
        self.node_name, self.zone = settings.node_name, settings.node_zone
        self.ids = ids or EndpointIds()
        self._own = {d.name: d for d in skeleton(settings, family, queue)}
        self._fragments: dict[Hashable, Fragment] = {}
        self._uses: dict[ServiceKey, set[tuple[str, int]]] = {}
        self._refs: dict[tuple[str, int], int] = {}
        self._snapshot: Snapshot | None = None
        self._adapted: tuple[Mapping[str, Declaration], Mapping[str, Declaration]] | None = None
        self._owned: dict[Hashable, tuple[Fragment, Fragment]] = {}  # owner -> (as rendered, with decisions)
        self._blocks: dict[int, dict[int, tuple[str, int]]] = {}  # id block -> id -> endpoint
        self._last: Ruleset | None = None
        # Service -> (protocol, port) of its ports whose new flows are queued: what the forwarder must know;
        # `requeued`: the Services whose queued ports changed, until the daemon takes them (take_requeued).
        self.queued: dict[ServiceKey, frozenset[tuple[str, int]]] = {}
        self.requeued: set[ServiceKey] = set()

    def extend(self, ruleset: Ruleset, snapshot: Snapshot) -> Ruleset:
        """`ruleset` plus userspace mode; pure with respect to the kernel."""
        previous = self._snapshot
        keys = snapshot.changed_since(previous) if previous is not None else snapshot.services.keys()
        if ruleset.changed is None and previous is not None:
            # Rendered whole: a Service that did not change may have gained or lost its tables (the
            # node's slot bound is shared, nat/render.py), so whether its ports are queued is asked again.
            keys = set(keys) | snapshot.services.keys()
        changed: set[Hashable] = set()
        for key in keys:
            state = snapshot.services.get(key)
            # A port balanced by a kernel table (Maglev, weights: nat/tables.py) is not queued.
            tabled = table_keys(ruleset.fragments.get(key, Fragment()))
            fragment = service_fragment(state, self.family, tabled) if state is not None else Fragment()
            queued = queued_ports(fragment)
            if queued != self.queued.get(key, frozenset()):
                self.requeued.add(key)
            if queued:
                self.queued[key] = queued
            else:
                self.queued.pop(key, None)
            owner = ("userspace", key)
            if fragment != self._fragments.get(owner, Fragment()):
                changed.add(owner)
                if fragment.elements:
                    self._fragments[owner] = fragment
                else:
                    self._fragments.pop(owner, None)
            self._use(key, endpoints_in_use(state, self.family, self.node_name, self.zone) if state is not None else set())
        added, removed = self.ids.update(self._refs)
        blocks = set()
        for endpoint, endpoint_id in removed.items():
            blocks.add(endpoint_id // IDS_PER_OWNER)
            self._blocks[endpoint_id // IDS_PER_OWNER].pop(endpoint_id, None)
        for endpoint, endpoint_id in added.items():
            blocks.add(endpoint_id // IDS_PER_OWNER)
            self._blocks.setdefault(endpoint_id // IDS_PER_OWNER, {})[endpoint_id] = endpoint
        changed.update(self._rebuild_block(block) for block in blocks)
        self._snapshot = snapshot
        incremental = ruleset.changed is not None and self._last is not None
        self._adapt_owned(ruleset, incremental)
        fragments = {**ruleset.fragments, **self._fragments}
        fragments.update((owner, adapted) for owner, (_, adapted) in self._owned.items())
        for owner in changed:
            if owner not in self._fragments:
                fragments.pop(owner, None)
        extended = dataclasses.replace(
            ruleset,
            declarations=self._declarations(ruleset.declarations),
            always=ruleset.always | self._own.keys(),
            fragments=fragments,
            previous=weakref.ref(self._last) if incremental else None,
            changed=(ruleset.changed | changed) if incremental else None,
        )
        self._last = extended
        return extended

    def take_requeued(self) -> set[ServiceKey]:
        """The Services whose queued ports changed since the last call (the Service itself may not have)."""
        taken, self.requeued = self.requeued, set()
        return taken

    def _use(self, key: ServiceKey, endpoints: set[tuple[str, int]]) -> None:
        before = self._uses.pop(key, set())
        if endpoints:
            self._uses[key] = endpoints
        for endpoint in endpoints - before:
            self._refs[endpoint] = self._refs.get(endpoint, 0) + 1
        for endpoint in before - endpoints:
            self._refs[endpoint] -= 1
            if not self._refs[endpoint]:
                del self._refs[endpoint]

    def _rebuild_block(self, block: int) -> Hashable:
        owner = ("endpoint-ids", block)
        ids = self._blocks.get(block)
        if ids:
            self._fragments[owner] = Fragment(frozenset(
                Element(ENDPOINT_IDS, f"0x{mark_for(i):08x}", f"{ip} . {port}") for i, (ip, port) in ids.items()))
        else:
            self._fragments.pop(owner, None)
            self._blocks.pop(block, None)
        return owner

    def _declarations(self, base: Mapping[str, Declaration]) -> Mapping[str, Declaration]:
        # Cached by identity: the builder replaces its mapping only when it adds declarations.
        if self._adapted is not None and self._adapted[0] is base:
            return self._adapted[1]
        adapted = {name: _twins(d, self.family, _no_endpoint) if isinstance(d, Chain) and d.picks else d
                   for name, d in base.items()}
        adapted.update(self._own)
        self._adapted = (base, adapted)
        return adapted

    def _adapt_owned(self, ruleset: Ruleset, incremental: bool) -> None:
        """The Services' own chains (session affinity) with the forwarder's decision in every pick.

        Cached by the identity of the rendered fragment, so an unchanged
        Service keeps the very same object and the planner skips it.
        """
        if not incremental:
            self._owned = {}
        candidates = ruleset.changed if incremental else ruleset.fragments.keys()
        for owner in candidates:
            fragment = ruleset.fragments.get(owner)
            if fragment is None or not any(isinstance(d, Chain) and d.picks for d in fragment.owned):
                self._owned.pop(owner, None)
                continue
            cached = self._owned.get(owner)
            if cached is None or cached[0] is not fragment:
                self._owned[owner] = (fragment, self._with_decisions(fragment))

    def _with_decisions(self, fragment: Fragment) -> Fragment:
        targets = {d.name: _fixed_target(d) for d in fragment.owned if isinstance(d, Chain)}

        def endpoint_of(chain: str) -> int | None:
            target = targets.get(chain)
            return self.ids.get(target) if target is not None else None

        owned = tuple(_twins(d, self.family, endpoint_of) if isinstance(d, Chain) and d.picks else d
                      for d in fragment.owned)
        return dataclasses.replace(fragment, owned=owned)


def _no_endpoint(chain: str) -> None:
    return None  # shared pick chains dnat by map: no endpoint chain to go to


PROBE_TABLE = "dataplane-probe"


def probe_nft_queue(nft) -> bool:
    """True when this kernel takes nft's `queue` statement (CONFIG_NFT_QUEUE); tries it in a scratch table.

    `nft` is a nat.nftables.Nftables; the scratch table is deleted whatever happened.
    """
    from .nftables import NftError

    table = f"ip {PROBE_TABLE}"
    try:
        nft.run(f"add table {table}\nadd chain {table} probe\nadd rule {table} probe queue num 0 bypass\n")
        return True
    except NftError:
        return False
    finally:
        try:
            nft.delete_table("ip", PROBE_TABLE)
        except NftError:
            pass
