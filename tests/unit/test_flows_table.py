"""The packet-flow table's own claims (tests/flows.py), checked against its manifests and the lab plan.

A row of who decided says which Pods the forwarder may choose (Forwarder) or that
userspace mode leaves it to the kernel (KERNEL); these tests keep that in step with
the Services' `dataplane.io/weights` and traffic policies, so a row cannot claim a
choice its Service does not force. Address plan: tests/flows.py.
"""

from __future__ import annotations

import ipaddress

import pytest

from dataplane.lab.topology import AddressPlan
from dataplane.lb.policy import port_tables
from dataplane.model import TrafficPolicy, parse_objects
from dataplane.sync.store import Store
from tests import flows
from dataplane.lb.tables import table_balanced
from tests.flows import FLOWS, FLOWS6, KERNEL, MANIFESTS, MANIFESTS6, NODE_NAME, NODE_ZONE, TABLE, Forwarder, Flow, Hashed

ROWS = FLOWS + FLOWS6
POD_BY_IP = {ip: pod for ips in (flows.POD_IPS, flows.POD_IPS6) for pod, ip in ips.items()}


def services():
    store = Store()
    for origin, documents in {**MANIFESTS, **MANIFESTS6}.items():
        objects, errors = parse_objects(documents, origin)
        assert not errors, errors
        store.replace(origin, objects)
    return store.snapshot().services.values()


def owner(flow: Flow):
    """The Service state whose address (or NodePort, on a node address) the row sends to."""
    node_ips = {flows.NODE_IP, flows.NODE_IP6}
    for state in services():
        service = state.service
        if flow.destination in node_ips:
            if any(p.node_port == flow.port for p in service.ports):
                return state
        elif flow.destination in (*service.cluster_ips, *service.external_ips_all):
            return state
    raise LookupError(f"{flow.id}: no Service at {flow.destination}:{flow.port}")


def weighted_pods(flow: Flow) -> frozenset[str]:
    """The Pods of the row's Service port with a positive weight, as the forwarder's tables hold them."""
    state = owner(flow)
    family = 6 if ":" in flow.destination else 4
    tables, problems = port_tables(state, lambda endpoint: 1, "random", family, NODE_NAME, NODE_ZONE)
    assert not problems, problems
    (table, *_) = [t for t in tables if t.protocol == {"TCP": 6, "UDP": 17}[flow.protocol]]
    return frozenset(POD_BY_IP[t.ip] for t in table.targets if t.weight > 0)


@pytest.mark.parametrize("flow", [f for f in ROWS if isinstance(f.userspace, Forwarder)], ids=lambda f: f.id)
def test_a_forwarder_row_names_the_pods_its_weights_leave(flow: Flow) -> None:
    assert flow.userspace.pods == weighted_pods(flow)
    assert flow.userspace.pods < flow.expect.pods, "the kernel's own pick must be able to go elsewhere"


@pytest.mark.parametrize("flow", [f for f in ROWS if f.userspace == KERNEL], ids=lambda f: f.id)
def test_a_kernel_row_is_external_traffic_of_a_local_policy_service(flow: Flow) -> None:
    state = owner(flow)
    assert state.service.external_traffic_policy == TrafficPolicy.LOCAL
    assert flow.destination not in state.service.cluster_ips


@pytest.mark.parametrize("flow", [f for f in ROWS if f.userspace == TABLE], ids=lambda f: f.id)
def test_a_table_row_is_a_table_balanced_service(flow: Flow) -> None:
    """TABLE rows: Maglev, or weights under the default algorithm; no Forwarder row is one."""
    assert table_balanced(owner(flow).service, "random")
    assert isinstance(flow.expect, Hashed)


def test_no_forwarder_row_is_table_balanced() -> None:
    assert not [f.id for f in ROWS if isinstance(f.userspace, Forwarder) and table_balanced(owner(f).service, "random")]


def test_every_pick_chain_kind_has_a_row_of_who_decided() -> None:
    """cluster, external (LoadBalancer and external IPs), NodePort, Local policy, affinity, both families."""
    decided = [f for f in ROWS if f.userspace is not None]
    assert {f.source for f in decided} >= {"client", "node", "pod1", "pod2", "pod4"}
    assert any(isinstance(f.expect, flows.Sticky) and isinstance(f.userspace, Forwarder) for f in decided)
    assert any(":" in f.destination and isinstance(f.userspace, Forwarder) for f in decided)
    assert any(f.userspace == KERNEL for f in decided)


def test_the_client_sends_from_many_addresses_of_its_own_network() -> None:
    plan = flows.LAB_PLAN
    assert len(set(plan.client_sources)) == len(set(plan.client_sources6)) == flows.CLIENT_ADDRESSES + 1
    assert (plan.client_sources[0], plan.client_sources6[0]) == (flows.CLIENT, flows.CLIENT6)
    assert all(ip in plan.client.network for ip in map(ipaddress.ip_address, plan.client_sources))
    assert plan.client_sources[1:3] == ("192.168.50.100", "192.168.50.101")
    assert plan.client_sources6[1:3] == ("fd00:50::100", "fd00:50::101")
    assert AddressPlan().client_sources == ("192.168.50.2",)
    with pytest.raises(ValueError, match="client_aliases"):
        AddressPlan(client_aliases=200)
