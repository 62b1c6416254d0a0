"""Balancing tables in the kernel: where real flows go, on two nodes, and when an endpoint leaves.

Each node is a network namespace holding the ruleset `dataplane` renders (applied by
nat/nftables.py, as the daemon does), with many local source addresses on a veth link.
Flows are UDP datagrams sent from the node itself (the output hook meets the same
`services` dispatch as prerouting); which endpoint each one went to is read from
conntrack's reply tuple, so no endpoint needs to exist: this is the kernel's own choice.

Address plan: sources 172.16.0.1-64 on the veth link, node A 192.168.50.1, node B
192.168.51.1 (their NodePort addresses), Service 10.96.7.1 (NodePort 30701), endpoints
10.244.1.1-10 port 8080.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

import pytest

from dataplane.config import NodeSettings
from dataplane.lab.manifests import endpoint_slice, port, service
from dataplane.lab.netns import Netns
from dataplane.lb.tables import DEFAULT_TABLE_SIZE, TABLE_SIZE_ANNOTATION, default_table_size, slot_of
from dataplane.model import parse_objects
from dataplane.nat import plan
from dataplane.nat.nftables import NftCommand, Nftables
from dataplane.nat.render import RulesetBuilder
from dataplane.sync.store import Store

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("conntrack") is None, reason="conntrack is not installed"),
]

SOURCES = [f"172.16.0.{i}" for i in range(1, 65)]
PORTS = range(40000, 40064)  # per source: 4,096 flows
CLUSTER_IP, NODE_PORT = "10.96.7.1", 30701
ENDPOINTS = [f"10.244.1.{i}" for i in range(1, 11)]
SETTINGS = NodeSettings(node_name="node-a", cluster_cidrs=("10.244.0.0/16",))
_serial = itertools.count(9001)


def manifests(endpoints: list[str], size: int | None = None) -> list[dict]:
    svc = service("maglev", CLUSTER_IP, [port("udp", 53, 8080, "UDP", node_port=NODE_PORT)], type="NodePort")
    svc["metadata"]["annotations"] = {"dataplane.io/lb-algorithm": "maglev",
                                      **({TABLE_SIZE_ANNOTATION: str(size)} if size else {})}
    return [svc, endpoint_slice("maglev", endpoints, [("udp", 8080, "UDP")])]


class Node:
    """A namespace with dataplane's ruleset for the Services it is given, and many source addresses."""

    def __init__(self, address: str):
        self.ns = Netns.create(f"dplab-{os.getpid()}-{next(_serial)}-tables")
        self.address = address
        self.nft = Nftables(NftCommand(self.ns.argv("nft")), netns=self.ns.name)
        self.store, self.builder, self.state = Store(), RulesetBuilder(SETTINGS), plan.Programmed()
        try:
            self._link()
        except BaseException:
            self.ns.delete()
            raise

    def _link(self) -> None:
        # A veth pair with both ends here (this kernel has no dummy links): what leaves d0 dies at d1.
        ns = self.ns
        ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        for link in ("d0", "d1"):
            ns.ip("link", "set", link, "up")
        ns.ip("addr", "add", f"{self.address}/24", "dev", "d0")
        for source in SOURCES:
            ns.ip("addr", "add", f"{source}/32", "dev", "d0")
        for cidr in ("10.96.0.0/12", "10.244.0.0/16"):
            ns.ip("route", "add", cidr, "dev", "d0")

    def publish(self, endpoints: list[str], size: int | None = None):
        """Programs the Service with `endpoints`, incrementally after the first time; returns the transaction."""
        objects, errors = parse_objects(manifests(endpoints, size), "maglev.yaml")
        assert not errors
        self.store.replace("maglev.yaml", objects)
        tx, change = self.state.plan(self.builder.build(self.store.snapshot(), [self.address]))
        self.nft.apply(tx)
        assert self.nft.fallbacks == 0, "a balancing table's transaction went to nft as text"
        self.state = self.state.commit(change)
        return tx

    def send(self, destination: str, dport: int) -> dict[tuple[str, int], str]:
        """One datagram per (source, port) to destination:dport; (source, port) -> the endpoint conntrack shows."""
        script = (
            "import socket\n"
            f"for s in {SOURCES!r}:\n"
            f"    for p in {list(PORTS)!r}:\n"
            "        k = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "        k.bind((s, p))\n"
            f"        k.sendto(b'x', ({destination!r}, {dport}))\n"
            "        k.close()\n"
        )
        self.ns.run("python3", "-c", script)
        listing = self.ns.run("conntrack", "-L", "-p", "udp", "--orig-dst", destination).stdout
        found = {}
        for line in listing.splitlines():
            m = re.search(r"src=(\S+) dst=\S+ sport=(\d+) dport=\d+ .*?src=(\S+) dst=\S+ sport=(\d+)", line)
            if m:
                found[(m.group(1), int(m.group(2)))] = m.group(3)
        assert len(found) == len(SOURCES) * len(PORTS), f"{len(found)} flows in conntrack"
        return found

    def forget_flows(self) -> None:
        self.ns.run("conntrack", "-F", check=False)

    def delete(self) -> None:
        self.ns.delete()


