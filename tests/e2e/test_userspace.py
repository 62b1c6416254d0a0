"""Userspace mode end to end: what only the forwarder can show, with real packets in namespaces.

(Every kernel-mode scenario also runs in userspace mode: test_services.py and
test_packet_flows.py parametrize their daemon by proxy mode.)

Address plan
    client      192.168.50.2, default route via the node (192.168.50.1)
    pods        pod1 10.244.1.11, pod2 10.244.1.12, pod3 10.244.1.13; echo on TCP 80, UDP 80
    ClusterIPs  10.96.0.10 maglev      http 80/TCP, dns 53/UDP -> 80, flood 9/UDP (nothing listens);
                                       balanced by a kernel table, not queued (nat/README.md)
                10.96.0.20 least-conn  the same ports
                10.96.0.30 random      the same ports (fail-open, floods)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dataplane.lab import (
    AddressPlan, Daemon, Lab, ManifestDir, TcpSession, UdpSession, environment_problem, http_get, tally, tcp_request,
    udp_request, wait_until,
)
from dataplane.lab.daemon import dataplane_executable
from dataplane.lab.manifests import endpoint_slice, port, service

PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]

POD_IPS = {"pod1": "10.244.1.11", "pod2": "10.244.1.12", "pod3": "10.244.1.13"}
ALL = frozenset(POD_IPS)


def web(name: str, cluster_ip: str, algorithm: str, pods=ALL) -> list[dict]:
    svc = service(name, cluster_ip, [port("http", 80), port("dns", 53, 80, "UDP"), port("flood", 9, 9, "UDP")])
    svc["metadata"]["annotations"] = {"dataplane.io/lb-algorithm": algorithm}
    return [svc, endpoint_slice(name, [POD_IPS[p] for p in sorted(pods)],
                                [("http", 80, "TCP"), ("dns", 80, "UDP"), ("flood", 9, "UDP")])]


@pytest.fixture(scope="module")
def lab():
    with Lab.build() as lab:
        lab.start_echo(tcp=[80], udp=[80])
        yield lab


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    manifests = ManifestDir(tmp_path_factory.mktemp("manifests"))
    manifests.write("maglev.yaml", web("maglev", "10.96.0.10", "maglev"))
    manifests.write("leastconn.yaml", web("leastconn", "10.96.0.20", "least-conn"))
    manifests.write("random.yaml", web("random", "10.96.0.30", "random"))
    return manifests


@pytest.fixture(scope="module")
def daemon(lab, manifests, tmp_path_factory):
    log = tmp_path_factory.mktemp("daemon") / "dataplane.log"
    with Daemon.for_source(lab.node, manifests.path, log, extra=["-v", "--proxy-mode", "userspace"]) as daemon:
        yield daemon


def status(lab: Lab) -> dict:
    # generous: on a loaded 2-CPU VM the daemon may wait for a CPU (the fail-open counter is a netlink read now)
    code, body = http_get(lab.node, "127.0.0.1", 10249, "/status", timeout=10)
    assert code == 200
    return json.loads(body)


def service_status(lab: Lab, name: str) -> dict:
    return next(s for s in status(lab)["services"] if s["service"] == name)


def fail_open_count(lab: Lab) -> int:
    text = lab.node.run("nft", "list", "counter", "ip", "dataplane", "fail-open").stdout
    return int(text.split("packets", 1)[1].split()[0])


def forget_flows(lab: Lab, cluster_ip: str) -> None:
    """Deletes the conntrack entries of flows to `cluster_ip`, so their next packet is a new flow."""
    lab.node.run("conntrack", "-D", "--orig-dst", cluster_ip, check=False)


def test_only_a_flows_first_packet_is_queued(lab, daemon):
    before = status(lab)["packets_queued"]
    with TcpSession(lab.client, "10.96.0.30", 80) as session:
        assert session.connect() is None
        replies = [session.request(f"line {i}") for i in range(50)]
    assert all(r.ok for r in replies) and len({r.pod for r in replies}) == 1
    with UdpSession(lab.client, "10.96.0.30", 53) as session:
        replies = [session.request(f"datagram {i}") for i in range(50)]
    assert all(r.ok for r in replies) and len({r.pod for r in replies}) == 1
    # One SYN, one first datagram: 100 established-flow packets each way stayed in the kernel.
    assert status(lab)["packets_queued"] - before == 2


def test_maglev_keeps_a_five_tuple_on_its_endpoint_across_an_unrelated_change(lab, daemon, manifests):
    ports = range(31000, 31060)

    def placements() -> dict[int, str]:
        found = {}
        for source_port in ports:
            with UdpSession(lab.client, "10.96.0.10", 53, timeout=1.0, source=("192.168.50.2", source_port)) as s:
                outcome = s.request()
                assert outcome.ok, outcome
                found[source_port] = outcome.pod
        return found

    before = placements()
    assert set(before.values()) == ALL
    forget_flows(lab, "10.96.0.10")
    assert placements() == before  # same 5-tuple, same endpoint: a decision, not chance

    manifests.write("maglev.yaml", web("maglev", "10.96.0.10", "maglev", pods=ALL - {"pod3"}))
    try:
        wait_until(lambda: len(service_status(lab, "default/maglev:dns")["endpoints"]) == 2, timeout=5,
                   what="the forwarder sees pod3 leave")
        time.sleep(0.3)  # the new table is built off the packet path (tens of ms)
        forget_flows(lab, "10.96.0.10")
        after = placements()
        stayed = [after[p] == pod for p, pod in before.items() if pod != "pod3"]
        assert sum(stayed) / len(stayed) >= 0.95, f"{stayed.count(False)} of {len(stayed)} flows moved"
        assert "pod3" not in after.values()
    finally:
        manifests.write("maglev.yaml", web("maglev", "10.96.0.10", "maglev"))


def test_least_conn_learns_flows_from_conntrack(lab, daemon):
    name = "default/leastconn:http"
    sessions = []
    try:
        for _ in range(3):
            session = TcpSession(lab.client, "10.96.0.20", 80)
            assert session.connect() is None
            sessions.append((session, session.request().pod))
        assert {pod for _, pod in sessions} == ALL  # one each: decisions count until conntrack confirms them
        time.sleep(2.5)  # past the pending window: from here on only conntrack's word counts

        def active() -> dict[str, int]:
            return {e["endpoint"].split(":")[0]: e["active"] for e in service_status(lab, name)["endpoints"]}

        assert active() == {ip: 1 for ip in POD_IPS.values()}
        leaving, pod = sessions.pop(0)
        leaving.close()
        wait_until(lambda: active()[POD_IPS[pod]] == 0, timeout=5, what=f"conntrack reports the flow to {pod} ended")
        for _ in range(2):
            extra = TcpSession(lab.client, "10.96.0.20", 80)
            assert extra.connect() is None
            sessions.append((extra, extra.request().pod))
        assert sessions[-2][1] == pod  # the only endpoint with no flow
        assert sessions[-1][1] != pod or len({p for _, p in sessions}) == 3
    finally:
        for session, _ in sessions:
            session.close()


FLOOD = r"""
import socket, struct, sys, time
rate, seconds, dst, dport = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
src, daddr = socket.inet_aton("192.168.50.2"), socket.inet_aton(dst)
sent, start = 0, time.monotonic()
while True:
    now = time.monotonic() - start
    if now >= seconds:
        break
    due = int(now * rate)
    while sent < due:
        sport = 1024 + sent % 60000
        udp = struct.pack("!HHHH", sport, dport, 8, 0)  # checksum 0: none, valid for UDP over IPv4
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, sent & 0xFFFF, 0, 64, 17, 0, src, daddr)
        s.sendto(ip + udp, (dst, 0))
        sent += 1
    time.sleep(0.0005)
