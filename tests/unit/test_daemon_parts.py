"""Health reporting (read from the sync schedule) and stale-flow detection: the daemon's pure parts."""

from __future__ import annotations

import json

from dataplane.daemon.app import Health
from dataplane.daemon.schedule import Schedule
from dataplane.daemon.proxier import stale_flows
from dataplane.model import Backend, Protocol, Service, ServicePort, ServiceState, Snapshot
from dataplane.netlink.conntrack import StaleFlows


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health(stale_after: float = 30.0) -> tuple[Health, Schedule, Clock]:
    clock = Clock()
    schedule = Schedule(min_interval=1.0, full_interval=300.0)
    return Health(schedule, stale_after=stale_after, clock=clock, wall=lambda: 1_800_000_000.0), schedule, clock


def test_health_is_503_until_the_first_sync_is_live() -> None:
    probe, schedule, clock = health()
    schedule.request(clock.now)
    assert probe.report()[0] == 503
    schedule.ran(clock.now, True, True, schedule.pending_since, ended=clock.now + 0.5)
    status, kind, body = probe.report()
    assert (status, kind) == (200, "application/json")
    assert json.loads(body)["nodeEligible"] is True


def test_health_reports_wall_times_of_the_schedule_s_monotonic_stamps() -> None:
    probe, schedule, clock = health()
    schedule.ran(clock.now, True, True, None, ended=clock.now)
    clock.now += 10
    schedule.request(clock.now - 4)
    body = json.loads(probe.report()[2])
    assert body["currentTime"] == "2027-01-15T08:00:00Z"
    assert body["lastUpdated"] == "2027-01-15T07:59:50Z"
    assert body["pendingSince"] == "2027-01-15T07:59:56Z"


def test_health_turns_503_on_a_failed_sync_and_back_on_success() -> None:
    probe, schedule, clock = health()
    schedule.ran(clock.now, True, True, None)
    schedule.request(clock.now)
    schedule.ran(clock.now, False, False, schedule.pending_since)
    assert probe.report()[0] == 503
    schedule.ran(clock.now, True, True, schedule.pending_since)
    assert probe.report()[0] == 200


def test_health_turns_503_when_a_periodic_full_sync_fails_with_nothing_pending() -> None:
    probe, schedule, clock = health()
    schedule.ran(clock.now, True, True, None)
    clock.now += 300
    schedule.ran(clock.now, True, False, None)
    assert schedule.pending_since is None and probe.report()[0] == 503


def test_health_turns_503_when_a_change_waits_too_long() -> None:
    probe, schedule, clock = health(stale_after=30)
    schedule.ran(clock.now, True, True, None)
    schedule.request(clock.now)
    clock.now += 31
    assert probe.report()[0] == 503


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


def test_port_turning_from_tcp_to_udp_clears_untranslated_flows() -> None:
    old = Snapshot({("default", "dns"): _state(Protocol.TCP, "10.244.1.1")})
    new = Snapshot({("default", "dns"): _state(Protocol.UDP, "10.244.1.1")})
    assert stale_flows(old, new) == (StaleFlows("UDP", "10.96.0.10", 53, "frontend"),)


def test_udp_port_beside_tcp_ports_is_still_checked() -> None:
    service = Service("default", "dns", cluster_ips=("10.96.0.10",),
                      ports=(ServicePort("tcp", Protocol.TCP, 53, 53), ServicePort("udp", Protocol.UDP, 53, 53)))
    both = (Backend("10.244.1.1", 53), Backend("10.244.1.2", 53))
    old = Snapshot({("default", "dns"): ServiceState(service, (both, both))})
    new = Snapshot({("default", "dns"): ServiceState(service, (both[:1], both[:1]))})
    assert stale_flows(old, new) == (StaleFlows("UDP", "10.244.1.2", 53),)


def test_health_keeps_a_change_queued_during_a_sync_pending() -> None:
    probe, schedule, clock = health(stale_after=30)
    schedule.ran(clock.now, True, True, None)
    schedule.request(clock.now)
    started, pending = clock.now + 1, schedule.pending_since  # the sync takes its snapshot
    clock.now += 1.5
    schedule.request(clock.now)  # a newer change arrives while it runs
    schedule.ran(started, False, True, pending, ended=clock.now)
    assert schedule.pending_since == clock.now
    clock.now += 31
    assert probe.report()[0] == 503