@pytest.fixture
def nodes():
    made: list[Node] = []
    yield lambda address: made.append(Node(address)) or made[-1]
    for node in made:
        node.delete()


def test_two_nodes_send_a_flow_to_the_same_endpoint(nodes) -> None:
    """Same Services, two nodes: every (source, port) reaches the same endpoint on both, through the
    ClusterIP and through each node's own NodePort address; and it is the slot the kernel hashed."""
    a, b = nodes("192.168.50.1"), nodes("192.168.51.1")
    for node in (a, b):
        node.publish(ENDPOINTS)
    via_cluster_ip = a.send(CLUSTER_IP, 53)
    assert b.send(CLUSTER_IP, 53) == via_cluster_ip
    a.forget_flows()
    b.forget_flows()
    assert a.send(a.address, NODE_PORT) == via_cluster_ip  # one table for the port's every address
    assert b.send(b.address, NODE_PORT) == via_cluster_ip
    assert set(via_cluster_ip.values()) == set(ENDPOINTS)
    # Flows that hash to one slot share an endpoint (a slot holds one).
    by_slot: dict[int, set[str]] = {}
    for (source, sport), endpoint in via_cluster_ip.items():
        by_slot.setdefault(slot_of(source, sport, default_table_size(len(ENDPOINTS))), set()).add(endpoint)
    assert all(len(endpoints) == 1 for endpoints in by_slot.values())


# Maglev moves more than 1/N of the slots when M/N is small (nat/README.md, "Balancing tables"):
# at the default 4093 slots about 11.0% (at most 11.3%) for 1 of 10; at 65537, 10.4% (at most 10.7%).
MOVED_AT_MOST = {DEFAULT_TABLE_SIZE: 1 / len(ENDPOINTS) + 0.015, 65537: 1 / len(ENDPOINTS) + 0.01}


@pytest.mark.parametrize("size", sorted(MOVED_AT_MOST))
def test_an_endpoint_leaving_moves_only_its_flows(nodes, size: int) -> None:
    """One of N endpoints leaves: one transaction rewriting about M/N slots; established flows stay
    (conntrack); new flows with the same 5-tuples move at most 1/N + 1% of the time with 65537 slots
    (the issue's goal), 1/N + 1.5% with the default."""
    node = nodes("192.168.50.1")
    node.publish(ENDPOINTS, size)
    before = node.send(CLUSTER_IP, 53)
    gone = ENDPOINTS[3]
    tx = node.publish([e for e in ENDPOINTS if e != gone], size)
    rewritten: dict[str, int] = {}
    for command in tx:
        if getattr(command.subject, "container", "").startswith("slots-"):
            rewritten[command.verb] = rewritten.get(command.verb, 0) + len(command.subject.elements)
    assert rewritten["delete"] == rewritten["add"] <= (MOVED_AT_MOST[size] + 0.01) * size, rewritten
    assert node.send(CLUSTER_IP, 53) == before  # conntrack keeps every established flow where it was
    node.forget_flows()
    after = node.send(CLUSTER_IP, 53)
    moved = [flow for flow in before if after[flow] != before[flow]]
    assert all(after[flow] != gone for flow in after)
    assert {flow for flow in before if before[flow] == gone} <= set(moved)
    fraction = len(moved) / len(before)
    print(f"{size} slots: {fraction:.4f} of {len(before)} flows moved, {rewritten['add']} slots rewritten")
    assert fraction <= MOVED_AT_MOST[size], f"{fraction:.3f} of the flows moved"


