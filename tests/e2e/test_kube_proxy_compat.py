"""dataplane as a drop-in kube-proxy: started from kubeadm's config file, scraped and probed as kube-proxy is.

One daemon runs `dataplane run --config FILE --hostname-override node1`, where FILE
is tests/kubeproxy/kubeadm-config.conf (config.conf as kubeadm writes it) with
these fields changed, each checked below for its effect: clientConnection.kubeconfig
(a kubeconfig for the stand-in API server), healthzBindAddress (a bare IP: port
10256), mode nftables with nftables.masqueradeBit, logging.format json,
oomScoreAdj, conntrack timeouts (written in the node namespace), and our own
extension document (the built-in DNS). The lab and the stand-in API server are
kube_lab.py's (the `lab` and `api` fixtures of conftest.py).

Address plan (the rest is kube_lab.py's)
    node            DNS 127.0.0.1:5353
    ClusterIPs      10.96.6.10 web, 10.96.6.20 trigger, 10.96.6.30 lb (NodePort 30631, health 32631)
"""

from __future__ import annotations

import json
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import dns.message
import pytest
import yaml

from dataplane.lab import Daemon, Lab, environment_problem, http_get, wait_until
from dataplane.lab.daemon import dataplane_executable
from dataplane.lab.kubeapi import kubeconfig
from dataplane.lab.manifests import endpoint_slice, port, service
from kube_lab import ALL, NODE_IP, POD_IPS, answering, node_object
from tests.kubeproxy import scrape

PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]

ROOT = Path(__file__).resolve().parents[2]
KUBEADM = ROOT / "tests" / "kubeproxy" / "kubeadm-config.conf"


def web(name: str, cluster_ip: str, annotations: dict | None = None) -> list[dict]:
    slice_ = endpoint_slice(name, sorted(POD_IPS.values()), [("http", 80, "TCP")])
    if annotations:
        slice_["metadata"]["annotations"] = annotations
    return [service(name, cluster_ip, [port("http", 80)]), slice_]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kube-proxy")
    (folder / "kubeconfig.conf").write_text(kubeconfig("http://127.0.0.1:6443"))
    conf = yaml.safe_load(KUBEADM.read_text())
    conf["clientConnection"]["kubeconfig"] = str(folder / "kubeconfig.conf")
    conf["healthzBindAddress"] = "127.0.0.1"  # a bare IP takes kube-proxy's port, 10256
    conf["mode"] = "nftables"
    conf["nftables"]["masqueradeBit"] = 12
    conf["logging"]["format"] = "json"
    conf["oomScoreAdj"] = 321  # raised: lowering it needs CAP_SYS_RESOURCE
    conf["conntrack"]["udpTimeout"] = "47s"
    conf["conntrack"]["tcpEstablishedTimeout"] = "2h"
    extension = {"apiVersion": "dataplane.io/v1alpha1", "kind": "DataplaneConfiguration",
                 "dns": {"bindAddress": "127.0.0.1:5353", "upstream": ["127.0.0.1:9"]}}
    path = folder / "config.conf"
    path.write_text(yaml.safe_dump(conf) + "---\n" + yaml.safe_dump(extension))
    return path


@pytest.fixture(scope="module")
def daemon(lab, api, config, tmp_path_factory):
    log = tmp_path_factory.mktemp("daemon") / "dataplane.log"
    argv = [dataplane_executable(), "run", "--config", str(config), "--hostname-override", "node1"]
    with Daemon(lab.node, log, argv) as daemon:
        yield daemon


def metrics(lab: Lab) -> str:
    status, body = http_get(lab.node, "127.0.0.1", 10249, "/metrics")
    assert status == 200
    return body.decode()


