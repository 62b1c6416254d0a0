"""Services end to end: real packets through `dataplane run` in network namespaces.

One lab and one daemon for the module; each test owns its Services (own names,
ClusterIPs and ports), so tests do not see each other's changes.

Address plan
    client          192.168.50.2/24, default route via the node
    node            192.168.50.1 (client side), 10.244.1.1 (on every Pod veth); runs `dataplane run`
    pods            pod1 10.244.1.11, pod2 10.244.1.12, pod3 10.244.1.13 (routed /32 veths)
                    echo servers on TCP 80 and 8080, UDP 80 and 5353
    cluster CIDR    10.244.0.0/16 (10.244.1.14 is a Pod IP with no namespace behind it)
    ClusterIPs      10.96.0.0/12:
                      10.96.0.10 spread        http 80/TCP, dns 53/UDP -> 5353
                      10.96.0.11 nodeport      NodePorts 30080/TCP, 30053/UDP
                      10.96.0.12 lb            ingress 192.168.60.10, NodePort 30081
                      10.96.0.13 external      externalIPs 192.168.70.10
                      10.96.0.20 multi         a 80->80, b 81->8080 /TCP, c 53->5353 /UDP; pod3 not ready
                      10.96.0.30 hairpin       only pod1
                      10.96.0.40 named         targetPort http-web / echo-udp, from Pods
                      10.96.0.41 named-mixed   http-web is 8080 on one Pod and 80 on another
                      10.96.0.50-52            no usable endpoint (empty slice, no matching Pod, none ready)
                      10.96.0.60-62            endpoint removal (slice TCP, slice UDP, Pods TCP)
                      10.96.0.70-72            broken manifest
                      10.96.0.80               another table's rules
    LoadBalancer    192.168.60.10; externalIP 192.168.70.10 (both routed to the node by the client's default)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pytest

from dataplane.lab import (
    Daemon, Failure, Lab, ManifestDir, UdpSession, environment_problem, request, sample, tally, tcp_request,
    udp_request, wait_until,
)
from dataplane.lab.manifests import endpoint_slice, pod, port, service

PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]

NODE_IP = "192.168.50.1"
CLIENT_IP = "192.168.50.2"
POD_IPS = {"pod1": "10.244.1.11", "pod2": "10.244.1.12", "pod3": "10.244.1.13"}
ALL = frozenset(POD_IPS)
GHOST_IP = "10.244.1.14"
LB_IP = "192.168.60.10"
EXTERNAL_IP = "192.168.70.10"

CONVERGENCE = 2.0  # seconds from a manifest change to the kernel (issue 2)


def addresses(*names: str) -> list[str]:
    return [POD_IPS[n] for n in names]


def web_ports(http_node_port: int | None = None, dns_node_port: int | None = None) -> list[dict]:
    return [port("http", 80, node_port=http_node_port), port("dns", 53, 5353, "UDP", node_port=dns_node_port)]


WEB_SLICE_PORTS = [("http", 80, "TCP"), ("dns", 5353, "UDP")]


def web(name: str, cluster_ip: str, pods=ALL, not_ready=(), **service_fields) -> list[dict]:
    """A Service with http 80/TCP and dns 53/UDP->5353, and its EndpointSlice."""
    ports = service_fields.pop("ports", None) or web_ports()
    return [
        service(name, cluster_ip, ports, **service_fields),
        endpoint_slice(name, addresses(*sorted(pods)) + list(not_ready), WEB_SLICE_PORTS, not_ready=not_ready),
    ]


NAMED_PODS = [
    pod(f"named-{n}", ip, {"app": "named"}, [("http-web", 8080, "TCP"), ("echo-udp", 5353, "UDP")])
    for n, ip in POD_IPS.items()
] + [pod("named-ghost", GHOST_IP, {"app": "named"}, [("http-web", 8080, "TCP")], ready=False)]

MIXED_PODS = [
    pod("mixed-pod1", POD_IPS["pod1"], {"app": "mixed"}, [("http-web", 8080, "TCP")]),
    pod("mixed-pod2", POD_IPS["pod2"], {"app": "mixed"}, [("http-web", 80, "TCP")]),
]

INITIAL = {
    "spread.yaml": web("spread", "10.96.0.10"),
    "nodeport.yaml": web("nodeport", "10.96.0.11", type="NodePort", ports=web_ports(30080, 30053)),
    "lb.yaml": web("lb", "10.96.0.12", type="LoadBalancer", ingress_ips=[LB_IP],
                   ports=[port("http", 80, node_port=30081)]),
    "external.yaml": web("external", "10.96.0.13", external_ips=[EXTERNAL_IP]),
    "multi.yaml": [
        service("multi", "10.96.0.20", [port("a", 80), port("b", 81, 8080), port("c", 53, 5353, "UDP")]),
        endpoint_slice("multi", addresses("pod1", "pod2", "pod3"), [("a", 80, "TCP"), ("b", 8080, "TCP"),
                                                                     ("c", 5353, "UDP")],
                       not_ready=addresses("pod3")),
    ],
    "hairpin.yaml": web("hairpin", "10.96.0.30", pods={"pod1"}),
    "named.yaml": [
        service("named", "10.96.0.40", [port("http", 80, "http-web"), port("dns", 53, "echo-udp", "UDP")],
                selector={"app": "named"}),
        *NAMED_PODS,
    ],
    "named-mixed.yaml": [service("named-mixed", "10.96.0.41", [port("http", 80, "http-web")],
                                 selector={"app": "mixed"}), *MIXED_PODS],
    "empty.yaml": [
        service("empty", "10.96.0.50", web_ports(30050), type="NodePort"),
        endpoint_slice("empty", [], WEB_SLICE_PORTS),
    ],
    "unselected.yaml": [service("unselected", "10.96.0.51", web_ports(), selector={"app": "nobody"})],
    "notready.yaml": web("notready", "10.96.0.52", pods=(), not_ready=addresses("pod1", "pod2")),
}


@pytest.fixture(scope="module")
def lab():
    with Lab.build() as lab:
        lab.start_echo(tcp=[80, 8080], udp=[80, 5353])
        yield lab


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    manifests = ManifestDir(tmp_path_factory.mktemp("manifests"))
    for filename, documents in INITIAL.items():
        manifests.write(filename, documents)
    return manifests


@pytest.fixture(scope="module", params=["kernel", "userspace"])
def daemon(request, lab, manifests, tmp_path_factory):
    """Every scenario runs once per proxy mode: userspace mode must pass them unchanged (issue 3)."""
    log = tmp_path_factory.mktemp("daemon") / "dataplane.log"
    with Daemon.for_source(lab.node, manifests.path, log, extra=["-v", "--proxy-mode", request.param]) as daemon:
        yield daemon


# -- the packet-flow table ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flow:
    source: str  # "client" or a pod name
    address: str
    port: int
    protocol: str
    endpoints: frozenset[str]  # the pods that must all answer, and no other
    target: int  # the port the pod must see
    masquerade: str  # "always", or "hairpin": only when the endpoint is the source pod


FLOWS = {
    "clusterip-tcp-from-client": Flow("client", "10.96.0.10", 80, "TCP", ALL, 80, "always"),
    "clusterip-udp-from-client": Flow("client", "10.96.0.10", 53, "UDP", ALL, 5353, "always"),
    "clusterip-tcp-from-pod": Flow("pod2", "10.96.0.10", 80, "TCP", ALL, 80, "hairpin"),
    "clusterip-udp-from-pod": Flow("pod2", "10.96.0.10", 53, "UDP", ALL, 5353, "hairpin"),
    "nodeport-tcp": Flow("client", NODE_IP, 30080, "TCP", ALL, 80, "always"),
    "nodeport-udp": Flow("client", NODE_IP, 30053, "UDP", ALL, 5353, "always"),
    "nodeport-clusterip-too": Flow("client", "10.96.0.11", 80, "TCP", ALL, 80, "always"),
    "loadbalancer-ingress-ip": Flow("client", LB_IP, 80, "TCP", ALL, 80, "always"),
    "loadbalancer-nodeport": Flow("client", NODE_IP, 30081, "TCP", ALL, 80, "always"),
    "external-ip-tcp": Flow("client", EXTERNAL_IP, 80, "TCP", ALL, 80, "always"),
    "external-ip-udp": Flow("client", EXTERNAL_IP, 53, "UDP", ALL, 5353, "always"),
    "multiport-a": Flow("client", "10.96.0.20", 80, "TCP", frozenset({"pod1", "pod2"}), 80, "always"),
    "multiport-b-other-target": Flow("client", "10.96.0.20", 81, "TCP", frozenset({"pod1", "pod2"}), 8080, "always"),
    "multiport-c-udp": Flow("client", "10.96.0.20", 53, "UDP", frozenset({"pod1", "pod2"}), 5353, "always"),
    "hairpin-tcp": Flow("pod1", "10.96.0.30", 80, "TCP", frozenset({"pod1"}), 80, "always"),
    "hairpin-udp": Flow("pod1", "10.96.0.30", 53, "UDP", frozenset({"pod1"}), 5353, "always"),
    "hairpin-among-others": Flow("pod1", "10.96.0.10", 80, "TCP", ALL, 80, "hairpin"),
    "named-target-port-tcp": Flow("client", "10.96.0.40", 80, "TCP", ALL, 8080, "always"),
    "named-target-port-udp": Flow("client", "10.96.0.40", 53, "UDP", ALL, 5353, "always"),
}


def source_ns(lab: Lab, source: str):
    return lab.client if source == "client" else lab.pod(source).ns


@pytest.mark.parametrize("flow", FLOWS.values(), ids=FLOWS.keys())
def test_packet_flow(lab, daemon, flow: Flow):
    ns = source_ns(lab, flow.source)
    source_ip = CLIENT_IP if flow.source == "client" else POD_IPS[flow.source]
    outcomes = sample(lambda: request(flow.protocol, ns, flow.address, flow.port), flow.endpoints,
                      tries=100, at_least=20, give_up_after=3)
    assert set(tally(outcomes)) == flow.endpoints, f"answers: {tally(outcomes)}"
    for outcome in outcomes:
        reply = outcome.reply
        assert reply.local == (POD_IPS[reply.pod], flow.target)
        masqueraded = reply.peer[0] != source_ip
        expected = flow.masquerade == "always" or reply.pod == flow.source
        assert masqueraded == expected, f"{reply}: masquerade expected {expected}"


def test_named_target_port_resolves_per_pod(lab, daemon):
    outcomes = sample(lambda: tcp_request(lab.client, "10.96.0.41", 80), {"pod1", "pod2"}, at_least=20,
                      give_up_after=3)
    assert {(o.reply.pod, o.reply.local[1]) for o in outcomes} == {("pod1", 8080), ("pod2", 80)}


# -- refusals ----------------------------------------------------------------------------------------------------

REFUSALS = {
    "empty-slice-tcp": ("TCP", "10.96.0.50", 80),
    "empty-slice-udp": ("UDP", "10.96.0.50", 53),
    "empty-slice-nodeport": ("TCP", NODE_IP, 30050),
    "no-matching-pod-tcp": ("TCP", "10.96.0.51", 80),
    "no-matching-pod-udp": ("UDP", "10.96.0.51", 53),
    "none-ready-tcp": ("TCP", "10.96.0.52", 80),
    "none-ready-udp": ("UDP", "10.96.0.52", 53),
}


@pytest.mark.parametrize("protocol, address, port_", REFUSALS.values(), ids=REFUSALS.keys())
def test_service_without_endpoints_refuses_at_once(lab, daemon, protocol, address, port_):
    outcome = request(protocol, lab.client, address, port_, timeout=1.0)
    assert outcome.failure == Failure.REFUSED, outcome
    assert outcome.elapsed < 0.2, outcome


# -- changes -----------------------------------------------------------------------------------------------------

def serving(ns, address: str, port_: int, protocol: str = "TCP", pods=ALL, what: str = "") -> None:
    """Waits until every one of `pods` answers at address:port (the change reached the kernel)."""
    def all_answer():
        outcomes = sample(lambda: request(protocol, ns, address, port_, timeout=0.3), pods, tries=30, give_up_after=3)
        return set(tally(outcomes)) == pods
    wait_until(all_answer, timeout=10, what=what or f"{sorted(pods)} serve {address}:{port_}/{protocol}")


def shrink_by_slice(manifests: ManifestDir, pods) -> None:
    manifests.write("shrink-slice.yaml", web("shrink-slice", "10.96.0.60", pods=pods))


def shrink_by_pods(manifests: ManifestDir, pods) -> None:
    """Endpoints derived from Pod manifests, one file per Pod; a Pod leaves when its file is deleted."""
    manifests.write("shrink-pods.yaml", service("shrink-pods", "10.96.0.62", [port("http", 80)],
                                                selector={"app": "shrink"}))
    for name, ip in POD_IPS.items():
        if name in pods:
            manifests.write(f"shrink-pods-{name}.yaml", pod(f"shrink-{name}", ip, {"app": "shrink"}))
        else:
            manifests.remove(f"shrink-pods-{name}.yaml")


@pytest.mark.parametrize("shrink, address", [(shrink_by_slice, "10.96.0.60"), (shrink_by_pods, "10.96.0.62")],
                         ids=["endpointslice-rewritten", "pod-manifest-deleted"])
def test_removed_endpoint_gets_no_new_connections_within_2s(lab, daemon, manifests, shrink, address):
    shrink(manifests, ALL)
    serving(lab.client, address, 80)

    shrink(manifests, {"pod1", "pod2"})
    changed = time.monotonic()
    time.sleep(max(0.0, changed + CONVERGENCE - time.monotonic()))

    outcomes = [tcp_request(lab.client, address, 80) for _ in range(40)]
    assert tally(outcomes).keys() == {"pod1", "pod2"}, f"{CONVERGENCE} s after the change: {tally(outcomes)}"


def test_udp_client_moves_off_a_deleted_endpoint(lab, daemon, manifests):
    manifests.write("udpmove.yaml", web("udpmove", "10.96.0.61"))
    serving(lab.client, "10.96.0.61", 53, "UDP")

    with UdpSession(lab.client, "10.96.0.61", 53, timeout=0.3) as session:
        first = session.request()
        assert first.ok, first
        stuck = first.reply.pod
        assert {session.request().pod for _ in range(5)} == {stuck}  # one flow, one endpoint

        manifests.write("udpmove.yaml", web("udpmove", "10.96.0.61", pods=ALL - {stuck}))
        changed = time.monotonic()

        def moved_off():
            outcome = session.request()
            return outcome.ok and outcome.pod != stuck

        wait_until(moved_off, timeout=CONVERGENCE, interval=0.1,
                   what=f"the UDP flow from {session.local} moves off {stuck}")
        took = time.monotonic() - changed
        after = [session.request() for _ in range(10)]

    assert all(o.ok and o.pod != stuck for o in after), f"after moving ({took:.2f} s): {tally(after)}"


BROKEN_YAML = "apiVersion: v1\nkind: Service\nmetadata: {name: fragile\nspec: [ports:\n"


def test_broken_manifest_leaves_the_rest_serving(lab, daemon, manifests):
    manifests.write("fragile.yaml", web("fragile", "10.96.0.70"))
    manifests.write("sturdy.yaml", web("sturdy", "10.96.0.71"))
    serving(lab.client, "10.96.0.70", 80)
    serving(lab.client, "10.96.0.71", 80)
    try:
        broken = manifests.write("fragile.yaml", BROKEN_YAML)
        # A later, good change is still picked up: the daemon goes on reading after the broken file.
        manifests.write("latecomer.yaml", web("latecomer", "10.96.0.72"))
        serving(lab.client, "10.96.0.72", 80)

        wait_until(lambda: broken.name in daemon.log_text(), timeout=CONVERGENCE,
                   what="the daemon's log names the broken file")
        assert daemon.running
        assert daemon.health() == 200
        for address in ("10.96.0.71", "10.96.0.70"):  # fragile keeps its last good content
            outcomes = sample(lambda: tcp_request(lab.client, address, 80), ALL, give_up_after=3)
            assert set(tally(outcomes)) == ALL, f"{address}: {tally(outcomes)}"
    finally:
        for filename in ("fragile.yaml", "sturdy.yaml", "latecomer.yaml"):
            manifests.remove(filename)


OTHER_TABLE = """
table inet other {
    chain c {
        type filter hook input priority 0; policy accept;
        counter
    }
}
"""


def test_rules_of_another_table_survive_syncs(lab, daemon, manifests):
    lab.node.nft(OTHER_TABLE)
    try:
        before = lab.node.run("nft", "list", "table", "inet", "other").stdout
        manifests.write("other.yaml", web("other", "10.96.0.80"))
        serving(lab.client, "10.96.0.80", 80)
        manifests.write("other.yaml", web("other", "10.96.0.80", pods={"pod2"}))
        serving(lab.client, "10.96.0.80", 80, pods={"pod2"})
        manifests.remove("other.yaml")
        wait_until(lambda: not tcp_request(lab.client, "10.96.0.80", 80, timeout=0.3).ok, timeout=10,
                   what="the deleted Service stops answering")

        after = lab.node.run("nft", "list", "table", "inet", "other").stdout
        assert _without_counts(after) == _without_counts(before)
        assert "counter packets" in after
    finally:
        lab.node.run("nft", "delete", "table", "inet", "other", check=False)


def _without_counts(listing: str) -> str:
    return re.sub(r"counter packets \d+ bytes \d+", "counter", listing)
