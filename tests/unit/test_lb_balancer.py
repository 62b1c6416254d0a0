"""The sans-IO balancer: algorithms, weights, affinity, least-conn, verdict marks. No root, no sockets.

Address plan
    clients     192.168.50.0/24 (a flow per source port)
    ClusterIP   10.96.0.10:80/TCP, 10.96.0.11:53/UDP; NodePort 30080 on node 192.168.50.1
    endpoints   10.244.1.11-.. :80 with ids 1..N (marks via dataplane.marks.mark_for)
"""

from __future__ import annotations

import random
import socket
from collections import Counter

import pytest
from scapy.all import IP, TCP, UDP, raw

from dataplane.lb import maglev
from dataplane.lb.balancer import (
    Balancer, BuildTable, FlowEnded, FlowStarted, NodeAddresses, PacketQueued, PacketsQueued, ServicesChanged,
    TableBuilt, Tick, Verdict, Verdicts, smooth_round_robin,
)
from dataplane.lb.policy import PortTable, Target
from dataplane.marks import ID_MASK, KEEP_MASK, QUEUE_BIT, id_of, mark_for
from dataplane.packet import parse

CLUSTER_IP = "10.96.0.10"
NODE_IP = "192.168.50.1"


def packed(ip: str) -> bytes:
    return socket.inet_aton(ip)


def targets(n: int, weights=None) -> tuple[Target, ...]:
    weights = weights or [1] * n
    return tuple(Target(i + 1, f"10.244.1.{11 + i}", 80, weights[i]) for i in range(n))


def table(n=3, algorithm="random", weights=None, affinity=None, name="default/web:http", node_port=None,
          address=CLUSTER_IP, protocol=6, port=80) -> PortTable:
    return PortTable(name, protocol, (packed(address),), port, node_port, targets(n, weights), algorithm, affinity, family=6 if ":" in address else 4)


_TEMPLATES: dict = {}


def tcp(client_port: int, client="192.168.50.2", address=CLUSTER_IP, port=80) -> bytes:
    """A TCP SYN built by scapy once per (client, address, port); the source port is patched in."""
    key = (client, address, port)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = raw(IP(src=client, dst=address) / TCP(sport=1, dport=port, flags="S"))
    template = _TEMPLATES[key]
    return template[:20] + client_port.to_bytes(2, "big") + template[22:]


def balancer_with(*tables: PortTable, seed=7, build=True, now=0.0) -> Balancer:
    balancer = Balancer(seed=seed)
    commands = balancer.handle(ServicesChanged({("default", "web"): tables}, now))
    if build:
        run_builds(balancer, commands)
    return balancer


def run_builds(balancer: Balancer, commands) -> None:
    for command in commands:
        if isinstance(command, BuildTable):
            built = maglev.build(command.names, command.weights, command.size)
            balancer.handle(TableBuilt(command.port, command.generation, built))


def decide(balancer: Balancer, payload: bytes, mark=QUEUE_BIT, now=0.0) -> int | None:
    """The endpoint id the verdict names, or None when the packet goes on undecided."""
    (verdict,) = balancer.handle(PacketsQueued([PacketQueued(0, 1, mark, payload)], now))[0].items
    assert verdict[2] & QUEUE_BIT == 0, "a verdict always clears the queue bit"
    return id_of(verdict[2] & ID_MASK) or None


def chi_square(counts: Counter, expected: dict) -> float:
    return sum((counts.get(k, 0) - e) ** 2 / e for k, e in expected.items())


CHI2_P001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 9: 27.88}  # critical values, p = 0.001


# -- distributions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["random", "round-robin", "maglev", "least-conn"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_each_algorithm_spreads_new_flows_evenly(algorithm, n):
    balancer = balancer_with(table(n, algorithm))
    flows = 6000
    counts = Counter(decide(balancer, tcp(port)) for port in range(10000, 10000 + flows))
    if algorithm == "least-conn":  # each decision counts until conntrack confirms it: strict rotation
        assert max(counts.values()) - min(counts.values()) <= 1
    assert chi_square(counts, {i: flows / n for i in range(1, n + 1)}) < CHI2_P001[n - 1], counts


