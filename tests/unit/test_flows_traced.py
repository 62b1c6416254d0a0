"""The packet-flow table (tests/flows.py), traced through the rendered ruleset in the in-memory nftables.

The same rows run with real packets in tests/e2e/test_packet_flows.py; here
every row is checked exhaustively instead of by sampling: the tracer follows
every `numgen` branch, so "reaches all four Pods" means exactly those four
and nothing else, each with the right masquerade.

Address plan: tests/flows.py (client 192.168.50.2, node 192.168.50.1 and
10.244.1.1, Pods 10.244.1.11-14, ClusterIPs 10.96.5.0/24, LoadBalancer
192.168.60.0/24, externalIPs 192.168.70.0/24, NodePorts 302xx/312xx; the
IPv6 rows, where the table has them, fd00:50::/64, fd00:244:1::/64, fd00:96::/108).
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Callable
from dataclasses import replace
from functools import cache

import pytest

from dataplane.config import NodeSettings
from dataplane.model import Snapshot, parse_objects
from dataplane.nat import layout, plan
from dataplane.nat.fake import FakeNftables
from dataplane.nat.render import render
from dataplane.lb.balancer import Balancer, NodeAddresses, PacketQueued, ServicesChanged
from dataplane.lb.policy import ALGORITHM_ANNOTATION, ALGORITHMS, packed, port_tables
from dataplane.marks import ID_MASK, QUEUE_BIT, id_of, mark_for
from dataplane.nat.trace import DNAT, QUEUE, Outcome, Packet, Path, Tracer
from dataplane.nat.userspace import CLASSIFY, ENDPOINT_IDS, QueueSpec, UserspaceRules
from dataplane.sync.store import Store
from tests import flows
from tests.flows import (
    CLUSTER_CIDR,
    DROP,
    FLOWS,
    MANIFESTS,
    NODE_IP,
    NODE_NAME,
    NODE_ZONE,
    POD_IPS,
    REJECT,
    SERVICE_CIDR,
    SOURCES,
    Flow,
    Hashed,
    Reached,
    Sticky,
    cip,
    lb,
    np,
)

# The IPv6 rows: the node is dual-stack.
FLOWS6: list[Flow] = flows.FLOWS6
MANIFESTS6: dict[str, list[dict]] = flows.MANIFESTS6
V6 = {"cluster": flows.CLUSTER_CIDR6, "service": flows.SERVICE_CIDR6, "node": flows.NODE_IP6, "pods": flows.POD_IPS6}
V6_NODE_IPS = (V6["node"], "fd00:244:1::1")  # client side, and every Pod veth

SETTINGS = NodeSettings(node_name=NODE_NAME, cluster_cidrs=tuple(filter(None, (CLUSTER_CIDR, V6["cluster"]))),
                        service_cidrs=tuple(filter(None, (SERVICE_CIDR, V6["service"]))), node_zone=NODE_ZONE)
NODE_IPS = (NODE_IP, "10.244.1.1") + V6_NODE_IPS
ECHO_PORT = 80  # every Pod echoes on TCP and UDP 80
POD_BY_IP = {ip: pod for ips in (POD_IPS, V6["pods"]) for pod, ip in ips.items()}


@cache
def snapshot() -> Snapshot:
    store = Store()
    for origin, documents in {**MANIFESTS, **MANIFESTS6}.items():
        objects, errors = parse_objects(documents, origin)
        assert not errors, errors
        store.replace(origin, objects)
    return store.snapshot()


@cache
def rendered(userspace: bool = False, nft_queue: bool = False) -> str:
    """plan.full() of the table's manifests, both families: the text `nft -f -` would receive.
    With `userspace`, userspace mode's additions too: queued by iptables, or with `nft_queue`
    by nft's own `queue` statement (which the tracer shows as a QUEUE outcome)."""
    text = ""
    for family in (4, 6):
        ruleset = render(snapshot(), SETTINGS, NODE_IPS, family)
        if userspace:
            rules = UserspaceRules(SETTINGS, layout.Family(family), QueueSpec(in_nft=nft_queue))
            ruleset = rules.extend(ruleset, snapshot())
        text += str(plan.full(ruleset)[0])
    return text