print(sent)
"""


def test_a_flood_of_new_flows_does_not_stall_established_ones(lab, daemon):
    before = status(lab)["packets_queued"]
    latencies, failures = [], []
    with TcpSession(lab.client, "10.96.0.30", 80, timeout=2.0) as session:
        assert session.connect() is None
        # The random Service's flood port: a Maglev Service is balanced by a kernel table, never queued.
        flood = lab.client.python("-c", FLOOD, "20000", "3", "10.96.0.30", "9", stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            outcome = session.request()
            (latencies if outcome.ok else failures).append(outcome.elapsed if outcome.ok else str(outcome))
            time.sleep(0.01)
        sent = int(flood.communicate(timeout=30)[0])
    queued = status(lab)["packets_queued"] - before
    # 60,000 conntrack entries would slow whatever walks the table next (a restart's stale-flow cleanup).
    lab.node.run("conntrack", "-D", "-p", "udp", "--orig-dst", "10.96.0.30", "--dport", "9", check=False)
    # The forwarder was busy: the flood ran (a loaded machine sends less than asked) and most of it was queued
    # (what the forwarder cannot take fails open)...
    assert sent > 5000 and queued > sent // 3, f"sent {sent}, queued {queued}"
    # ...and the established flow never waited for it: none failed (2 s), and not the bulk of them slowed.
    # (Its packets never enter the queue; a loaded machine may still delay a few requests: the tail is loose.)
    assert not failures, failures[:3]
    latencies.sort()
    median, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    assert median < 0.02 and p99 < 0.25, f"median {median * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"


def test_status_command_prints_each_service(lab, daemon):
    done = lab.node.run(dataplane_executable(), "status")
    assert "default/maglev:http  maglev" in done.stdout
    assert "10.244.1.11:80" in done.stdout


def test_fail_open_when_the_forwarder_is_killed(lab, daemon):
    before = fail_open_count(lab)
    workers = worker_pids(daemon.process.pid).values()
    daemon.process.kill()  # SIGKILL: no goodbye
    daemon.process.wait()
    # Its forwarder processes see their control socket close, answer what they hold, and exit.
    wait_until(lambda: not any(alive(pid) for pid in workers), timeout=3,
               what="the forwarder processes exit with the daemon")
    try:
        outcomes = [tcp_request(lab.client, "10.96.0.30", 80, timeout=1.0) for _ in range(30)]
        assert set(tally(outcomes)) == ALL, tally(outcomes)  # every new flow: the kernel's own pick
        assert fail_open_count(lab) - before >= 30
    finally:
        daemon.start()
    outcomes = [tcp_request(lab.client, "10.96.0.30", 80) for _ in range(10)]
    assert all(o.ok for o in outcomes)


def test_cleanup_removes_the_queue_rules(lab, daemon):
    daemon.stop()
    try:
        assert "DATAPLANE-QUEUE" in lab.node.run("iptables-save", "-t", "mangle").stdout
        lab.node.run(dataplane_executable(), "cleanup")
        assert "DATAPLANE-QUEUE" not in lab.node.run("iptables-save", "-t", "mangle").stdout
        assert "dataplane" not in lab.node.ruleset()
    finally:
        daemon.start()


def test_a_full_sync_repairs_a_flushed_queue_rule(lab, daemon, manifests, tmp_path):
    if status(lab)["queue_mechanism"] != "iptables":
        pytest.skip("this kernel has nft's queue: no iptables rule to repair")
    daemon.stop()
    resyncing = Daemon.for_source(lab.node, manifests.path, tmp_path / "resync.log",
                                  extra=["-v", "--proxy-mode", "userspace", "--sync-period", "1"])
    try:
        resyncing.start()
        lab.node.run("iptables", "-w", "-t", "mangle", "-F", "DATAPLANE-QUEUE")  # someone else's iptables-restore
        before = status(lab)["packets_queued"]
        wait_until(lambda: "NFQUEUE" in lab.node.run("iptables", "-w", "-t", "mangle", "-S", "DATAPLANE-QUEUE").stdout,
                   timeout=10, what="the next full sync puts the queue rule back")
        outcome = tcp_request(lab.client, "10.96.0.30", 80)
        assert outcome.ok and status(lab)["packets_queued"] > before  # new flows reach the forwarder again
    finally:
        resyncing.stop()
        daemon.start()


SPREAD = r"""
import socket, struct, sys
count, dst, dport, base = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for n in range(count):
    src = bytes((192, 168, 50, 10 + n % 200))
    udp = struct.pack("!HHHH", base + n, dport, 8, 0)
    s.sendto(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, n, 0, 64, 17, 0, src, socket.inet_aton(dst)) + udp, (dst, 0))