# Userspace mode with real packets through a daemon: Pods 10.244.1.11-13 (pod1-3, echo on TCP and
# UDP 80), client 192.168.50.2 and its aliases 192.168.50.100-115, ClusterIPs 10.96.9.1-3.
TABLE_PODS = {"10.244.1.11": "pod1", "10.244.1.12": "pod2", "10.244.1.13": "pod3"}


def userspace_manifests() -> dict[str, list[dict]]:
    pods = sorted(TABLE_PODS)
    maglev = service("maglev", "10.96.9.1", [port("http", 80), port("dns", 53, 80, "UDP")])
    maglev["metadata"]["annotations"] = {"dataplane.io/lb-algorithm": "maglev"}
    weighted = service("weighted", "10.96.9.2", [port("http", 80)])
    weighted["metadata"]["annotations"] = {"dataplane.io/weights": "10.244.1.11=3, 10.244.1.13=0"}  # pod3 drains
    # Maglev with 3-slot tables: `small` (2 endpoints) has one; `big` (3, not fewer than the slots) has
    # none, so userspace mode queues it: the same Service, a port each way.
    mixed = service("mixed", "10.96.9.3", [port("small", 80), port("big", 81, 80)])
    mixed["metadata"]["annotations"] = {"dataplane.io/lb-algorithm": "maglev", TABLE_SIZE_ANNOTATION: "3"}
    return {
        "maglev.yaml": [maglev, endpoint_slice("maglev", pods, [("http", 80, "TCP"), ("dns", 80, "UDP")])],
        "weighted.yaml": [weighted, endpoint_slice("weighted", pods, [("http", 80, "TCP")])],
        "mixed.yaml": [mixed, endpoint_slice("mixed", pods[:2], [("small", 80, "TCP")], name="mixed-small"),
                       endpoint_slice("mixed", pods, [("big", 80, "TCP")], name="mixed-big")],
    }


def table_pod(documents: list[dict], port_name: str, saddr: str, sport: int) -> str:
    """The Pod the port's kernel table names for a flow from saddr:sport (lb/tables: the fill, the jhash)."""
    from dataplane.lb.tables import fill, table_size

    objects, errors = parse_objects(documents, "t.yaml")
    assert not errors
    store = Store()
    store.replace("t.yaml", objects)
    (state,) = store.snapshot().services.values()
    (backends,) = [b for p, b in state.port_backends() if p.name == port_name]
    size = table_size(state.service, None, len(backends))
    return TABLE_PODS[fill(state.service, backends, size)[slot_of(saddr, sport, size)].ip]