def tracer_for(text: str) -> Tracer:
    nft = FakeNftables()
    nft.run(text)
    return Tracer(nft)


@pytest.fixture(scope="module")
def tracer() -> Tracer:
    return tracer_for(rendered())


def packet(flow: Flow, sport: int = 40000, mark: int = 0, saddr: str | None = None) -> Packet:
    source = flow.source
    saddr = saddr or flows.source_ip(flow)
    return Packet(saddr, flow.destination, flow.protocol.lower(), flow.port, sport, from_node=source == "node",
                  mark=mark)


def problems(tracer: Tracer, flow: Flow) -> list[str]:
    """What is wrong with `flow` in the traced ruleset; [] when the row holds."""
    paths = tracer.trace(packet(flow))
    expect = flow.expect
    if expect in (REJECT, DROP):
        wrong = [p for p in paths if p.outcome != Outcome(expect)]
        return [f"expected {expect}, got {p.outcome}:\n{p.explain()}" for p in wrong] or (
            [] if paths else [f"expected {expect}, got no outcome"])
    if isinstance(expect, Hashed):
        return hashed_problems(tracer, flow, expect)
    assert isinstance(expect, (Reached, Sticky))
    found = _reached(flow, paths, expect.masqueraded if isinstance(expect, Reached) else None)
    if isinstance(found, list):
        return found
    if found != expect.pods:
        return [f"expected {sorted(expect.pods)}, reached {sorted(found)}"]
    if isinstance(expect, Sticky):
        return _sticky(tracer, flow, paths)
    return []


def _reached(flow: Flow, paths: list[Path], masqueraded: bool | None) -> set[str] | list[str]:
    """The Pods reached, or the problems: a path that reached no Pod, or the wrong masquerade."""
    reached, wrong = set(), []
    for path in paths:
        outcome = path.outcome
        pod = POD_BY_IP.get(outcome.address) if outcome.verdict == DNAT else None
        if pod is None or outcome.port != ECHO_PORT:
            wrong.append(f"{outcome} is no Pod's echo port:\n{path.explain()}")
            continue
        reached.add(pod)
        want = True if pod == flow.source else masqueraded  # a Pod reaching itself: hairpin
        if want is not None and outcome.masqueraded != want:
            wrong.append(f"{pod}: masqueraded should be {want}:\n{path.explain()}")
    return wrong or reached


def hashed_ports(flow: Flow) -> range:
    """The source ports a table row is traced from, per source address: enough that every Pod with
    weight gets some (deterministic: the kernel's hash, not a random pick)."""
    return range(40000, 40008 if len(flows.sources(flow)) > 1 else 40040)


def hashed_problems(tracer: Tracer, flow: Flow, expect: Hashed) -> list[str]:
    """A table row: from every source address and several ports, the one Pod the table names
    (flows.table_pick), with the row's masquerade; over them all, every Pod with weight, none drained;
    with affinity, a later connection of the client on its first Pod whatever its port."""
    wrong, seen = [], set()
    for saddr in flows.sources(flow):
        for sport in hashed_ports(flow):
            paths = tracer.trace(packet(flow, sport=sport, saddr=saddr))
            want = flows.table_pick(expect, saddr, sport)
            found = _reached(flow, paths, expect.masqueraded)
            if found != {want} or len(paths) != 1:
                wrong.append(f"{saddr}:{sport}: the table names {want}, reached {found} over {len(paths)} paths")
                continue
            seen.add(want)
            if expect.sticky:
                again = _reached(flow, tracer.trace(packet(flow, sport=sport + 1000, saddr=saddr), after=paths), None)
                if again != {want}:
                    wrong.append(f"{saddr}: affinity: first {want}, then {again}")
    weights = dict(expect.weights)
    weighed = {p for p in expect.pods if weights.get(p, 1) > 0}
    if not wrong and seen != weighed:
        wrong.append(f"over every source, reached {sorted(seen)}, the table's Pods with weight are {sorted(weighed)}")
    return wrong


