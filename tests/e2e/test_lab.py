"""The lab itself, with real namespaces: topology, echo servers, clients, cleanup, the daemon helper.

No data plane here: traffic goes straight to Pod IPs, routed by the node.
Address plan: the lab's default (dataplane/lab/topology.py): client 192.168.50.2,
node 192.168.50.1 / 10.244.1.1, pods 10.244.1.11-13; dual-stack labs add
client fd00:50::2, node fd00:50::1 / fd00:244:1::1, pods fd00:244:1::11-12.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from dataplane.lab import (
    AddressPlan, Daemon, DaemonError, Failure, Lab, TcpSession, UdpSession, environment_problem, http_get,
    tcp_request, udp_request,
)
from dataplane.lab.netns import Netns, list_netns, netns_pids

PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]

TCP, UDP, HTTP = (80, 8080), (80, 5353), (8000,)


@pytest.fixture(scope="module")
def lab():
    with Lab.build() as lab:
        lab.start_echo(tcp=TCP, udp=UDP, http=HTTP)
        yield lab


def root_state() -> dict[str, str]:
    read = lambda *argv: subprocess.run(argv, capture_output=True, text=True).stdout  # noqa: E731
    return {
        "links": read("ip", "-o", "link", "show"),
        "addresses": read("ip", "-o", "address", "show"),
        "routes": read("ip", "route", "show", "table", "all"),
        "ip_forward": read("sysctl", "-n", "net.ipv4.ip_forward"),
        "ipv6": read("sysctl", "-n", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.default.accept_dad",
                     "net.ipv6.icmp.ratelimit"),
        "ruleset": read("nft", "list", "ruleset"),
    }


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4", "dual-stack"])
def test_building_and_closing_a_lab_leaves_the_root_namespace_as_it_was(dual_stack):
    before = root_state()
    with Lab.build(AddressPlan(pods=2, dual_stack=dual_stack)) as lab:
        assert root_state() == before
        assert lab.node.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
        names = [ns.name for ns in lab.namespaces]
    assert root_state() == before
    assert not set(names) & set(list_netns())


def test_lab_is_deleted_with_its_processes_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with Lab.build(AddressPlan(pods=1)) as lab:
            lab.start_echo(tcp=[80])
            pids = netns_pids(lab.pods[0].ns.name)
            prefix = lab.prefix
            assert pids
            raise RuntimeError("boom")
    assert not [n for n in list_netns() if n.startswith(prefix)]
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def test_a_new_lab_deletes_leftovers_of_dead_owners_and_keeps_live_ones():
    stale = Netns.create(f"dplab-{dead_pid()}-1-node")
    sleeper = stale.popen("sleep", "60")
    live = Netns.create(f"dplab-{os.getpid()}-999999-node")  # a parallel lab of a live owner
    try:
        with Lab.build(AddressPlan(pods=1)):
            assert stale.name not in list_netns()
            assert live.name in list_netns()
        assert sleeper.wait(5) is not None
    finally:
        stale.delete()
        live.delete()


@pytest.mark.parametrize("pod", ["pod1", "pod2", "pod3"])
def test_client_reaches_each_pod_directly_without_nat(lab, pod):
    target = lab.pod(pod)
    for outcome in (tcp_request(lab.client, target.ip, 80), udp_request(lab.client, target.ip, 5353)):
        assert outcome.ok, outcome
        assert outcome.reply.pod == pod
        assert outcome.reply.peer[0] == str(lab.plan.client.ip)
        assert outcome.reply.local[0] == target.ip  # UDP: from IP_PKTINFO, not the wildcard bind


def test_pods_reach_each_other_through_the_node(lab):
    outcome = tcp_request(lab.pod("pod2").ns, lab.pod("pod1").ip, 8080)
    assert outcome.reply.pod == "pod1"
    assert outcome.reply.peer[0] == lab.pod("pod2").ip
    assert outcome.reply.local == (lab.pod("pod1").ip, 8080)


def test_tcp_session_keeps_one_connection_open(lab):
    with TcpSession(lab.client, lab.pods[0].ip, 80) as session:
        assert session.connect() is None
        first, second = session.request(), session.request()
        local = session.local
    assert first.ok and second.ok
    assert first.reply.peer == second.reply.peer == local


def test_udp_session_keeps_its_source_port(lab):
    with UdpSession(lab.client, lab.pods[1].ip, 80) as session:
        replies = [session.request().reply for _ in range(3)]
        local = session.local
    assert {r.peer for r in replies} == {local}


def test_http_answers_with_the_pod_name(lab):
    status, body = http_get(lab.client, lab.pods[2].ip, 8000, "/")
    assert status == 200
    assert body.decode().startswith("pod3 192.168.50.2:")


@pytest.mark.parametrize("send, address, port, failure", [
    (tcp_request, "pod1", 81, Failure.REFUSED),
    (udp_request, "pod1", 81, Failure.REFUSED),
    (tcp_request, "10.96.0.1", 80, Failure.UNREACHABLE),  # the node has no route for Services yet
    # ICMP net unreachable is a soft error: Linux reports it to a UDP socket only with IP_RECVERR.
    (udp_request, "10.96.0.1", 80, Failure.TIMEOUT),
], ids=["tcp-refused", "udp-refused", "tcp-unreachable", "udp-unreachable-is-silent"])
def test_failures_are_classified_and_fast(lab, send, address, port, failure):
    ip = lab.pod(address).ip if address.startswith("pod") else address
    outcome = send(lab.client, ip, port, timeout=0.5)
    assert outcome.failure == failure, outcome
    assert outcome.elapsed < 0.2 or failure == Failure.TIMEOUT


def test_a_silent_destination_times_out(lab):
    pod = lab.pod("pod3")
    pod.ns.nft("table inet lab_drop {\n chain input { type filter hook input priority 0; tcp dport 80 drop; }\n}")
    try:
        outcome = tcp_request(lab.client, pod.ip, 80, timeout=0.3)
    finally:
        pod.ns.nft("delete table inet lab_drop")
    assert outcome.failure == Failure.TIMEOUT
    assert 0.3 <= outcome.elapsed < 1.0


# The daemon helper, against a stand-in that serves /healthz after a delay.
STAND_IN = textwrap.dedent("""
    import http.server, signal, sys, time
    delay, code, ignore_term = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "ignore"
    print("stand-in starting", file=sys.stderr, flush=True)
    if code < 0:
        sys.exit(-code)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else (lambda *_: sys.exit(0)))
    time.sleep(delay)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(code if self.path == "/healthz" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", 10256), H).serve_forever()
""")


def stand_in(lab, tmp_path, delay=0.0, code=200, sigterm="exit") -> Daemon:
    argv = [sys.executable, "-c", STAND_IN, str(delay), str(code), sigterm]
    return Daemon(lab.node, tmp_path / "daemon.log", argv)


def test_daemon_start_waits_for_healthz_and_stop_sends_sigterm(lab, tmp_path):
    daemon = stand_in(lab, tmp_path, delay=0.4)
    started = time.monotonic()
    daemon.start()
    assert time.monotonic() - started >= 0.4
    assert daemon.health() == 200
    assert daemon.stop() == 0
    assert daemon.health() is None
    daemon.start()
    daemon.stop()
    log = daemon.log_text()
    assert "=== start 1:" in log and "=== start 2:" in log and log.splitlines().count("stand-in starting") == 2


def test_daemon_that_exits_early_raises_with_its_log(lab, tmp_path):
    with pytest.raises(DaemonError, match=r"exited 3(.|\n)*stand-in starting"):
        stand_in(lab, tmp_path, code=-3).start()


def test_daemon_never_healthy_is_stopped_and_raises(lab, tmp_path):
    daemon = stand_in(lab, tmp_path, code=503)
    with pytest.raises(DaemonError, match="not 200 within"):
        daemon.start(timeout=0.5)
    assert not daemon.running and daemon.health() is None


def test_daemon_ignoring_sigterm_is_killed_and_reported(lab, tmp_path):
    daemon = stand_in(lab, tmp_path, sigterm="ignore").start()
    with pytest.raises(DaemonError, match="did not exit"):
        daemon.stop(timeout=0.3)
    assert daemon.health() is None


# Dual-stack labs: the IPv6 half, built beside the IPv4 one.
@pytest.fixture(scope="module")
def dual_lab():
    with Lab.build(AddressPlan(pods=2, dual_stack=True)) as lab:
        lab.start_echo(tcp=TCP, udp=UDP)
        yield lab


def ipv6_forwarding(ns) -> str:
    return ns.run("sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip()


def test_ipv6_forwarding_is_on_in_the_node_only(dual_lab):
    assert ipv6_forwarding(dual_lab.node) == "1"
    assert {ipv6_forwarding(ns) for ns in dual_lab.namespaces[1:]} == {"0"}


def test_ipv6_addresses_are_usable_at_once(dual_lab):
    for ns in dual_lab.namespaces:
        assert ns.ip("-6", "address", "show", "tentative") == "", ns  # no DAD to wait for
    pod = dual_lab.pods[0]
    assert f"inet6 {pod.ip6}/128" in pod.ns.ip("-6", "address", "show", "dev", "eth0")


@pytest.mark.parametrize("pod", ["pod1", "pod2"])
def test_client_reaches_each_pod_over_ipv6_without_nat(dual_lab, pod):
    target = dual_lab.pod(pod)
    for outcome in (tcp_request(dual_lab.client, target.ip6, 80), udp_request(dual_lab.client, target.ip6, 5353)):
        assert outcome.ok, outcome
        assert outcome.reply.pod == pod
        assert outcome.reply.peer[0] == str(dual_lab.plan.client6.ip)
        assert outcome.reply.local[0] == target.ip6


def test_pods_reach_each_other_over_ipv6_and_ipv4_still_works(dual_lab):
    pod1, pod2 = dual_lab.pod("pod1"), dual_lab.pod("pod2")
    outcome = udp_request(pod2.ns, pod1.ip6, 80)
    assert (outcome.reply.pod, outcome.reply.peer[0], outcome.reply.local) == ("pod1", pod2.ip6, (pod1.ip6, 80))
    assert tcp_request(pod2.ns, pod1.ip, 8080).reply.peer[0] == pod2.ip


@pytest.mark.parametrize("send", [tcp_request, udp_request], ids=["tcp", "udp"])
def test_ipv6_refusals_are_classified_and_fast(dual_lab, send):
    outcome = send(dual_lab.client, dual_lab.pod("pod1").ip6, 81, timeout=0.5)
    assert outcome.failure == Failure.REFUSED and outcome.elapsed < 0.2, outcome


def test_service_prefix_reaches_the_node_and_its_icmpv6_errors_are_not_rate_limited(dual_lab):
    # Without net.ipv6.icmp.ratelimit=0 in the node, refusals after the first few
    # in a row would be silent (the kernel allows a burst, then one per second).
    service_ip = str(dual_lab.plan.service_cidr6[1])
    dual_lab.node.nft("table ip6 lab_reject {\n chain pre { type filter hook prerouting priority 0; "
                      f"ip6 daddr {service_ip} udp dport 80 reject; }}\n}}")
    try:
        outcomes = [udp_request(dual_lab.client, service_ip, 80, timeout=0.5) for _ in range(30)]
    finally:
        dual_lab.node.nft("delete table ip6 lab_reject")
    assert all(o.failure == Failure.REFUSED for o in outcomes), [str(o) for o in outcomes]
