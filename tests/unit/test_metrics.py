"""Metrics and health as kube-proxy names and serves them (kube-proxy v1.34, nftables mode).

Address plan: Pods 10.244.0.0/16 (node-a 10.244.1.x, node-b 10.244.2.x), ClusterIPs 10.96.0.0/12.
"""

from __future__ import annotations

import asyncio
import json
import socket
import weakref
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.daemon import metrics as m
from dataplane.daemon.healthcheck import HealthCheckServers, ProxyHealth, go_time
from dataplane.model import (Backend, Endpoint, Protocol, Service, ServicePort, ServiceState, ServiceType, Snapshot,
                             TrafficPolicy)
from dataplane.model.endpoints import TRIGGER_TIME_ANNOTATION
from dataplane.sync.kube import parse_node

LIST = Path(__file__).resolve().parents[1] / "kubeproxy" / "metrics-v1.34.txt"


def kube_proxy_metrics() -> list[tuple[str, str, frozenset[str]]]:
    found = []
    for line in LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, kind, labels = line.split()
            found.append((name, kind, frozenset() if labels == "-" else frozenset(labels.split(","))))
    return found


def families(text: str) -> dict[str, tuple[str, set[frozenset[str]]]]:
    """name of each sample -> (family type, label-name sets seen)."""
    found: dict[str, tuple[str, set[frozenset[str]]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset(sample.labels) - {"le"}
            found.setdefault(sample.name, (family.type, set()))[1].add(labels)
    return found


def exposed_name(name: str, kind: str) -> str:
    return name + "_count" if kind == "histogram" else name


@pytest.mark.parametrize("name, kind, labels", kube_proxy_metrics(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_kube_proxy_metric_is_exposed_with_its_labels_from_the_start(name, kind, labels):
    found = families(generate_latest(m.Metrics().registry).decode())
    sample = exposed_name(name, kind)
    assert sample in found, f"{sample} missing"
    family_type, label_sets = found[sample]
    assert family_type == kind
    assert labels in label_sets, f"{name}: labels {label_sets}, want {set(labels)}"


def test_process_and_python_collectors_and_build_info():
    text = generate_latest(m.Metrics(feature_gates={"Gate": True}).registry).decode()
    names = families(text)
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info",
            "python_gc_objects_collected_total"} <= names.keys()
    assert 'kubernetes_feature_enabled{name="Gate",stage=""} 1.0' in text
    assert 'git_version="dataplane-' in text


def test_buckets_are_kube_proxys():
    assert m.SYNC_BUCKETS[0] == 0.001 and m.SYNC_BUCKETS[-1] == pytest.approx(16.384) and len(m.SYNC_BUCKETS) == 15
    assert m.PROGRAMMING_BUCKETS[:4] == (0.25, 0.5, 1, 2) and m.PROGRAMMING_BUCKETS[-1] == 300
    assert len(m.PROGRAMMING_BUCKETS) == 2 + 59 + 12 + 7


def test_network_programming_duration_from_the_trigger_time_annotation():
    metrics = m.Metrics()
    triggers = m.TriggerTimes(started=1000.0)
    metrics.triggers = triggers

    def slice_(stamp, family="IPv4"):
        return {"addressType": family, "metadata": {"annotations": {TRIGGER_TIME_ANNOTATION: stamp}}}

    triggers.record(slice_("1970-01-01T00:16:50Z"))  # 1010
    triggers.record(slice_("1970-01-01T00:16:55.5Z", "IPv6"))  # 1015.5
    triggers.record(slice_("1970-01-01T00:16:00Z"))  # 960: before the daemon started, skipped
    triggers.record(slice_("not a time"))
    triggers.record({"metadata": {}})
    batch = triggers.checkout()
    assert batch == [("IPv4", 1010.0), ("IPv6", 1015.5)]
    triggers.restore(batch)  # a failed sync keeps them owed
    assert triggers.checkout() == batch
    metrics.programmed(batch, now=1012.0)
    text = generate_latest(metrics.registry).decode()
    assert 'kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="2.0"} 1.0' in text
    assert 'kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="1.0"} 0.0' in text
    assert 'kubeproxy_network_programming_duration_seconds_sum{ip_family="IPv6"} 0.0' in text  # clock skew: 0


def web(policy_internal=TrafficPolicy.CLUSTER, policy_external=TrafficPolicy.CLUSTER, type=ServiceType.CLUSTER_IP,
        backends=(), name="web") -> ServiceState:
    service = Service("shop", name, type=type, cluster_ips=("10.96.0.1",), internal_traffic_policy=policy_internal,
                      external_traffic_policy=policy_external,
                      ports=(ServicePort("http", Protocol.TCP, 80, 8080, 31000 if type != ServiceType.CLUSTER_IP
                                         else None),))
    return ServiceState(service, (tuple(backends),))


REMOTE = Backend("10.244.2.1", 8080, node_name="node-b")
LOCAL = Backend("10.244.1.1", 8080, node_name="node-a")


@pytest.mark.parametrize("state, want", [
    (web(TrafficPolicy.LOCAL, backends=[REMOTE]), {("IPv4", "internal"): 1}),
    (web(TrafficPolicy.LOCAL, backends=[REMOTE, LOCAL]), {}),
    (web(TrafficPolicy.LOCAL, backends=[]), {}),  # no endpoints at all: not "no local" ones
    (web(policy_external=TrafficPolicy.LOCAL, type=ServiceType.NODE_PORT, backends=[REMOTE]),
     {("IPv4", "external"): 1}),
    (web(policy_external=TrafficPolicy.LOCAL, backends=[REMOTE]), {}),  # ClusterIP: no external traffic
])
def test_no_local_endpoints(state, want):
    counts = m.no_local_endpoints(Snapshot({state.service.key: state}), "node-a")
    assert {k: v for k, v in counts.items() if v} == want


def test_no_local_endpoints_kept_from_the_changes_equals_the_full_count():
    """The tracker recounts only the Services a snapshot says changed; the pure walk is the oracle."""
    tracker = m.NoLocalEndpoints()
    steps = [  # (name, state or None: gone); each step is one snapshot following the one before
        ("a", web(TrafficPolicy.LOCAL, backends=[REMOTE], name="a")),
        ("b", web(policy_external=TrafficPolicy.LOCAL, type=ServiceType.NODE_PORT, backends=[REMOTE], name="b")),
        ("a", web(TrafficPolicy.LOCAL, backends=[REMOTE, LOCAL], name="a")),  # a local endpoint now: not counted
        ("c", web(name="c")),
        ("b", None),
        ("a", web(TrafficPolicy.LOCAL, backends=[REMOTE], name="a")),
    ]
    snapshot = Snapshot()
    for name, state in steps:
        services = {key: value for key, value in snapshot.services.items() if key.name != name}
        if state is not None:
            services[state.service.key] = state
        changed = frozenset(key for key in services.keys() | snapshot.services.keys()
                            if services.get(key) != snapshot.services.get(key))
        snapshot = Snapshot(services, {}, weakref.ref(snapshot), changed)
        assert tracker.update(snapshot, "node-a") == m.no_local_endpoints(snapshot, "node-a")
    assert tracker.update(snapshot, "node-b") == m.no_local_endpoints(snapshot, "node-b")  # another node: recounted
    unrelated = Snapshot(dict(snapshot.services))  # no lineage: recounted
    assert tracker.update(unrelated, "node-b") == m.no_local_endpoints(unrelated, "node-b")


def test_change_counters_split_service_and_endpoint_changes_and_pending_follows_the_kernel():
    metrics = m.Metrics()
    tracker = metrics.changes
    states = {}
    synced = Snapshot()
    first = web(backends=[REMOTE])
    key = first.service.key
    states[key] = first
    tracker.changed([key], states.get, synced)
    assert _value(metrics, "kubeproxy_sync_proxy_rules_service_changes_total") == 1
    assert _value(metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1
    assert _value(metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1
    synced = Snapshot({key: first})
    tracker.synced(states.get, synced)
    assert _value(metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    assert _value(metrics, "kubeproxy_sync_proxy_rules_service_changes_pending") == 0
    states[key] = web(backends=[REMOTE, LOCAL])  # endpoints only
    tracker.changed([key], states.get, synced)
    assert _value(metrics, "kubeproxy_sync_proxy_rules_service_changes_total") == 1
    assert _value(metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 2
    assert _value(metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1
    states[key] = first  # changed back before a sync: nothing pending
    tracker.changed([key], states.get, synced)
    assert _value(metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0


def _value(metrics: m.Metrics, name: str, labels: dict | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, name
    return value


# ---- /healthz and /livez

class Clock:
    now = 1_700_000_000.0

    def __call__(self):
        return self.now


def test_healthz_and_livez_bodies_as_kube_proxys():
    clock = Clock()
    metrics = m.Metrics()
    state = {"healthy": True, "last": clock.now - 5}
    health = ProxyHealth(lambda: (state["healthy"], state["last"]), metrics.healthz, metrics.livez, clock)
    status, kind, body, headers = health.healthz()
    assert (status, kind, headers) == (200, "application/json", {"X-Content-Type-Options": "nosniff"})
    stamp = go_time(clock.now)
    assert body.decode() == f'{{"lastUpdated": "{stamp}","currentTime": "{stamp}", "nodeEligible": true}}'
    assert json.loads(body) == {"lastUpdated": stamp, "currentTime": stamp, "nodeEligible": True}
    state["healthy"] = False
    status, _, body, _ = health.livez()
    assert status == 503 and json.loads(body) == {"lastUpdated": go_time(clock.now - 5), "currentTime": stamp}
    assert _value(metrics, "kubeproxy_proxy_healthz_total", {"code": "200"}) == 1
    assert _value(metrics, "kubeproxy_proxy_livez_total", {"code": "503"}) == 1


def test_go_time_prints_as_go_does():
    assert go_time(0.5) == "1970-01-01 00:00:00.5 +0000 UTC"
    assert go_time(86400) == "1970-01-02 00:00:00 +0000 UTC"
    assert go_time(None) == "0001-01-01 00:00:00 +0000 UTC"


def node(**extra) -> dict:
    obj = {"metadata": {"name": "node-a"}, "spec": {}, "status": {}}
    for key, value in extra.items():
        (obj["metadata"] if key == "deletionTimestamp" else obj["spec"])[key] = value
    return obj


@pytest.mark.parametrize("obj, eligible", [
    (node(), True),
    (node(taints=[{"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]), False),
    (node(taints=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]), True),  # cordoned only
    (node(deletionTimestamp="2026-12-02T07:00:00Z"), False),
])
def test_node_eligibility_turns_healthz_503_but_not_livez(obj, eligible):
    health = ProxyHealth(lambda: (True, 1.0))
    health.sync_node(parse_node(obj))
    assert health.eligible is eligible
    assert health.healthz()[0] == (200 if eligible else 503)
    assert json.loads(health.healthz()[2])["nodeEligible"] is eligible
    assert health.livez()[0] == 200


def test_a_node_deleted_after_being_seen_is_not_eligible_but_unknown_at_start_is():
    health = ProxyHealth(lambda: (True, 1.0))
    health.sync_node(None)
    assert health.eligible
    health.sync_node(parse_node(node()))
    health.sync_node(None)
    assert not health.eligible


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_check_node_ports_answer_503_while_the_proxy_is_unhealthy():
    port = free_port()
    healthy = {"now": True}
    service = Service("shop", "lb", type=ServiceType.LOAD_BALANCER, cluster_ips=("10.96.0.1",),
                      health_check_node_port=port, external_traffic_policy=TrafficPolicy.LOCAL,
                      ports=(ServicePort("http", Protocol.TCP, 80, 8080, 31000),))
    snapshot = Snapshot({service.key: ServiceState(service, ((),), (Endpoint("10.244.1.1", node_name="node-a"),))})

    async def get() -> tuple[int, dict]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await reader.read()
        writer.close()
        head, _, body = raw.decode().partition("\r\n\r\n")
        assert "X-Content-Type-Options: nosniff" in head
        return int(head.split()[1]), json.loads(body)

    async def scenario():
        servers = HealthCheckServers("node-a", healthy=lambda: healthy["now"])
        await servers.update(snapshot, ("127.0.0.1",))  # the node addresses: here, loopback
        assert await get() == (200, {"service": {"namespace": "shop", "name": "lb"}, "localEndpoints": 1,
                                     "serviceProxyHealthy": True})
        healthy["now"] = False
        status, body = await get()
        assert status == 503 and body["serviceProxyHealthy"] is False and body["localEndpoints"] == 1
        servers.close()

    asyncio.run(scenario())


def test_kernel_status_lists_each_service_port_with_addresses_and_local_endpoints():
    from dataplane.daemon.status import format_kernel_status, kernel_status

    state = web(TrafficPolicy.LOCAL, backends=[REMOTE, LOCAL, Backend("10.244.1.2", 8080, serving=False,
                                                                        node_name="node-a")],
                type=ServiceType.NODE_PORT)
    body = kernel_status(Snapshot({state.service.key: state}), "node-a", {"syncs": 3})
    (entry,) = body["services"]
    assert entry["addresses"] == ["10.96.0.1:80", "nodes:31000"]
    assert (entry["endpoints"], entry["serving"], entry["local"]) == (3, 2, ["10.244.1.1:8080"])
    lines = []
    format_kernel_status(body, lines.append)
    assert lines == ["mode kernel on node-a: syncs 3",
                     "shop/web:http/TCP  NodePort  internalTrafficPolicy Local",
                     "    addresses  10.96.0.1:80, nodes:31000",
                     "    endpoints  3 (2 serving), 1 on this node: 10.244.1.1:8080"]


def test_figures_for_status():
    metrics = m.Metrics()
    metrics.synced(0.01, True, Snapshot(), "node-a")
    metrics.sync_failed()
    assert metrics.figures() == {"services_programmed": 0, "endpoint_entries": 0, "syncs": 1, "sync_failures": 1,
                                 "conntrack_entries_deleted": 0}


def test_dns_metrics_count_queries_by_type_and_rcode_and_time_them():
    import collections
    from types import SimpleNamespace

    import dns.message
    import dns.rcode
    from prometheus_client import CollectorRegistry

    query = dns.message.make_query("web.shop.svc.cluster.local", "AAAA")
    nxdomain = dns.message.make_response(query)
    nxdomain.set_rcode(dns.rcode.NXDOMAIN)
    forward = object()

    class Responder:
        def handle(self, wire, tcp):
            return SimpleNamespace(wire=nxdomain.to_wire()) if not tcp else forward

        def relay(self, command, upstream):
            return dns.message.make_response(query).to_wire()

    server = SimpleNamespace(responder=Responder(), stats=collections.Counter(udp=2))
    registry = CollectorRegistry()
    m.DnsMetrics(registry).attach(server)
    server.responder.handle(query.to_wire(), False)
    command = server.responder.handle(query.to_wire(), True)
    server.responder.relay(command, None)
    sample = registry.get_sample_value
    assert sample("dataplane_dns_queries_total", {"type": "AAAA", "rcode": "NXDOMAIN"}) == 1
    assert sample("dataplane_dns_queries_total", {"type": "AAAA", "rcode": "NOERROR"}) == 1
    assert sample("dataplane_dns_forwarded_queries_total") == 1
    assert sample("dataplane_dns_answer_duration_seconds_count", {"forwarded": "true"}) == 1
    assert sample("dataplane_dns_answer_duration_seconds_count", {"forwarded": "false"}) == 1
    assert sample("dataplane_dns_server_events", {"event": "udp"}) == 2
    assert m.query_type(b"\x00" * 5) == "other" and m.response_code(b"") == "other"


DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dataplane.json"


def test_the_grafana_dashboard_is_importable_and_queries_only_exported_metrics():
    """The unit half of the check (the e2e half scrapes a live daemon): names and grouping labels."""
    import re

    from dataplane.sync.kube import KubeMetrics

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "job", "instance"}
    metrics = m.Metrics()
    m.DnsMetrics(metrics.registry)
    kube = KubeMetrics(metrics.registry, lambda: 0.0)
    kube.events.labels("Service", "ADDED").inc()
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for name in re.findall(r"\b((?:kubeproxy|dataplane|process|python|kubernetes)_\w+)", expr):
                assert name in names, f"{name} in {panel['title']!r}"
                for group in re.findall(r"by \(([^)]*)\)", expr):
                    wanted = {label.strip() for label in group.split(",")} - {"le", "instance", "job"}
                    assert wanted <= names[name] | {"le"}, f"{expr}: {wanted - names[name]}"