@pytest.mark.parametrize("algorithm", ["random", "round-robin", "maglev", "least-conn"])
def test_weights_are_respected_by_every_algorithm(algorithm):
    balancer = balancer_with(table(3, algorithm, weights=[1, 2, 3]))
    flows = 6000
    counts = Counter(decide(balancer, tcp(port)) for port in range(10000, 10000 + flows))
    assert chi_square(counts, {1: flows / 6, 2: flows / 3, 3: flows / 2}) < CHI2_P001[2], counts


@pytest.mark.parametrize("algorithm", ["random", "round-robin", "maglev", "least-conn"])
def test_weight_zero_drains_an_endpoint(algorithm):
    balancer = balancer_with(table(3, algorithm, weights=[0, 1, 1]))
    assert 1 not in {decide(balancer, tcp(port)) for port in range(10000, 10600)}


def test_all_weights_zero_still_serves():
    balancer = balancer_with(table(3, "random", weights=[0, 0, 0]))
    assert {decide(balancer, tcp(port)) for port in range(10000, 10300)} == {1, 2, 3}


def test_round_robin_is_a_strict_rotation():
    balancer = balancer_with(table(3, "round-robin"))
    assert [decide(balancer, tcp(port)) for port in range(10000, 10009)] == [1, 2, 3] * 3


def test_smooth_weighted_round_robin_interleaves():
    assert smooth_round_robin([5, 1, 1]) == [0, 0, 1, 0, 2, 0, 0]
    assert Counter(smooth_round_robin([3, 2, 1])) == {0: 3, 1: 2, 2: 1}


# -- Maglev ----------------------------------------------------------------------------------------

def names(n: int, start: int = 0) -> list[str]:
    return [f"10.244.{i // 250}.{i % 250 + 1}:80" for i in range(start, start + n)]


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1000])
def test_maglev_table_is_balanced_within_one_slot(n):
    counts = Counter(maglev.build(names(n)))
    assert len(counts) == n
    assert max(counts.values()) - min(counts.values()) <= 1


def test_maglev_weighted_table_follows_weights():
    counts = Counter(maglev.build(names(4), [1, 1, 2, 4]))
    for index, share in enumerate([1 / 8, 1 / 8, 2 / 8, 4 / 8]):
        assert abs(counts[index] / maglev.DEFAULT_SIZE - share) < 0.001


@pytest.mark.parametrize("n", [3, 10, 50, 200, 1000])
def test_maglev_removing_one_of_n_moves_about_one_nth(n):
    everyone = names(n)
    survivors = everyone[:-1]
    before, after = maglev.build(everyone), maglev.build(survivors)
    # Compare endpoints by name: indices shift when one leaves.
    moved = sum(1 for a, b in zip(before, after) if everyone[a] != survivors[b]) / len(before)
    assert moved <= 1 / n + 0.01, f"{moved:.4f} of slots moved for 1/{n}"


@pytest.mark.parametrize("n", [3, 10, 50, 200, 1000])
def test_maglev_adding_one_moves_about_one_nth(n):
    everyone, grown = names(n), names(n + 1)
    before, after = maglev.build(everyone), maglev.build(grown)
    moved = sum(1 for a, b in zip(before, after) if everyone[a] != grown[b]) / len(before)
    assert moved <= 1 / (n + 1) + 0.01, f"{moved:.4f} of slots moved for 1/{n + 1}"


def test_maglev_table_needs_more_slots_than_endpoints():
    with pytest.raises(ValueError):
        maglev.build(names(7), size=7)


def test_maglev_keeps_a_flow_on_its_endpoint_across_an_unrelated_change():
    balancer = balancer_with(table(5, "maglev"))
    flows = {port: decide(balancer, tcp(port)) for port in range(20000, 22000)}
    gone = 5
    commands = balancer.handle(ServicesChanged({("default", "web"): (
        PortTable("default/web:http", 6, (packed(CLUSTER_IP),), 80, None, targets(4), "maglev", None),)}))
    # Until the new table is built, the old one still places every flow of a remaining endpoint.
    assert all(decide(balancer, tcp(p)) == e for p, e in flows.items() if e != gone)
    run_builds(balancer, commands)
    kept = [decide(balancer, tcp(p)) == e for p, e in flows.items() if e != gone]
    assert sum(kept) / len(kept) >= 0.98
    assert gone not in {decide(balancer, tcp(p)) for p in flows}


def test_maglev_is_a_pure_function_of_the_flow_before_its_table_exists():
    balancer = balancer_with(table(3, "maglev"), build=False)
    first = [decide(balancer, tcp(p)) for p in range(30000, 30100)]
    assert first == [decide(balancer, tcp(p)) for p in range(30000, 30100)]
    assert set(first) == {1, 2, 3}


