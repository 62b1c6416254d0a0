"""Health reporting and stale-flow detection: the daemon's pure parts."""

from __future__ import annotations

import json

from dataplane.daemon.app import Health
from dataplane.daemon.proxier import stale_flows
from dataplane.model import Backend, Protocol, Service, ServicePort, ServiceState, Snapshot
from dataplane.netlink.conntrack import StaleFlows


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_health_is_503_until_the_first_sync_is_live() -> None:
    clock = Clock()
    health = Health(stale_after=30, clock=clock)
    health.queued()
    assert health.report()[0] == 503
    health.synced(True, health.pending_since)
    status, kind, body = health.report()
    assert (status, kind) == (200, "application/json")
    assert json.loads(body)["nodeEligible"] is True


def test_health_turns_503_on_a_failed_sync_and_back_on_success() -> None:
    clock = Clock()
    health = Health(clock=clock)
    health.synced(True, None)
    health.queued()
    health.synced(False, health.pending_since)
    assert health.report()[0] == 503
    health.synced(True, health.pending_since)
    assert health.report()[0] == 200


def test_health_turns_503_when_a_change_waits_too_long() -> None:
    clock = Clock()
    health = Health(stale_after=30, clock=clock)
    health.synced(True, None)
    health.queued()
    clock.now += 31
    assert health.report()[0] == 503


def _state(protocol: Protocol, *ips: str, ready: bool = True) -> ServiceState:
    service = Service("default", "dns", cluster_ips=("10.96.0.10",), ports=(ServicePort("dns", protocol, 53, 53),))
    return ServiceState(service, (tuple(Backend(ip, 53, ready=ready, serving=ready) for ip in ips),))


def test_removed_udp_endpoint_is_stale() -> None:
    old = Snapshot({("default", "dns"): _state(Protocol.UDP, "10.244.1.1", "10.244.1.2")})
    new = Snapshot({("default", "dns"): _state(Protocol.UDP, "10.244.1.1")})
    assert stale_flows(old, new) == (StaleFlows("UDP", "10.244.1.2", 53),)


def test_service_scaled_to_zero_leaves_every_udp_endpoint_stale() -> None:
    old = Snapshot({("default", "dns"): _state(Protocol.UDP, "10.244.1.1", "10.244.1.2")})
    new = Snapshot({("default", "dns"): _state(Protocol.UDP)})
    assert {f.ip for f in stale_flows(old, new)} == {"10.244.1.1", "10.244.1.2"}


def test_deleted_service_leaves_its_udp_endpoints_stale() -> None:
    old = Snapshot({("default", "dns"): _state(Protocol.SCTP, "10.244.1.1")})
    assert stale_flows(old, Snapshot()) == (StaleFlows("SCTP", "10.244.1.1", 53),)


def test_tcp_endpoints_are_never_stale() -> None:
    old = Snapshot({("default", "dns"): _state(Protocol.TCP, "10.244.1.1")})
    assert stale_flows(old, Snapshot()) == ()


def test_endpoint_turning_unready_is_stale() -> None:
    old = Snapshot({("default", "dns"): _state(Protocol.UDP, "10.244.1.1")})
    new = Snapshot({("default", "dns"): _state(Protocol.UDP, "10.244.1.1", ready=False)})
    assert stale_flows(old, new) == (StaleFlows("UDP", "10.244.1.1", 53),)


def test_terminating_but_serving_endpoint_keeps_its_flows() -> None:
    service = Service("default", "dns", cluster_ips=("10.96.0.10",), ports=(ServicePort("dns", Protocol.UDP, 53, 53),))
    old = Snapshot({("default", "dns"): ServiceState(service, ((Backend("10.244.1.1", 53),),))})
    draining = Backend("10.244.1.1", 53, ready=False, serving=True, terminating=True)
    new = Snapshot({("default", "dns"): ServiceState(service, ((draining, Backend("10.244.1.2", 53)),))})
    assert [f for f in stale_flows(old, new) if f.kind == "endpoint"] == []


def test_udp_service_gaining_endpoints_clears_untranslated_flows() -> None:
    service = Service("default", "dns", cluster_ips=("10.96.0.10",), external_ips=("203.0.113.1",),
                      ports=(ServicePort("dns", Protocol.UDP, 53, 53, node_port=30053),))
    old = Snapshot({("default", "dns"): ServiceState(service, ((),))})
    new = Snapshot({("default", "dns"): ServiceState(service, ((Backend("10.244.1.1", 53),),))})
    assert set(stale_flows(old, new)) == {
        StaleFlows("UDP", "10.96.0.10", 53, "frontend"),
        StaleFlows("UDP", "203.0.113.1", 53, "frontend"),
        StaleFlows("UDP", "", 30053, "frontend"),
    }


def test_health_keeps_a_change_queued_during_a_sync_pending() -> None:
    clock = Clock()
    health = Health(stale_after=30, clock=clock)
    health.synced(True, None)
    health.queued()
    started = clock.now = clock.now + 1  # the sync takes its snapshot
    clock.now += 0.5
    health.queued()  # a newer change arrives while it runs
    health.synced(True, started)
    assert health.pending_since == clock.now
    clock.now += 31
    assert health.report()[0] == 503