def _sticky(tracer: Tracer, flow: Flow, first_paths: list[Path]) -> list[str]:
    """A second connection from the same client, after the first one's set updates, must land alike."""
    wrong = []
    for first in first_paths:
        if not first.learned:
            wrong.append(f"the connection to {first.outcome.endpoint} taught no affinity set:\n{first.explain()}")
        second = tracer.trace(packet(flow, sport=40001), after=[first])
        elsewhere = {p.outcome.endpoint for p in second} - {first.outcome.endpoint}
        if elsewhere:
            wrong.append(f"after {first.outcome.endpoint}, a second connection may reach {sorted(elsewhere)}")
    return wrong


@pytest.mark.parametrize("flow", FLOWS + FLOWS6, ids=[f.id for f in FLOWS + FLOWS6])
def test_packet_flow(tracer: Tracer, flow: Flow) -> None:
    assert problems(tracer, flow) == []


def test_userspace_mode_without_a_decision_fails_open_to_every_row() -> None:
    """Userspace mode's ruleset, a packet the forwarder never saw (no id in its mark): the kernel path, row by row."""
    userspace = tracer_for(rendered(userspace=True))
    assert "userspace-classify" in rendered(userspace=True)
    assert {f.id: problems(userspace, f) for f in FLOWS + FLOWS6 if problems(userspace, f)} == {}


def test_the_table_covers_every_expectation_kind() -> None:
    kinds = {type(f.expect).__name__ if not isinstance(f.expect, str) else f.expect for f in FLOWS}
    assert kinds == {"Reached", "Sticky", "Hashed", REJECT, DROP}
    assert len(FLOWS) >= 40


# Each mutation breaks one rule the way a rendering bug would; the named row must notice.
def _no_affinity_updates(text: str) -> str:
    changed = re.sub(r"update @\S+ \{ ip saddr \}", "counter", text)
    assert changed != text
    return changed


def _replace(old: str, new: str) -> Callable[[str], str]:
    def mutate(text: str) -> str:
        assert old in text, old
        return text.replace(old, new)

    return mutate


MUTATIONS = [
    ("hairpin-pod-reaching-itself-through-its-service",
     _replace("@hairpin masquerade fully-random", "@hairpin counter")),
    ("clusterip-tcp-from-outside-reaches-all-masqueraded",
     _replace("ip saddr != { 10.244.0.0/16 } jump", "ip saddr { 10.244.0.0/16 } jump")),
    ("clusterip-tcp-from-pod-reaches-all-unmasqueraded",
     _replace("ip saddr != { 10.244.0.0/16 } jump", "ip saddr { 10.244.0.0/16 } jump")),
    ("clusterip-tcp-from-outside-reaches-all-masqueraded",
     _replace("numgen random mod 4 map @endpoints-4", "numgen random mod 3 map @endpoints-4")),
    ("affinity-keeps-a-client-on-one-endpoint", _no_affinity_updates),
    ("no-endpoints-clusterip-tcp-rejects", _replace("reject-packet reject\n", "reject-packet drop\n")),
    ("etp-local-lb-reaches-local-endpoint-keeping-source",
     _replace("local-1-of-2 fib saddr type local goto", "local-1-of-2 goto")),
    ("source-range-drops-client-outside-it", _replace("@firewall-ips drop", "@firewall-ips accept")),
    ("unallocated-service-address-drops", _replace("ip daddr != @cluster-ips drop", "ip daddr != @cluster-ips accept")),
    ("itp-local-without-local-endpoint-drops-tcp", _replace("10.96.5.3 . tcp . 80 comment", "10.96.5.99 . tcp . 80 comment")),
    # Balancing tables: another seed names other endpoints; the local table swapped for the cluster one.
    ("maglev-clusterip-from-outside", _replace("seed 0x64706c62 map @slots-4093", "seed 0x1 map @slots-4093")),
    ("maglev-etp-local-lb-uses-the-local-table", _replace("map @local-table-ids goto", "map @table-ids goto")),
    ("maglev-itp-local-clusterip-uses-the-local-table", lambda text: _same_table_as_nodeport(text, 28)),
]