def test_a_stale_table_build_is_ignored():
    balancer = Balancer()
    first = balancer.handle(ServicesChanged({"s": (table(3, "maglev"),)}))
    second = balancer.handle(ServicesChanged({"s": (table(2, "maglev"),)}))
    run_builds(balancer, first)  # generation 1: superseded
    assert balancer.ports["default/web:http"].maglev == []
    run_builds(balancer, second)
    assert set(balancer.ports["default/web:http"].maglev) == {0, 1}


# -- least-conn ------------------------------------------------------------------------------------

def flow_of(payload: bytes):
    return parse(payload)


def test_least_conn_follows_conntrack():
    balancer = balancer_with(table(3, "least-conn"))
    endpoint = {1: (packed("10.244.1.11"), 80), 2: (packed("10.244.1.12"), 80), 3: (packed("10.244.1.13"), 80)}
    # Flows the kernel decided (e.g. before a restart) count too: 2 on endpoint 1, 1 on endpoint 2.
    for flow_id, (port, target) in enumerate([(40000, 1), (40001, 1), (40002, 2)], 1):
        balancer.handle(FlowStarted(flow_id, flow_of(tcp(port)), endpoint[target]))
    assert decide(balancer, tcp(41000)) == 3
    balancer.handle(FlowStarted(10, flow_of(tcp(41000)), endpoint[3]))  # confirms the pending decision
    assert balancer.ports["default/web:http"].active == {1: 2, 2: 1, 3: 1}
    balancer.handle(FlowEnded(1))
    balancer.handle(FlowEnded(2))
    balancer.handle(FlowEnded(2))  # an end seen twice counts once
    assert balancer.ports["default/web:http"].active == {1: 0, 2: 1, 3: 1}
    assert decide(balancer, tcp(41001)) == 1


def test_least_conn_forgets_decisions_conntrack_never_confirmed():
    balancer = balancer_with(table(2, "least-conn"))
    decide(balancer, tcp(42000), now=0.0)
    assert sum(balancer.ports["default/web:http"].active.values()) == 1
    balancer.handle(Tick(5.0))
    assert sum(balancer.ports["default/web:http"].active.values()) == 0


# -- affinity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["random", "round-robin", "maglev", "least-conn"])
def test_client_ip_affinity_holds_in_every_algorithm(algorithm):
    balancer = balancer_with(table(3, algorithm, affinity=60))
    for client in ("192.168.50.2", "192.168.50.3", "192.168.50.4"):
        chosen = {decide(balancer, tcp(port, client), now=1.0) for port in range(10000, 10050)}
        assert len(chosen) == 1, f"{client}: {chosen}"
    assert balancer.affinity_entries() == 3


def test_affinity_expires_after_the_timeout_and_is_refreshed_by_new_flows():
    balancer = balancer_with(table(3, "round-robin", affinity=10))
    first = decide(balancer, tcp(10000), now=0.0)
    assert decide(balancer, tcp(10001), now=8.0) == first  # refreshes: now expires at 18
    balancer.handle(Tick(15.0))
    assert balancer.affinity_entries() == 1
    assert decide(balancer, tcp(10002), now=17.0) == first
    balancer.handle(Tick(27.5))
    assert balancer.affinity_entries() == 0
    assert decide(balancer, tcp(10003), now=28.0) != first  # round-robin moves on once forgotten


def test_affinity_to_a_removed_endpoint_is_dropped():
    balancer = balancer_with(table(3, "round-robin", affinity=60))
    first = decide(balancer, tcp(10000))
    remaining = tuple(t for t in targets(3) if t.id != first)
    balancer.handle(ServicesChanged({("default", "web"): (
        PortTable("default/web:http", 6, (packed(CLUSTER_IP),), 80, None, remaining, "round-robin", 60),)}))
    assert decide(balancer, tcp(10001)) in {t.id for t in remaining}


def test_affinity_is_per_service_port_across_its_addresses():
    two_addresses = PortTable("default/web:http", 6, (packed(CLUSTER_IP), packed("192.168.60.10")), 80, 30080,
                              targets(3), "random", 60)
    balancer = balancer_with(two_addresses)
    balancer.handle(NodeAddresses((packed(NODE_IP),)))
    chosen = {decide(balancer, tcp(p, address=a, port=port_))
              for p in range(10000, 10020) for a, port_ in ((CLUSTER_IP, 80), ("192.168.60.10", 80), (NODE_IP, 30080))}
    assert len(chosen) == 1