"""


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def worker_pids(daemon_pid: int) -> dict[int, int]:
    """queue -> pid of the daemon's forwarder workers."""
    found = {}
    for task in Path(f"/proc/{daemon_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"dataplane.queue.workers" in argv:
                found[int(argv[argv.index(b"dataplane.queue.workers") + 1])] = int(child)
    return found


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="fanning out by CPU needs two CPUs")
def test_several_queues_decide_in_worker_processes_and_one_dying_fails_open(lab, daemon, manifests, tmp_path):
    daemon.stop()
    multi = Daemon.for_source(lab.node, manifests.path, tmp_path / "multi.log",
                              extra=["-v", "--proxy-mode", "userspace", "--queues", "2"])
    try:
        multi.start()
        # To the random Service (a Maglev one is balanced by a kernel table, never queued); fanout: a
        # packet goes to the queue of the CPU that sent it.
        def spread(base: int, cpu: int) -> None:
            lab.client.popen("taskset", "-c", str(cpu), sys.executable, "-c", SPREAD, "400", "10.96.0.30", "9",
                             str(base)).wait(30)

        def settled(queued: int) -> dict:
            wait_until(lambda: status(lab)["packets_queued"] >= queued, timeout=5, what=f"{queued} packets decided")
            return status(lab)

        spread(20000, 0)
        spread(20400, 1)
        first = settled(800)
        assert first["queue_fanout"] is True
        assert first["packets_per_queue"] == {"0": 400, "1": 400}, first["packets_per_queue"]
        assert first["undecided"] == 0

        workers = worker_pids(multi.process.pid)
        assert set(workers) == {0, 1}
        # Kill queue 1's worker under load: new connections from CPU 1 (queue 1's) keep coming throughout.
        outcomes, stop = [], threading.Event()

        def connect_from_cpu_1() -> None:
            os.sched_setaffinity(0, {1})  # this thread only
            while not stop.is_set():
                # A SYN the killed worker held is dropped with its queue; TCP sends it again 1 s later,
                # and that one bypasses to the kernel's pick: late, never refused.
                outcomes.append(tcp_request(lab.client, "10.96.0.30", 80, timeout=3.0))

        client = threading.Thread(target=connect_from_cpu_1)
        client.start()
        time.sleep(0.5)
        before = fail_open_count(lab)
        os.kill(workers[1], signal.SIGKILL)
        # At once: the daemon starts the worker again 1 s after it sees it gone, and flows queued to the
        # new one are decided, not failed open (waiting for the client thread first raced that restart).
        spread(21000, 1)
        failed_open = fail_open_count(lab) - before
        time.sleep(0.5)
        stop.set()
        client.join()
        assert len(outcomes) > 20 and all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:3]
        assert failed_open >= 400  # all of queue 1's flows went to the kernel's pick
        assert set(tally(tcp_request(lab.client, "10.96.0.30", 80) for _ in range(20))) == ALL

        wait_until(lambda: 1 in worker_pids(multi.process.pid) and worker_pids(multi.process.pid)[1] != workers[1],
                   timeout=10, what="the daemon starts queue 1's worker again")
        time.sleep(0.5)
        before = fail_open_count(lab)
        spread(22000, 1)
        time.sleep(0.3)
        assert fail_open_count(lab) == before
    finally:
        multi.stop()
        daemon.start()