def _same_table_as_nodeport(text: str, number: int) -> str:
    """The ClusterIP of Service `number` mapped to its NodePort's table (every endpoint), not the local one."""
    nodeport_id = re.search(rf"^\ttcp \. {np(number)} : (0x[0-9a-f]+)", text, re.M).group(1)
    changed, count = re.subn(rf"^(\t{re.escape(cip(number))} \. tcp \. 80 : )0x[0-9a-f]+", rf"\g<1>{nodeport_id}",
                             text, flags=re.M)
    assert count == 1
    return changed


@pytest.mark.parametrize("behaviour, mutate", MUTATIONS, ids=[f"{m[0]}-{i}" for i, m in enumerate(MUTATIONS)])
def test_a_broken_ruleset_fails_its_row(behaviour: str, mutate: Callable[[str], str]) -> None:
    (flow,) = [f for f in FLOWS if f.behaviour == behaviour]
    assert problems(tracer_for(rendered()), flow) == []
    assert problems(tracer_for(mutate(rendered())), flow) != []


def test_affinity_is_shared_by_every_address_of_a_service(tracer: Tracer) -> None:
    """A client that reached sticky-local through its LoadBalancer IP keeps its Pod on the NodePort."""
    client = SOURCES["client"]
    local = {f"{POD_IPS[pod]}:80" for pod in ("pod1", "pod2")}  # its endpoints on this node
    nodeport = Packet(client, NODE_IP, "tcp", np(16), 40001)
    # Without affinity the NodePort reaches either, so one endpoint below is the affinity's doing.
    assert {o.endpoint for o in tracer.outcomes(nodeport)} == local
    firsts = tracer.trace(Packet(client, lb(16), "tcp", 80))
    assert {first.outcome.endpoint for first in firsts} == local
    for first in firsts:
        again = tracer.outcomes(nodeport, after=[first])
        assert {o.endpoint for o in again} == {first.outcome.endpoint}


def test_affinity_does_not_leak_to_other_clients_or_ports(tracer: Tracer) -> None:
    (first, *_) = tracer.trace(Packet(SOURCES["client"], cip(10), "tcp", 80))
    other_client = tracer.outcomes(Packet(SOURCES["pod3"], cip(10), "tcp", 80), after=[first])
    other_port = tracer.outcomes(Packet(SOURCES["client"], cip(10), "udp", 80), after=[first])
    assert len({o.endpoint for o in other_client}) == 4
    assert len({o.endpoint for o in other_port}) == 4


def test_affinity_expires_after_its_timeout(tracer: Tracer) -> None:
    """sticky's sets keep a client 10800 s (the default timeoutSeconds), refreshed by each connection."""
    (first, *_) = tracer.trace(Packet(SOURCES["client"], cip(10), "tcp", 80), now=0.0)
    still = tracer.outcomes(Packet(SOURCES["client"], cip(10), "tcp", 80, 40001), after=[first], now=10799.0)
    gone = tracer.outcomes(Packet(SOURCES["client"], cip(10), "tcp", 80, 40001), after=[first], now=10801.0)
    assert {o.endpoint for o in still} == {first.outcome.endpoint}
    assert len({o.endpoint for o in gone}) == 4


def test_a_range_holding_a_node_address_admits_the_node_from_any_of_its_addresses() -> None:
    """The table's row sends from 192.168.50.1, inside the range, so the allow-list alone admits it;
    from its other address (10.244.1.1) only the `fib saddr type local` rule lets the node in."""
    from_pod_side = Packet("10.244.1.1", lb(13), "tcp", 80, from_node=True)
    pods = {POD_IPS["pod1"], POD_IPS["pod2"]}
    assert {o.address for o in tracer_for(rendered()).outcomes(from_pod_side)} == pods
    broken = _replace("fib saddr type local ip daddr", "fib saddr type unicast ip daddr")(rendered())
    assert {str(o) for o in tracer_for(broken).outcomes(from_pod_side)} == {DROP}