def test_userspace_mode_queues_no_flow_of_a_table_balanced_port(tmp_path) -> None:
    """A Maglev Service and a weighted one (weight 0 draining pod3), in userspace mode, from 17 client
    addresses: every flow reaches the Pod its kernel table names, and nothing is queued to userspace
    (nfnetlink_queue's and the forwarder's counters stay at 0, no fail-open). Then the Maglev Service's
    port without a table is queued, so the counters do count."""
    import json

    from dataplane.lab import (AddressPlan, Daemon, Lab, ManifestDir, TcpSession, UdpSession, environment_problem,
                               http_get)
    from dataplane.lab.daemon import dataplane_executable

    problem = environment_problem()
    if problem is not None:
        pytest.skip(f"namespace tests: {problem}")
    usage = subprocess.run([dataplane_executable(), "run", "--help"], capture_output=True, text=True).stdout
    if "userspace" not in usage:
        pytest.skip("this build has no userspace mode")
    documents = userspace_manifests()
    manifest_dir = ManifestDir(tmp_path / "manifests")
    for name, docs in documents.items():
        manifest_dir.write(name, docs)

    def queued(lab) -> int:
        text = lab.node.run("cat", "/proc/net/netfilter/nfnetlink_queue", check=False).stdout
        return sum(int(line.split()[7]) for line in text.splitlines() if line.strip())  # id_sequence

    def status(lab) -> dict:
        code, body = http_get(lab.node, "127.0.0.1", 10249, "/status", timeout=10)
        assert code == 200
        return json.loads(body)

    with Lab.build(AddressPlan(client_aliases=16)) as lab:
        lab.start_echo(tcp=[80], udp=[80])
        with Daemon.for_source(lab.node, manifest_dir.path, tmp_path / "dataplane.log",
                               extra=["--proxy-mode", "userspace"]):
            wrong, reached = [], {}
            for address in lab.plan.client_sources:
                for name, ip, service_port, port_name, session in (
                        ("maglev.yaml", "10.96.9.1", 80, "http", TcpSession),
                        ("maglev.yaml", "10.96.9.1", 53, "dns", UdpSession),
                        ("weighted.yaml", "10.96.9.2", 80, "http", TcpSession),
                        ("mixed.yaml", "10.96.9.3", 80, "small", TcpSession)):
                    for _ in range(2):
                        with session(lab.client, ip, service_port, 1.0, (address, 0)) as flow:
                            failed = flow.connect() if session is TcpSession else None
                            outcome = failed or flow.request()
                            local_ip, local_port = flow.local
                        want = table_pod(documents[name], port_name, local_ip, local_port)
                        reached.setdefault((name, port_name), set()).add(outcome.pod)
                        if not outcome.ok or outcome.pod != want:
                            wrong.append(f"{ip}:{service_port} from {local_ip}:{local_port}: the table names "
                                         f"{want}, got {outcome}")
            assert wrong == []
            assert reached[("weighted.yaml", "http")] == {"pod1", "pod2"}  # pod3 drained
            assert reached[("maglev.yaml", "http")] == set(TABLE_PODS.values())
            body = status(lab)
            assert queued(lab) == 0
            assert (body["packets_queued"], body["undecided"], body["fail_open"]) == (0, 0, 0)
            paths = {p["service"]: p["paths"] for p in body["paths"]}
            assert paths["default/mixed:small"] == ["kernel-table"] and paths["default/mixed:big"] == ["forwarder"]
            for address in lab.plan.client_sources[:4]:
                with TcpSession(lab.client, "10.96.9.3", 81, 1.0, (address, 0)) as flow:
                    outcome = flow.connect() or flow.request()
                assert outcome.ok, outcome
            assert queued(lab) >= 4 and status(lab)["packets_queued"] >= 4


def test_one_of_thirty_leaving_at_the_default_size_moves_at_most_one_thirtieth_and_one_percent(nodes) -> None:
    """N = 30 at its default size (65,537 slots, the same for 29): of 4,096 real flows, at most 1/N + 1%
    reach another endpoint, none the one that left (bench.tables --moved: N = 2, 5, 10, 30, 16,384 flows)."""
    endpoints = [f"10.244.2.{i}" for i in range(1, 31)]
    assert default_table_size(30) == default_table_size(29) == 65537
    node = nodes("192.168.50.1")
    node.publish(endpoints)
    before = node.send(CLUSTER_IP, 53)
    node.publish(endpoints[1:])
    node.forget_flows()
    after = node.send(CLUSTER_IP, 53)
    moved = sum(1 for flow in before if after[flow] != before[flow]) / len(before)
    assert endpoints[0] not in after.values()
    assert moved <= 1 / 30 + 0.01, f"{moved:.4f} of the flows moved"
