"""A dual-stack Service in userspace mode: each family's new flows go to that family's endpoints, decided.

The daemon (daemon/userspace.py) hands the forwarder one set of port tables
per family for the same Service port, each with its own endpoints and ids
(the ids of each family's rules count on their own, so an IPv6 id may name
an unrelated IPv4 endpoint). Here the tables are made the same way and
given to the balancer and its pick table (queue/picks.py), and every
frontend, of either family, must be decided with an id of its own family.

Address plan
    node        192.168.50.1, fd00:50::1; NodePort 30040
    ClusterIPs  10.96.0.40, fd00:96::40 (one dual-stack Service, round-robin)
    endpoints   10.244.1.11-12, fd00:244::11-12 :80 (IPv4 ids 1-2, IPv6 ids 101-102)
"""

from __future__ import annotations

import pytest
from scapy.all import IP, IPv6, TCP, raw

from dataplane.lb.balancer import Balancer, NodeAddresses, ServicesChanged
from dataplane.lb.policy import PortTable, Target, packed, port_tables
from dataplane.marks import ID_MASK, QUEUE_BIT, id_of
from dataplane.model import parse_objects
from dataplane.packet import PacketQueued
from dataplane.queue import picks
from dataplane.sync.store import Store

V4_IDS = {("10.244.1.11", 80): 1, ("10.244.1.12", 80): 2}
V6_IDS = {("fd00:244::11", 80): 101, ("fd00:244::12", 80): 102}
NODE_IPS = ("192.168.50.1", "fd00:50::1")


def slice_(family: str, ips) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"web-{family.lower()}", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": family, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "nodeName": "node-a"} for ip in ips]}


def dual_stack_tables() -> dict:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
               "spec": {"type": "NodePort", "clusterIP": "10.96.0.40", "clusterIPs": ["10.96.0.40", "fd00:96::40"],
                        "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30040}]}}
    parsed, errors = parse_objects([service, slice_("IPv4", ["10.244.1.11", "10.244.1.12"]),
                                    slice_("IPv6", ["fd00:244::11", "fd00:244::12"])], "x")
    assert not errors, errors
    store = Store()
    store.replace("x", parsed)
    ((key, state),) = store.snapshot().services.items()
    ports = []
    for version, ids in ((4, V4_IDS), (6, V6_IDS)):  # as daemon/userspace.py's synced()
        found, _ = port_tables(state, ids.get, "round-robin", version, "node-a")
        ports += found
    return {key: tuple(ports)}


def balancer() -> Balancer:
    b = Balancer(seed=1)
    b.handle(ServicesChanged(dual_stack_tables(), 0.0))
    b.handle(NodeAddresses(tuple(packed(ip) for ip in NODE_IPS)))
    return b


def syn(dst: str, dport: int, sport: int = 40000) -> bytes:
    ip = IPv6(src="fd00:50::2", dst=dst) if ":" in dst else IP(src="192.168.50.2", dst=dst)
    return raw(ip / TCP(sport=sport, dport=dport, flags="S"))


@pytest.mark.parametrize("dst, dport, ids", [
    ("10.96.0.40", 80, V4_IDS), ("192.168.50.1", 30040, V4_IDS),
    ("fd00:96::40", 80, V6_IDS), ("fd00:50::1", 30040, V6_IDS),
], ids=["ipv4-clusterip", "ipv4-nodeport", "ipv6-clusterip", "ipv6-nodeport"])
def test_each_family_is_decided_with_its_own_endpoints(dst, dport, ids):
    b = balancer()
    packets = [PacketQueued(0, i, QUEUE_BIT, syn(dst, dport, 40000 + i)) for i in range(4)]
    chosen = [id_of(mark & ID_MASK) for _, _, mark in b.decide(packets)]
    assert b.undecided == 0 and set(chosen) == set(ids.values()), chosen


def test_the_pick_table_holds_the_ipv4_frontends_of_a_dual_stack_service():
    b = balancer()
    table = picks.build(b)
    for dst, dport in (("10.96.0.40", 80), ("192.168.50.1", 30040)):
        entry = table.get(picks.key(packed(dst), 6, dport))
        assert entry is not None, dst
        assert {id_of(mark) for mark in entry[1]} == set(V4_IDS.values())


def test_nodeport_only_tables_of_both_families_keep_their_own_nodeports():
    """A NodePort table with no address (internalTrafficPolicy Local, no external IP) is told apart by
    its family, not by its addresses: the IPv6 one must not take the IPv4 one's NodePort."""
    def table(family, targets):
        return PortTable(f"default/web:http{'/ipv6' if family == 6 else ''}/external", 6, (), 80, 30040,
                         tuple(Target(i, ip, port, 1) for (ip, port), i in targets.items()), "round-robin",
                         None, family=family)
    b = Balancer(seed=1)
    b.handle(ServicesChanged({"web": (table(4, V4_IDS), table(6, V6_IDS))}, 0.0))
    assert {key: {t.id for t in state.table.targets} for key, state in b.nodeports.items()} == {
        (4, 6, 30040): {1, 2}, (6, 6, 30040): {101, 102}}