# -- Who decided (userspace mode) ---------------------------------------------------------------
# The forwarder's verdict hands a queued packet back with the chosen endpoint's id in its mark
# (marks.mark_for(id); the ids are the keys of the ruleset's endpoint-ids map), and every pick
# chain must dnat by that mark. The tracer does not model the NFQUEUE round trip (iptables,
# mangle -150), so a decided packet is traced from after it: with userspace-classify flushed
# (it would reset the mark to "ask the forwarder"), carrying the verdict's mark into nat -100.

REACHING = [f for f in FLOWS + FLOWS6 if isinstance(f.expect, (Reached, Sticky))]
DECIDED = [f for f in FLOWS + FLOWS6 if isinstance(f.userspace, flows.Forwarder)]
STICKY = [f for f in REACHING if isinstance(f.expect, Sticky)]


def after_the_verdict(text: str) -> Tracer:
    """A tracer over userspace mode's `text` for packets the forwarder already decided (see above)."""
    nft = FakeNftables()
    nft.run(text)
    nft.run("".join(f"flush chain {family} {layout.TABLE} {CLASSIFY}\n" for family in ("ip", "ip6")))
    return Tracer(nft)


@pytest.fixture(scope="module")
def decided_tracer() -> Tracer:
    return after_the_verdict(rendered(userspace=True))


@pytest.fixture(scope="module")
def queue_tracer() -> Tracer:
    """Userspace mode queueing with nft's own `queue`: a queued packet's trace ends in QUEUE."""
    return tracer_for(rendered(userspace=True, nft_queue=True))


def endpoint_marks(nft: FakeNftables) -> dict[str, int]:
    """Echo-port endpoint IP -> the mark the forwarder sets to choose it: the ruleset's endpoint-ids keys."""
    found = {}
    for family in ("ip", "ip6"):
        for key, value in nft.elements(family, layout.TABLE, ENDPOINT_IDS).items():
            ip, port = value.split(" . ")
            mark = int(key, 16)
            assert mark_for(id_of(mark)) == mark, key  # the map is keyed by mark_for(id)
            if int(port) == ECHO_PORT:
                found[ip] = mark
    return found


def pod_ip(flow: Flow, pod: str) -> str:
    return (V6["pods"] if ":" in flow.destination else POD_IPS)[pod]


def choices(flow: Flow) -> frozenset[str]:
    """The Pods the forwarder may name for the row: its Forwarder's, else every Pod the row reaches."""
    if isinstance(flow.userspace, flows.Forwarder):
        return flow.userspace.pods
    return flow.expect.pods


def decided_problems(tracer: Tracer, flow: Flow) -> list[str]:
    """For each Pod the forwarder may choose, a packet carrying its mark must reach it and no other;
    with affinity, so must a later connection the forwarder decides alike (its own affinity)."""
    marks = endpoint_marks(tracer.nft)
    masqueraded = flow.expect.masqueraded if isinstance(flow.expect, Reached) else None
    wrong = []
    for pod in sorted(choices(flow)):
        mark = marks[pod_ip(flow, pod)]
        paths = tracer.trace(packet(flow, mark=mark))
        found = _reached(flow, paths, masqueraded)
        if found != {pod}:
            wrong.append(f"the forwarder chose {pod} (mark 0x{mark:08x}), reached: {found}")
            continue
        for first in paths if isinstance(flow.expect, Sticky) else ():
            again = _reached(flow, tracer.trace(packet(flow, sport=40001, mark=mark), after=[first]), None)
            if again != {pod}:
                wrong.append(f"a later connection decided for {pod} reached {again}")
    return wrong


