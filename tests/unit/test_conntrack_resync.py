"""least-conn after lost conntrack events: the counts a dump brings back (pure: the real balancer, no sockets).

Address plan
    client      192.168.50.2, a flow per source port
    ClusterIP   10.96.0.10:80/TCP, least-conn
    endpoints   10.244.1.11 (id 1), 10.244.1.12 (id 2), 10.244.1.13 (id 3), port 80
"""

from __future__ import annotations

import socket

from dataplane.lb.balancer import Balancer, FlowEnded, FlowStarted, ServicesChanged
from dataplane.lb.policy import PortTable, Target
from dataplane.netlink.ctevents import CtEvent
from dataplane.packet import Flow
from dataplane.queue.forwarder import resync_events

ENDPOINTS = {1: "10.244.1.11", 2: "10.244.1.12", 3: "10.244.1.13"}
TABLE = PortTable("default/web:http", 6, (socket.inet_aton("10.96.0.10"),), 80, None,
                  tuple(Target(i, ip, 80) for i, ip in ENDPOINTS.items()), "least-conn", None)


def flow(flow_id: int, endpoint: int) -> CtEvent:
    """Conntrack's word for flow `flow_id`: from the client's port 40000 + id to the ClusterIP, answered by `endpoint`."""
    return CtEvent("new", flow_id, Flow(4, 6, socket.inet_aton("192.168.50.2"), socket.inet_aton("10.96.0.10"),
                                        40000 + flow_id, 80), (socket.inet_aton(ENDPOINTS[endpoint]), 80))


def balancer_following(*events: CtEvent) -> Balancer:
    balancer = Balancer()
    balancer.handle(ServicesChanged({("default", "web"): (TABLE,)}))
    for event in events:
        balancer.handle(FlowStarted(event.flow_id, event.flow, event.endpoint))
    return balancer


def active(balancer: Balancer) -> dict[int, int]:
    return {t: n for t, n in balancer.ports["default/web:http"].active.items() if n}


def resync(balancer: Balancer, dumped: list[CtEvent], known: set[int], ended: set[int] = frozenset()) -> list:
    events = resync_events(dumped, known, balancer.flows, set(ended))
    for event in events:
        balancer.handle(event)
    return events


def test_a_flow_whose_end_was_lost_is_ended_by_the_dump():
    balancer = balancer_following(flow(1, 1), flow(2, 1), flow(3, 2))
    # flow 2's DESTROY was in the overflow: without a dump it would count on endpoint 1 forever
    events = resync(balancer, [flow(1, 1), flow(3, 2)], known=set(balancer.flows))
    assert events == [FlowEnded(2)]
    assert active(balancer) == {1: 1, 2: 1}


def test_a_flow_whose_start_was_lost_is_counted_from_the_dump():
    balancer = balancer_following(flow(1, 1))
    resync(balancer, [flow(1, 1), flow(4, 3)], known=set(balancer.flows))
    assert active(balancer) == {1: 1, 3: 1}


def test_what_happened_while_the_dump_ran_is_kept():
    balancer = balancer_following(flow(1, 1), flow(2, 2))
    known = set(balancer.flows)  # the dump begins
    balancer.handle(FlowStarted(5, flow(5, 3).flow, flow(5, 3).endpoint))  # began after the dump passed it
    balancer.handle(FlowEnded(1))  # ended after the dump listed it
    resync(balancer, [flow(1, 1), flow(2, 2)], known, ended={1})
    assert active(balancer) == {2: 1, 3: 1}


def test_a_dump_that_agrees_changes_nothing():
    balancer = balancer_following(flow(1, 1), flow(2, 2), flow(3, 3))
    assert resync(balancer, [flow(1, 1), flow(2, 2), flow(3, 3)], known=set(balancer.flows)) == []
    assert active(balancer) == {1: 1, 2: 1, 3: 1}