def queue_waiting(lab: Lab) -> dict[int, int]:
    """queue -> packets it holds now (nfnetlink_queue's queue_total, in the node's namespace)."""
    text = lab.node.run("cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    return {int(fields[0]): int(fields[2]) for fields in map(str.split, text.splitlines()) if len(fields) >= 8}


def test_a_queue_that_overflows_lets_new_flows_through_to_the_kernels_pick(lab, daemon):
    """Forwarders that fall behind (here: stopped) let their queues fill to the queue length (16,384); from
    then on fail-open lets every new packet go on to the kernel's own pick, so no connection waits for them
    (a held SYN would come again only after 1 s, past this test's timeout). Once they run again they answer
    what they held, and decide new flows again."""
    workers = worker_pids(daemon.process.pid)
    assert workers
    forget_flood = ("conntrack", "-D", "-p", "udp", "--orig-dst", "10.96.0.30", "--dport", "9")
    lab.node.run(*forget_flood, check=False)  # earlier tests' flows would not be new: not queued
    before = fail_open_count(lab)
    for pid in workers.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        queues = range(min(len(workers), os.cpu_count() or 1))
        for cpu in queues:  # fanout: the queue of the sending CPU
            lab.client.popen("taskset", "-c", str(cpu), sys.executable, "-c", SPREAD, "17000", "10.96.0.30", "9",
                             str(23000 + 17000 * cpu)).wait(60)
        waiting = queue_waiting(lab)
        assert waiting and all(count == 16384 for count in waiting.values()), waiting
        outcomes = [tcp_request(lab.client, "10.96.0.30", 80, timeout=0.9) for _ in range(20)]
        assert all(o.ok for o in outcomes), [str(o) for o in outcomes if not o.ok][:3]
        assert set(tally(outcomes)) == ALL  # the kernel's random pick, not one forwarder's
        # Every connection, and every flood packet past a full queue, took the kernel's pick.
        assert fail_open_count(lab) - before >= 20 + (17000 - 16384) * len(queues)
    finally:
        for pid in workers.values():
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: not any(queue_waiting(lab).values()), timeout=20, what="the forwarders answer what they held")
        lab.node.run(*forget_flood, check=False)
    queued = status(lab)["packets_queued"]
    assert tcp_request(lab.client, "10.96.0.30", 80).ok and status(lab)["packets_queued"] == queued + 1