@pytest.mark.parametrize("flow", REACHING, ids=[f.id for f in REACHING])
def test_a_decided_flow_reaches_the_chosen_endpoint_and_no_other(decided_tracer: Tracer, flow: Flow) -> None:
    """Every row that reaches a Pod, so every kind of pick chain the table meets (cluster-N, external-N,
    nodeport-N, local-pick-M, nodeport-local-pick-M, nodeport-direct-N, the affinity chains)."""
    assert decided_problems(decided_tracer, flow) == []


@pytest.mark.parametrize("flow", STICKY, ids=[f.id for f in STICKY])
def test_a_client_decided_once_stays_when_the_forwarder_is_gone(decided_tracer: Tracer, flow: Flow) -> None:
    """Affinity: after a decided first connection, one with no decision (fail-open, or a restarted forwarder
    that forgot its own affinity) lands on the same endpoint: the kernel's sets learned the forwarder's choice."""
    marks = endpoint_marks(decided_tracer.nft)
    wrong = {}
    for pod in sorted(choices(flow)):
        for first in decided_tracer.trace(packet(flow, mark=marks[pod_ip(flow, pod)])):
            later = _reached(flow, decided_tracer.trace(packet(flow, sport=40001), after=[first]), None)
            if later != {pod}:
                wrong[f"{pod}, first to {first.outcome.endpoint}"] = later
    assert wrong == {}


@pytest.mark.parametrize("flow", [f for f in FLOWS + FLOWS6 if f.userspace is not None], ids=lambda f: f.id)
def test_each_row_is_queued_exactly_when_the_forwarder_decides_it(queue_tracer: Tracer, flow: Flow) -> None:
    """A Forwarder row's new flow goes to the forwarder (nft `queue` shows it); a KERNEL row's never does."""
    outcomes = queue_tracer.outcomes(packet(flow))
    if isinstance(flow.userspace, flows.Forwarder):
        assert outcomes == {Outcome(QUEUE)}
    else:
        assert flow.userspace in (flows.KERNEL, flows.TABLE)
        assert Outcome(QUEUE) not in outcomes and outcomes


def wire(p: Packet) -> bytes:
    """The first bytes of `p` as NFQUEUE delivers it: an IPv4 or IPv6 header, then the ports."""
    l4 = struct.pack("!HH", p.sport, p.dport) + bytes(16)
    proto = {"tcp": 6, "udp": 17}[p.protocol]
    src, dst = packed(p.saddr), packed(p.daddr)
    if len(src) == 4:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, src, dst) + l4
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst) + l4


