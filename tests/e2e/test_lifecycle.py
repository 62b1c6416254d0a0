"""The daemon's life end to end: start with a broken file, SIGTERM and restart under an
open connection, full syncs beside other software's tables, and `dataplane cleanup`.

One lab for the module; each test starts its own daemon (rules left by the previous
one stay in the kernel, as they would on a node, and are adopted).

Address plan
    client          192.168.50.2/24, default route via the node
    node            192.168.50.1 / 10.244.1.1; runs `dataplane run`
    pods            pod1 10.244.1.11, pod2 10.244.1.12, pod3 10.244.1.13; echo on TCP 80, UDP 5353
    ClusterIPs      10.96.1.10 steady (all pods), 10.96.1.11 added while the daemon is down
"""

from __future__ import annotations

import re
import time

import pytest

from dataplane.lab import (
    Daemon, Failure, Lab, ManifestDir, TcpSession, cleanup, environment_problem, sample, tally, tcp_request,
    wait_until,
)
from dataplane.lab.manifests import endpoint_slice, port, service

PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]

POD_IPS = {"pod1": "10.244.1.11", "pod2": "10.244.1.12", "pod3": "10.244.1.13"}
ALL = set(POD_IPS)
STEADY = "10.96.1.10"
LATE = "10.96.1.11"

OTHER_TABLE = """
table inet other {
    chain c {
        type filter hook input priority 0; policy accept;
        counter
    }
}
"""


def web(name: str, cluster_ip: str) -> list[dict]:
    return [service(name, cluster_ip, [port("http", 80)]),
            endpoint_slice(name, list(POD_IPS.values()), [("http", 80, "TCP")])]


@pytest.fixture(scope="module")
def lab():
    with Lab.build() as lab:
        lab.start_echo(tcp=[80], udp=[5353])
        yield lab


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    manifests = ManifestDir(tmp_path_factory.mktemp("manifests"))
    manifests.write("steady.yaml", web("steady", STEADY))
    manifests.write("broken.yaml", "kind: Service\nmetadata: {name: [unclosed\n")
    return manifests


@pytest.fixture
def daemon(lab, manifests, tmp_path):
    daemon = Daemon.for_source(lab.node, manifests.path, tmp_path / "dataplane.log")
    try:
        yield daemon
    finally:
        daemon.stop()


def all_pods_answer(lab, address: str) -> bool:
    outcomes = sample(lambda: tcp_request(lab.client, address, 80, timeout=0.5), ALL, give_up_after=3)
    return set(tally(outcomes)) == ALL


def other_table(lab) -> str:
    listing = lab.node.run("nft", "list", "table", "inet", "other").stdout
    return re.sub(r"counter packets \d+ bytes \d+", "counter", listing)


def test_starts_and_serves_with_a_broken_file_present(lab, daemon):
    daemon.start()
    assert all_pods_answer(lab, STEADY)
    assert "broken.yaml" in daemon.log_text()


def test_established_connection_survives_a_restart(lab, daemon, manifests):
    daemon.start()
    with TcpSession(lab.client, STEADY, 80) as session:
        assert session.connect() is None
        first = session.request()
        assert first.ok, first

        assert daemon.stop() == 0, f"exit code on SIGTERM\n{daemon.log_tail()}"
        while_down = session.request()
        assert while_down.reply == first.reply, f"while the daemon is down: {while_down}"
        assert all_pods_answer(lab, STEADY), "new connections while the daemon is down (rules stay in place)"

        manifests.write("late.yaml", web("late", LATE))  # seen by the next daemon only
        daemon.start()
        after = [session.request() for _ in range(3)]
        assert [o.reply for o in after] == [first.reply] * 3, f"after the restart: {[str(o) for o in after]}"
    assert all_pods_answer(lab, STEADY)
    wait_until(lambda: all_pods_answer(lab, LATE), timeout=2, what="a Service added while down serves")
    manifests.remove("late.yaml")


def test_rules_of_another_table_survive_full_syncs(lab, manifests, tmp_path):
    lab.node.nft(OTHER_TABLE)
    try:
        before = other_table(lab)
        # Full syncs: the one at start (adopting the previous daemon's table), periodic
        # resyncs every second, and the one after a restart.
        with Daemon.for_source(lab.node, manifests.path, tmp_path / "dataplane.log", extra=["--sync-period", "1"]):
            time.sleep(2.5)
            assert other_table(lab) == before
            assert all_pods_answer(lab, STEADY)
        with Daemon.for_source(lab.node, manifests.path, tmp_path / "dataplane.log"):
            assert other_table(lab) == before
            assert all_pods_answer(lab, STEADY)
    finally:
        lab.node.run("nft", "delete", "table", "inet", "other", check=False)


def test_cleanup_leaves_no_trace(lab, daemon):
    daemon.start()
    assert all_pods_answer(lab, STEADY)
    daemon.stop()
    lab.node.nft(OTHER_TABLE)
    try:
        first, second = cleanup(lab.node), cleanup(lab.node)
        assert (first.returncode, second.returncode) == (0, 0), f"{first.stderr}\n{second.stderr}"
        ruleset = lab.node.ruleset()
        assert "dataplane" not in ruleset, ruleset
        assert "table inet other" in ruleset
        outcome = tcp_request(lab.client, STEADY, 80, timeout=0.5)
        assert outcome.failure == Failure.UNREACHABLE, f"a ClusterIP after cleanup: {outcome}"
    finally:
        lab.node.run("nft", "delete", "table", "inet", "other", check=False)