def test_ipv6_flows_are_decided_too(tmp_path):
    if "dual_stack" not in AddressPlan.__dataclass_fields__:
        pytest.skip("this lab has no IPv6 plan yet")
    with Lab.build(AddressPlan(dual_stack=True)) as lab6:
        lab6.start_echo(tcp=[80], udp=[80])
        manifests = ManifestDir(tmp_path / "manifests")
        svc = service("web6", "fd00:96::10", [port("http", 80), port("dns", 53, 80, "UDP")])
        svc["spec"]["ipFamilies"] = ["IPv6"]
        slice_ = endpoint_slice("web6", [p.ip6 for p in lab6.pods], [("http", 80, "TCP"), ("dns", 80, "UDP")])
        slice_["addressType"] = "IPv6"
        manifests.write("web6.yaml", [svc, slice_])
        extra = ["--proxy-mode", "userspace", "--lb-algorithm", "round-robin"]
        with Daemon.for_source(lab6.node, manifests.path, tmp_path / "v6.log", extra=extra,
                               cluster_cidr="10.244.0.0/16,fd00:244::/32"):
            # Sent from one CPU, so one worker decides them all (each worker rotates on its own).
            allowed = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {min(allowed)})
            try:
                tcp = [tcp_request(lab6.client, "fd00:96::10", 80).pod for _ in range(6)]
                udp = [udp_request(lab6.client, "fd00:96::10", 53).pod for _ in range(6)]
            finally:
                os.sched_setaffinity(0, allowed)
            decided = status(lab6)
        # round-robin's strict rotation shows the forwarder decided every flow, not the kernel's random pick
        assert tcp == ["pod1", "pod2", "pod3"] * 2 and udp == ["pod1", "pod2", "pod3"] * 2
        assert decided["packets_queued"] == 12 and decided["undecided"] == 0 and decided["fail_open"] == 0