def balancer_for(nft: FakeNftables, algorithm: str) -> Balancer:
    """The forwarder's balancer for the table, as daemon/userspace.py feeds it, with the ruleset's endpoint ids
    and `algorithm` for every Service (none of the table's names one)."""
    ids = {}
    for family in ("ip", "ip6"):
        for key, value in nft.elements(family, layout.TABLE, ENDPOINT_IDS).items():
            ip, port = value.split(" . ")
            ids[(ip, int(port))] = id_of(int(key, 16))
    tables = {}
    for key, state in snapshot().services.items():
        # The forwarder runs `algorithm` whatever the Services' own annotation says (least-conn: what makes
        # userspace mode queue them); the ruleset dnats by the mark, whichever algorithm chose it.
        annotations = tuple((k, v) for k, v in state.service.annotations if k != ALGORITHM_ANNOTATION)
        state = replace(state, service=replace(state.service, annotations=annotations))
        found = []
        for version in (4, 6):
            ports, _ = port_tables(state, ids.get, algorithm, version, NODE_NAME, NODE_ZONE)
            found += ports
        tables[key] = tuple(found)
    balancer = Balancer(seed=10)
    balancer.handle(ServicesChanged(tables))
    balancer.handle(NodeAddresses(tuple(packed(ip) for ip in NODE_IPS)))
    return balancer


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("flow", DECIDED, ids=[f.id for f in DECIDED])
def test_the_forwarder_and_the_ruleset_agree_for_many_clients(decided_tracer: Tracer, flow: Flow,
                                                               algorithm: str) -> None:
    """The real balancer decides each new flow (from every client address, several connections each), and
    the traced ruleset takes each flow to the endpoint it named: only the row's Pods, a drained one never;
    with affinity, each client on one Pod."""
    balancer = balancer_for(decided_tracer.nft, algorithm)
    marks = {mark: ip for ip, mark in endpoint_marks(decided_tracer.nft).items()}
    by_client: dict[str, set[str]] = {}
    wrong = []
    connections = itertools.product(flows.sources(flow), range(40000, 40000 + flows.connections_per_source(flow)))
    for n, (saddr, sport) in enumerate(connections):
        queued = packet(flow, sport=sport, saddr=saddr)
        (verdict,) = balancer.handle(PacketQueued(0, n, QUEUE_BIT, wire(queued)))
        chosen = POD_BY_IP.get(marks.get(verdict.mark & ID_MASK, ""))
        if chosen not in flow.userspace.pods:
            wrong.append(f"{saddr}:{sport}: the forwarder named {chosen} (mark 0x{verdict.mark:08x})")
            continue
        found = _reached(flow, decided_tracer.trace(replace(queued, mark=verdict.mark)), None)
        if found != {chosen}:
            wrong.append(f"{saddr}:{sport}: the forwarder chose {chosen}, the ruleset reached {found}")
        by_client.setdefault(saddr, set()).update(found if isinstance(found, set) else ())
    if isinstance(flow.expect, Sticky):
        wrong += [f"{client} reached {sorted(pods)}" for client, pods in by_client.items() if len(pods) != 1]
    assert wrong == []
    assert set().union(*by_client.values()) <= flow.userspace.pods


# Each mutation drops the mark-driven twin from one kind of pick chain; the named row must notice.
def _without_twin(chain_pattern: str) -> Callable[[str], str]:
    # The twin dnats by the mark, or, in an affinity chain, goes by the mark to the endpoint's chain.
    twin = re.compile(rf"^add rule ip6? {layout.TABLE} {chain_pattern} "
                      rf".*(dnat ip6? to meta mark|meta mark & 0x[0-9a-f]+ vmap) .*\n", re.M)

    def mutate(text: str) -> str:
        changed, count = twin.subn("", text)
        assert count, chain_pattern
        return changed

    return mutate


TWIN_MUTATIONS = [  # (the chain kind, its chains, a row through it)
    ("cluster-N", r"cluster-\d+", "decided-clusterip-from-outside"),
    ("external-N", r"external-\d+", "decided-lb-ip-external-chain"),
    ("nodeport-N", r"nodeport-\d+", "decided-nodeport-chain"),
    ("local-pick-M", r"local-pick-\d+", "local-lb-is-the-kernels-pick-through-local-pick"),
    ("nodeport-local-pick-M", r"nodeport-local-pick-\d+",
     "local-nodeport-udp-is-the-kernels-pick-through-nodeport-local-pick"),
    ("nodeport-direct-N", r"nodeport-direct-\d+", "local-nodeport-from-pod-short-circuits-through-nodeport-direct"),
    ("ip6-cluster-N", r"cluster-\d+", "v6-decided-clusterip-from-outside"),
    ("affinity-pick", r"aff-\S+-pick-\S+", "sticky-drained-endpoint-gets-no-new-client"),
    ("ip6-affinity-pick", r"aff-\S+-pick-\S+", "v6-sticky-drained-endpoint-gets-no-new-client"),
]


@pytest.mark.parametrize("kind, chains, behaviour", TWIN_MUTATIONS, ids=[m[0] for m in TWIN_MUTATIONS])
def test_a_pick_chain_without_its_twin_fails_its_row(kind: str, chains: str, behaviour: str) -> None:
    (flow,) = [f for f in FLOWS + FLOWS6 if f.behaviour == behaviour]
    assert decided_problems(after_the_verdict(rendered(userspace=True)), flow) == []
    assert decided_problems(after_the_verdict(_without_twin(chains)(rendered(userspace=True))), flow) != []