# -- verdicts --------------------------------------------------------------------------------------

def test_verdict_marks_name_the_endpoint_and_keep_other_bits():
    balancer = balancer_with(table(3, "round-robin"))
    (verdict,) = balancer.handle(PacketQueued(0, 42, QUEUE_BIT | 0x4000 | 0x0005_0003, tcp(10000)))
    assert isinstance(verdict, Verdict) and verdict.packet_id == 42
    assert verdict.mark & KEEP_MASK == 0x4000
    assert id_of(verdict.mark & ID_MASK) == 1


@pytest.mark.parametrize("payload", [b"", b"\x45", tcp(10000)[:22], raw(IP(dst="10.96.0.99") / TCP(dport=80)),
                                     raw(IP(dst=CLUSTER_IP) / UDP(dport=80)), raw(IP(dst=NODE_IP) / TCP(dport=30080))],
                         ids=["empty", "one-byte", "truncated", "other-address", "other-protocol", "nodeport-unknown"])
def test_packets_we_cannot_place_go_on_undecided(payload):
    balancer = balancer_with(table(3))
    assert decide(balancer, payload) is None
    assert balancer.undecided == 1


def test_nodeports_are_matched_on_node_addresses_only():
    balancer = balancer_with(table(3, node_port=30080))
    assert decide(balancer, tcp(10000, address=NODE_IP, port=30080)) is None
    balancer.handle(NodeAddresses((packed(NODE_IP),)))
    assert decide(balancer, tcp(10000, address=NODE_IP, port=30080)) in {1, 2, 3}


def test_a_removed_service_is_forgotten():
    balancer = balancer_with(table(3))
    balancer.handle(ServicesChanged({("default", "web"): ()}))
    assert decide(balancer, tcp(10000)) is None
    assert balancer.ports == {} and balancer.frontends == {}


def test_every_packet_of_a_batch_gets_one_verdict_in_order():
    balancer = balancer_with(table(3, "round-robin"))
    rng = random.Random(3)
    batch = [PacketQueued(rng.randrange(4), i, QUEUE_BIT, tcp(10000 + i) if i % 3 else bytes(rng.randrange(60)))
             for i in range(300)]
    (verdicts,) = balancer.handle(PacketsQueued(batch, 0.0))
    assert isinstance(verdicts, Verdicts)
    assert [(q, i) for q, i, _ in verdicts.items] == [(p.queue, p.packet_id) for p in batch]


def test_status_reports_algorithm_and_flows_per_endpoint():
    balancer = balancer_with(table(2, "round-robin", affinity=30))
    for port in range(10000, 10004):
        decide(balancer, tcp(port, client=f"192.168.50.{port - 9990}"))
    (entry,) = balancer.status()
    assert entry["algorithm"] == "round-robin" and entry["affinity_entries"] == 4
    assert [e["decided"] for e in entry["endpoints"]] == [2, 2]


def test_mark_encoding_round_trips_and_avoids_kube_proxy_bits():
    for endpoint_id in (1, 0x1FFF, 0x2000, 12345, (1 << 29) - 1):
        mark = mark_for(endpoint_id)
        assert id_of(mark) == endpoint_id
        assert mark & ~ID_MASK & 0xFFFFFFFF == 0
        assert mark & (QUEUE_BIT | 0x4000 | 0x8000) == 0


def test_affinity_by_hash_gives_every_forwarder_the_same_first_pick():
    """Queues fanned out by CPU: one client's flows can meet two forwarders, each with its own table."""
    clients = [f"192.168.50.{i}" for i in range(2, 60)]
    picks = []
    for seed in (1, 2):  # two workers: different random streams, the same answer per client
        balancer = balancer_with(table(3, "random", affinity=60), seed=seed)
        balancer.affinity_by_hash = True
        picks.append([decide(balancer, tcp(40000, client=c)) for c in clients])
    assert picks[0] == picks[1]
    assert len(set(picks[0])) == 3  # still spread over the endpoints
    weighted = balancer_with(table(3, "random", weights=[0, 1, 1], affinity=60))
    weighted.affinity_by_hash = True
    assert 1 not in {decide(weighted, tcp(40000, client=c)) for c in clients}  # a weight of 0 drains