def test_a_partial_sync_runs_on_the_loop_only_when_its_work_is_small(tmp_path) -> None:
    # On the loop, a sync holds DNS and health answers back for as long as it takes: a few
    # changed Services of a few endpoints, yes; one of thousands of endpoints (100 ms+), no.
    import asyncio
    import threading

    from dataplane.config import NodeSettings
    from dataplane.daemon.app import Daemon, Options
    from dataplane.lab.manifests import ManifestDir, endpoint_slice, port, service
    from dataplane.nat.fake import FakeNftables

    def web(endpoints: int, first: str) -> list[dict]:
        addresses = [first] + [f"10.244.{i // 250}.{i % 250 + 1}" for i in range(1, endpoints)]
        return [service("web", "10.96.0.10", [port("http", 80)])] + [
            endpoint_slice("web", addresses[i:i + 100], [("http", 80, "TCP")], name=f"web-{i}")
            for i in range(0, endpoints, 100)]

    manifests = ManifestDir(tmp_path / "manifests")
    manifests.write("small.yaml", [service("small", "10.96.0.11", [port("http", 80)]),
                                   endpoint_slice("small", ["10.245.0.1"], [("http", 80, "TCP")])])
    manifests.write("web.yaml", web(3000, "10.246.0.1"))
    daemon = Daemon(Options(source=manifests.path, settings=NodeSettings(node_name="node1")), FakeNftables())
    threads: list[bool] = []
    program = daemon._program
    daemon._program = lambda *args: threads.append(threading.current_thread() is threading.main_thread()) \
        or program(*args)  # type: ignore[method-assign]

    async def scenario() -> None:
        daemon.source.load_all()
        daemon.changed("start")
        assert await daemon.loop.step(True)
        manifests.write("small.yaml", [service("small", "10.96.0.11", [port("http", 80)]),
                                       endpoint_slice("small", ["10.245.0.2"], [("http", 80, "TCP")])])
        daemon.source.load_all()
        daemon.changed("small")
        assert await daemon.loop.step(False)
        manifests.write("web.yaml", web(3000, "10.246.0.2"))  # one endpoint of 3,000 changed
        daemon.source.load_all()
        daemon.changed("web")
        assert await daemon.loop.step(False)

    asyncio.run(scenario())
    assert threads == [False, True, False]  # full: a thread; small: the loop; large: a thread


def test_rendering_ahead_while_loading_leaves_the_first_sync_the_same_transaction(tmp_path, monkeypatch) -> None:
    # Issue 14: while the parser process is behind, the daemon renders what has loaded; the first
    # sync then renders only the rest, and must send exactly what rendering everything would.
    import asyncio

    from dataplane.config import NodeSettings
    from dataplane.daemon import app
    from dataplane.daemon.app import Daemon, Options
    from dataplane.lab.manifests import ManifestDir, endpoint_slice, port, service
    from dataplane.nat.fake import FakeNftables
    from dataplane.sync.reader import ParserProcess

    manifests = ManifestDir(tmp_path / "manifests")
    for i in range(12):
        protocol = "UDP" if i % 3 == 0 else "TCP"
        manifests.write(f"svc-{i:02}.yaml", [
            service(f"svc-{i}", f"10.96.0.{i + 10}", [port("p", 53, protocol=protocol, node_port=30000 + i)],
                    type="NodePort"),
            endpoint_slice(f"svc-{i}", [f"10.244.{i}.{j + 1}" for j in range(i % 4)], [("p", 53, protocol)])])
    monkeypatch.setattr(app, "RENDER_AHEAD_FILES", 5)

    class Recording(FakeNftables):
        def apply(self, tx) -> None:
            self.sent = str(tx)
            super().apply(tx)

    def first_sync(parser_behind: bool) -> tuple[str, list[int]]:
        monkeypatch.setattr(ParserProcess, "_answer_ready", lambda self: not parser_behind)
        nft = Recording()
        daemon = Daemon(Options(source=manifests.path, settings=NodeSettings(node_name="node1")), nft)
        daemon.node_ips = ("192.168.50.1",)
        rendered: list[int] = []  # Services each ip-family render took
        builder = daemon.proxier.builders[0]
        build = builder.build
        builder.build = lambda snapshot, ips: rendered.append(len(snapshot.changed or snapshot.services)) \
            or build(snapshot, ips)  # type: ignore[method-assign]

        async def scenario() -> None:
            daemon.load_manifests()
            daemon.changed("start")
            assert await daemon.loop.step(True)

        asyncio.run(scenario())
        daemon.source.close()
        assert daemon._rendered_ahead is None  # let go once the first sync is done
        return nft.sent, rendered

    everything, rendered = first_sync(parser_behind=False)
    assert rendered == [12]
    ahead, rendered = first_sync(parser_behind=True)
    assert rendered == [5, 5, 2]  # after 5 and 10 files; the first sync: the last 2
    assert ahead == everything
