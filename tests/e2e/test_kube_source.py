"""`dataplane run --source kube` end to end: the stand-in API server, the real client, real packets.

The lab and the stand-in API server are kube_lab.py's (the `lab` and `api`
fixtures of conftest.py); the daemon reaches the API server with
`--master http://127.0.0.1:6443`. Each test owns its Services.

Address plan (the rest is kube_lab.py's)
    ClusterIPs      10.96.5.10 follow, 10.96.5.20 cut, 10.96.5.30-31 gone, 10.96.5.40 restart,
                    10.96.5.50-51 invalid, 10.96.5.60 started-unreachable, 10.96.5.70 nodeport (30170)
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from dataplane.lab import Daemon, Lab, environment_problem, tcp_request, wait_until
from dataplane.lab.daemon import run_argv
from dataplane.lab.kubeapi import KubeApi
from dataplane.lab.manifests import endpoint_slice, port, service
from kube_lab import ALL, API, NODE_IP, POD_IPS, answering, stand_in_api

PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]


def web(name: str, cluster_ip: str, pods=ALL, **fields) -> list[dict]:
    """A Service http 80/TCP, dns 53/UDP and its EndpointSlice over `pods`."""
    ports = fields.pop("ports", None) or [port("http", 80), port("dns", 53, protocol="UDP")]
    return [service(name, cluster_ip, ports, **fields),
            endpoint_slice(name, [POD_IPS[p] for p in sorted(pods)], [("http", 80, "TCP"), ("dns", 53, "UDP")])]


def apply(api: KubeApi, objects) -> None:
    for obj in objects:
        api.apply(obj)


def serving(lab: Lab, address: str, pods=ALL, timeout: float = 10.0, port_: int = 80, protocol: str = "TCP") -> float:
    """Waits until exactly `pods` answer at address:port; returns the seconds it took."""
    started = time.monotonic()
    wait_until(lambda: answering(lab, address, port_, protocol) == set(pods), timeout=timeout, interval=0.05,
               what=f"{sorted(pods)} serve {address}:{port_}")
    return time.monotonic() - started


def silent(lab: Lab, address: str, timeout: float = 10.0) -> float:
    started = time.monotonic()
    wait_until(lambda: not tcp_request(lab.client, address, 80, timeout=0.3).ok, timeout=timeout,
               what=f"{address} stops answering")
    return time.monotonic() - started


@pytest.fixture(scope="module")
def daemon(lab, api, tmp_path_factory):
    log = tmp_path_factory.mktemp("daemon") / "dataplane.log"
    with Daemon(lab.node, log, run_argv("kube", extra=["--master", API, "-v"])) as daemon:
        yield daemon


def test_follows_create_change_and_delete(lab, api, daemon):
    apply(api, web("follow", "10.96.5.10"))
    serving(lab, "10.96.5.10")
    serving(lab, "10.96.5.10", port_=53, protocol="UDP")

    api.apply(web("follow", "10.96.5.10", pods={"pod1", "pod3"})[1])
    took = serving(lab, "10.96.5.10", {"pod1", "pod3"}, timeout=3.0)

    api.delete("Service", "default", "follow")
    silent(lab, "10.96.5.10", timeout=3.0)
    assert took < 3.0
    assert daemon.health() == 200


def test_a_nodeport_service_from_the_api(lab, api, daemon):
    apply(api, web("nodeport", "10.96.5.70", type="NodePort", ports=[port("http", 80, node_port=30170)]))
    wait_until(lambda: answering(lab, NODE_IP, 30170) == ALL, timeout=5, what="NodePort 30170 on the node's address")


def test_a_dropped_watch_is_resumed_and_a_change_right_after_is_live_within_3_s(lab, api, daemon):
    apply(api, web("cut", "10.96.5.20"))
    serving(lab, "10.96.5.20")
    wait_until(lambda: api.open_watches() >= 3, timeout=5, what="the daemon's watches are open")

    assert api.cut() >= 3
    api.apply(web("cut", "10.96.5.20", pods={"pod2"})[1])
    took = serving(lab, "10.96.5.20", {"pod2"}, timeout=3.0)
    assert took < 3.0
    assert "relisting" not in daemon.log_text().split("=== start")[-1]


def test_gone_relists_and_objects_deleted_meanwhile_disappear_within_10_s(lab, api, daemon):
    apply(api, web("gone-deleted", "10.96.5.30"))
    apply(api, web("gone-changed", "10.96.5.31"))
    serving(lab, "10.96.5.30")
    serving(lab, "10.96.5.31")
    wait_until(lambda: api.open_watches() >= 3, timeout=5, what="the daemon's watches are open")

    api.silence()  # the daemon never hears of the next changes as events
    api.delete("Service", "default", "gone-deleted")
    api.apply(web("gone-changed", "10.96.5.31", pods={"pod1"})[1])
    api.expire()  # ERROR 410 to the open watches: only a relist can tell what happened
    changed = time.monotonic()
    silent(lab, "10.96.5.30", timeout=10.0)
    serving(lab, "10.96.5.31", {"pod1"}, timeout=max(0.5, 10.0 - (time.monotonic() - changed)))
    assert time.monotonic() - changed < 10.0
    assert "relisting" in daemon.log_text()


def test_api_server_down_keeps_rules_and_health_and_changes_arrive_when_it_returns(lab, api, daemon):
    apply(api, web("restart", "10.96.5.40"))
    serving(lab, "10.96.5.40")

    api.stop()
    try:
        time.sleep(3.0)  # several failed reconnects
        assert daemon.running
        assert daemon.health() == 200, "nothing is pending: the rules match the last known state"
        assert answering(lab, "10.96.5.40") == ALL, "traffic keeps flowing while the API server is down"
        metrics = _metrics(lab)
        assert _value(metrics, "dataplane_api_seconds_since_last_event") >= 2.0
        api.apply(web("restart", "10.96.5.40", pods={"pod3"})[1])  # changed while the daemon cannot see it
        time.sleep(6.0)  # the backoff grows towards its 10 s cap
    finally:
        api.start()
    returned = time.monotonic()
    serving(lab, "10.96.5.40", {"pod3"}, timeout=20.0)
    assert time.monotonic() - returned < 20.0
    assert daemon.health() == 200


def test_objects_the_api_server_would_reject_are_logged_and_skipped(lab, api, daemon):
    api.apply(service("bogus", "10.96.5.50", [port("http", 80, protocol="BOGUS")], namespace="team"))
    apply(api, web("beside-bogus", "10.96.5.51"))
    serving(lab, "10.96.5.51")
    wait_until(lambda: re.search(r"team/bogus.*protocol", daemon.log_text()), timeout=5,
               what="the log names team/bogus and the field")
    assert daemon.running and daemon.health() == 200
    assert "dataplane_invalid_objects 1.0" in _metrics(lab)


def test_started_while_the_api_server_is_unreachable(tmp_path):
    """Its own lab: /healthz is not 200 until the first lists are programmed, and adopted rules stay meanwhile."""
    with Lab.build() as lab, stand_in_api(lab) as api:
        lab.start_echo(tcp=[80])
        apply(api, web("early", "10.96.5.60"))
        daemon = Daemon(lab.node, tmp_path / "dataplane.log", run_argv("kube", extra=["--master", API]))
        with daemon:
            serving(lab, "10.96.5.60")
        api.stop()
        with daemon.log_path.open("a") as log:  # Daemon.start() would wait for a 200 that must not come yet
            daemon.process = lab.node.popen(*daemon.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: daemon.health() is not None, timeout=10, what="/healthz answers")
            time.sleep(2.0)
            assert daemon.health() == 503, "no 200 before the first lists are programmed"
            assert answering(lab, "10.96.5.60") == ALL, "the last run's rules stay while it waits"
            api.apply(web("early", "10.96.5.60", pods={"pod2"})[1])
            api.start()
            wait_until(lambda: daemon.health() == 200, timeout=15, what="/healthz 200 once the lists are in")
            serving(lab, "10.96.5.60", {"pod2"}, timeout=2.0)
        finally:
            daemon.stop()


def _metrics(lab: Lab) -> str:
    from dataplane.lab import http_get

    status, body = http_get(lab.node, "127.0.0.1", 10249, "/metrics")
    assert status == 200
    return body.decode()


def _value(metrics: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))
