"""Userspace mode's part of the table: queue a new flow's first packet, DNAT by the forwarder's mark.

    prerouting/output  filter -160  userspace-prerouting/-output
        ct state new, not yet confirmed, to a Service address or NodePort in userspace mode
        -> meta mark |= QUEUE_BIT                     (and `queue` where nft has it)
    prerouting/output  mangle -150  iptables NFQUEUE on QUEUE_BIT, --queue-bypass   (xtables.py)
        -> the forwarder's verdict sets the mark: ID bits = the chosen endpoint's id
    nat -100  every pick chain, before its `numgen` dnat:
        ID bits set      -> dnat to @endpoint-ids[mark & ID_MASK]
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
declarations and elements to a rendered Ruleset and gives every pick
chain's `numgen` dnat a mark-driven twin (see `_twins`).
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections import deque
from typing import Callable, Hashable, Iterable, Mapping

from ..config import NodeSettings
from ..lb.policy import frontends, packed
from ..marks import ID_MASK, KEEP_MASK, MAX_ID, QUEUE_BIT, mark_for
from ..model import Selection, ServiceKey, ServiceState, Snapshot
from .layout import L4_PROTOCOLS, NODEPORT_IPS, Family
from .ruleset import Chain, Container, Declaration, Element, Fragment, Ruleset

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

    def nft_statement(self) -> str:
        target = str(self.first) if self.count == 1 else f"{self.first}-{self.last}"
        return f"queue num {target} bypass,fanout" if self.fanout and self.count > 1 else f"queue num {target} bypass"


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
    nft, addr = family.nft, family.addr_type
    mark = f"meta mark set meta mark & 0x{KEEP_MASK:08x} | 0x{QUEUE_BIT:08x}"
    if queue.in_nft:
        mark += f" {queue.nft_statement()}"
    new_flow = "ct state new ct status ! confirmed"
    return [
        # type, not typeof: nft 1.0.6 refuses a later rule that reads a typeof map keyed on th dport.
        Container(ENDPOINT_IDS, f"type mark : {addr} . inet_service"),
        Container(USERSPACE_SERVICES, f"type {addr} . inet_proto . inet_service", kind="set"),
        Container(USERSPACE_NODEPORTS, "type inet_proto . inet_service", kind="set"),
        Container(FAIL_OPEN, "packets 0 bytes 0", kind="counter"),
        Chain(
            CLASSIFY,
            (
                f"{nft} daddr . meta l4proto . th dport @{USERSPACE_SERVICES} {mark}",
                f"{nft} daddr @{NODEPORT_IPS} meta l4proto . th dport @{USERSPACE_NODEPORTS} {mark}",
            ),
        ),
        Chain("userspace-prerouting", (f"{new_flow} jump {CLASSIFY}",),
              f"type filter hook prerouting priority {PRIORITY}"),
        Chain("userspace-output", (f"{new_flow} jump {CLASSIFY}",), f"type filter hook output priority {PRIORITY}"),
    ]


def _twins(chain: Chain, family: Family) -> Chain:
    """`chain` with, before each numgen dnat, a dnat by the forwarder's mark and a fail-open count.

    Both twins keep the numgen rule's own matches (its source ranges, its
    l4proto), so they apply exactly where the kernel pick would have.
    """
    nft = family.nft
    rules: list[str] = []
    for rule in chain.rules:
        prefix, dnat, _ = rule.partition(f"dnat {nft} to ")
        if dnat and " numgen " in rule:
            rules.append(f"{prefix}meta mark & 0x{ID_MASK:08x} != 0 dnat {nft} to meta mark & 0x{ID_MASK:08x} "
                         f"map @{ENDPOINT_IDS}")
            rules.append(f'{prefix}meta mark & 0x{QUEUE_BIT:08x} != 0 counter name "{FAIL_OPEN}"')
        rules.append(rule)
    return dataclasses.replace(chain, rules=tuple(rules))


def has_pick(declaration: Declaration, family: Family) -> bool:
    return isinstance(declaration, Chain) and any(
        f"dnat {family.nft} to " in rule and " numgen " in rule for rule in declaration.rules)


def service_fragment(state: ServiceState, family: Family) -> Fragment:
    """The addresses and NodePorts of one Service whose new flows go to the forwarder (lb/policy.frontends)."""
    service = state.service
    if not service.proxied or not any(family.holds(ip) for ip in service.cluster_ips):
        return Fragment()
    internal, external = frontends(state, family.holds)
    addresses = [ip for ip in (*service.cluster_ips, *service.external_ips_all)
                 if family.holds(ip) and packed(ip) in internal + (external or ())]
    elements = []
    for port, backends in state.port_backends():
        if not any(family.holds(b.ip) for b in backends):
            continue  # nothing to decide: the kernel refuses or drops
        proto = port.protocol.lower()
        elements += [Element(USERSPACE_SERVICES, f"{ip} . {proto} . {port.port}") for ip in addresses]
        if port.node_port and external is not None:
            elements.append(Element(USERSPACE_NODEPORTS, f"{proto} . {port.node_port}"))
    return Fragment(frozenset(elements))


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
        self._blocks: dict[int, dict[int, tuple[str, int]]] = {}  # id block -> id -> endpoint
        self._last: Ruleset | None = None

    def extend(self, ruleset: Ruleset, snapshot: Snapshot) -> Ruleset:
        """`ruleset` plus userspace mode; pure with respect to the kernel."""
        previous = self._snapshot
        keys = snapshot.changed_since(previous) if previous is not None else snapshot.services.keys()
        changed: set[Hashable] = set()
        for key in keys:
            state = snapshot.services.get(key)
            fragment = service_fragment(state, self.family) if state is not None else Fragment()
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
        fragments = {**ruleset.fragments, **self._fragments}
        for owner in changed:
            if owner not in self._fragments:
                fragments.pop(owner, None)
        incremental = ruleset.changed is not None and self._last is not None
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
        adapted = {name: _twins(d, self.family) if has_pick(d, self.family) else d for name, d in base.items()}
        adapted.update(self._own)
        self._adapted = (base, adapted)
        return adapted


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