def test_kubeadms_config_starts_the_daemon_and_its_fields_take_effect(lab, api, daemon):
    for obj in web("web", "10.96.6.10"):
        api.apply(obj)
    wait_until(lambda: answering(lab, "10.96.6.10") == ALL, timeout=10, what="web serves")
    sysctl = lambda name: lab.node.run("sysctl", "-n", name).stdout.strip()  # noqa: E731
    assert sysctl("net.netfilter.nf_conntrack_udp_timeout") == "47"
    assert sysctl("net.netfilter.nf_conntrack_tcp_timeout_established") == "7200"
    assert Path(f"/proc/{daemon.process.pid}/oom_score_adj").read_text().strip() == "321"
    # masqueradeBit 12 of the nftables section (nft prints marks zero-padded)
    assert re.search(r"meta mark \| 0x0*1000\b", lab.node.ruleset())
    lines = [line for line in daemon.log_text().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert entries and all({"ts", "level", "logger", "msg"} <= e.keys() for e in entries)
    sync = next(e for e in entries if "sync:" in e["msg"])
    assert isinstance(sync["commands"], int) and isinstance(sync["services"], int)  # figures as keys
    assert any("kernel mode" in e["msg"] for e in entries)


def test_status_in_kernel_mode_shows_each_service_port(lab, api, daemon):
    for obj in web("web", "10.96.6.10"):
        api.apply(obj)
    wait_until(lambda: answering(lab, "10.96.6.10") == ALL, timeout=10, what="web serves")
    done = lab.node.run(dataplane_executable(), "status")
    assert done.stdout.startswith("mode kernel on node1:")
    lines = done.stdout.splitlines()
    at = lines.index("default/web:http/TCP  ClusterIP")
    assert lines[at + 1].strip() == "addresses  10.96.6.10:80"
    assert lines[at + 2].strip().startswith("endpoints  3 (3 serving), 3 on this node: 10.244.1.11:80")
    body = json.loads(lab.node.run(dataplane_executable(), "status", "--json").stdout)
    (entry,) = [s for s in body["services"] if s["service"] == "default/web:http/TCP"]
    assert entry["endpoints"] == 3 and body["syncs"] >= 1


def test_every_kube_proxy_metric_on_a_live_daemon(lab, api, daemon):
    """kube-proxy v1.34's nftables-mode families (tests/kubeproxy/metrics-v1.34.txt), each with
    its type's samples and exactly its labels, and its histograms' buckets (buckets-v1.34.txt)."""
    samples = scrape.exposed(metrics(lab))
    for name, kind, labels in scrape.metric_list():
        suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
        for sample_name in (name + suffix for suffix in suffixes):
            assert sample_name in samples, f"{sample_name} not on /metrics"
            for label_set in samples[sample_name]:
                assert set(label_set) - {"le"} == labels, f"{sample_name}: labels {sorted(label_set)}"
    for name, bounds in scrape.bucket_list().items():
        seen = {float(s["le"]) for s in samples[name + "_bucket"] if s.get("ip_family") == "IPv4"}
        assert seen == {*bounds, float("inf")}, f"{name}: buckets {sorted(seen)}"
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= samples.keys()


def test_network_programming_duration_from_the_endpointslice_trigger_time(lab, api, daemon):
    before = _sample(metrics(lab), 'kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"}')
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for obj in web("trigger", "10.96.6.20", {"endpoints.kubernetes.io/last-change-trigger-time": stamp}):
        api.apply(obj)
    wait_until(lambda: answering(lab, "10.96.6.20") == ALL, timeout=10, what="trigger serves")
    wait_until(lambda: _sample(metrics(lab), 'kubeproxy_network_programming_duration_seconds_count'
                                             '{ip_family="IPv4"}') > before, timeout=5, what="a programming sample")
    # Whole-second trigger times: the sample is below 2 s (the change is live well within 1 s).
    assert _sample(metrics(lab), 'kubeproxy_network_programming_duration_seconds_bucket'
                                 '{ip_family="IPv4",le="2.0"}') > before


def test_every_grafana_query_resolves_on_a_live_daemon(lab, api, daemon):
    """Every query of deploy/grafana/dataplane.json (panels and template variables): each metric
    it names is on a live daemon's /metrics with each label it matches on or groups by."""
    query = dns.message.make_query("web.default.svc.cluster.local", "A")
    with lab.node.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(query.to_wire(), ("127.0.0.1", 5353))
        answer = dns.message.from_wire(sock.recv(512))
    assert answer.rcode() == 0 and "10.96.6.10" in answer.to_text()
    text = metrics(lab)
    dashboard = scrape.load_dashboard()
    assert len(scrape.dashboard_queries(dashboard)) >= 30
    assert scrape.dashboard_problems(dashboard, scrape.exposed(text)) == []
    assert 'dataplane_dns_queries_total{rcode="NOERROR",type="A"}' in text


def test_a_node_marked_for_deletion_turns_healthz_503_with_traffic_still_flowing(lab, api, daemon):
    for obj in web("web", "10.96.6.10"):
        api.apply(obj)
    taint = {"key": "ToBeDeletedByClusterAutoscaler", "value": str(int(time.time())), "effect": "NoSchedule"}
    api.apply(node_object(taints=[taint]))
    try:
        wait_until(lambda: daemon.health() == 503, timeout=10, what="/healthz 503 for a node marked for deletion")
        status, body = http_get(lab.node, "127.0.0.1", 10256, "/healthz")
        assert status == 503 and json.loads(body)["nodeEligible"] is False
        status, body = http_get(lab.node, "127.0.0.1", 10256, "/livez")
        assert status == 200 and "nodeEligible" not in json.loads(body)
        assert answering(lab, "10.96.6.10") == ALL, "real packets keep flowing while the node drains"
        text = metrics(lab)
        assert _sample(text, 'kubeproxy_proxy_healthz_total{code="503"}') >= 1
    finally:
        api.apply(node_object())
    wait_until(lambda: daemon.health() == 200, timeout=10, what="/healthz 200 once the taint is gone")
    status, body = http_get(lab.node, "127.0.0.1", 10256, "/healthz")
    assert json.loads(body)["nodeEligible"] is True


def test_health_check_node_port_on_the_node_addresses(lab, api, daemon):
    lb = service("lb", "10.96.6.30", [port("http", 80, node_port=30631)], type="LoadBalancer",
                 externalTrafficPolicy="Local", healthCheckNodePort=32631)
    api.apply(lb)
    api.apply(endpoint_slice("lb", sorted(POD_IPS.values()), [("http", 80, "TCP")]))

    def probe():
        try:
            return http_get(lab.client, NODE_IP, 32631, "/")
        except OSError:
            return None

    wait_until(lambda: probe() is not None, timeout=10, what="healthCheckNodePort 32631 on the node address")
    status, body = probe()
    assert status == 200 and body == (b'{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "lb"\n\t},\n'
                                      b'\t"localEndpoints": 3,\n\t"serviceProxyHealthy": true\n}')  # kube-proxy's bytes
    with pytest.raises(OSError):  # as kube-proxy's: the node addresses, not every address
        http_get(lab.node, "127.0.0.1", 32631, "/")


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not on /metrics"
    return float(match.group(1))
