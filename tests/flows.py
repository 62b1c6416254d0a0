"""The packet-flow table: Service semantics as (source, destination) -> outcome.

One table, checked twice: with real packets between network namespaces
(tests/e2e/test_packet_flows.py) and by tracing the rendered ruleset
(tests that trace it over an in-memory nftables). Each row names the
behaviour it pins.

Address plan
    client   192.168.50.2   outside the cluster; default route via the node
    node     192.168.50.1   (client side) and 10.244.1.1 (every Pod veth); runs dataplane,
                            node name "node1", zone "zone-a"; cluster CIDR 10.244.0.0/16,
                            Service CIDR 10.96.0.0/12
    pods     pod1 10.244.1.11, pod2 10.244.1.12   on node1 (this node)
             pod3 10.244.1.13, pod4 10.244.1.14   on node2 (their manifests say so; physically
                                                  they hang off this node too, which lets the
                                                  client reach them when a rule sends it there)
             each echoes its name and the source it saw on TCP 80 and UDP 80
    ClusterIPs 10.96.5.0/24, LoadBalancer 192.168.60.0/24, externalIPs 192.168.70.0/24,
    NodePorts 302xx

Who decided (userspace mode)
    Services 19-23 (IPv4) and 44-46 (IPv6) carry `dataplane.io/weights` that leave the
    forwarder one endpoint (or drain one), and algorithm least-conn (which needs per-flow
    state, so userspace mode queues them), while the kernel's own `numgen` pick spreads
    flows over all of them; their rows say, in `userspace`, which Pods the forwarder may
    choose (Forwarder) or that userspace mode leaves the row to the kernel (KERNEL).

Balancing tables (both modes; nat/README.md "Balancing tables")
    Services 24-29 (IPv4) and 47-49, 51 (IPv6) are balanced by kernel tables (Maglev, or weights
    under the default algorithm): each row says (Hashed) which endpoint every flow reaches,
    from its source address and port (`table_pick`), checked for many sources.
    The client then also sends from CLIENT_ADDRESSES more addresses (192.168.50.100 ...,
    fd00:50::100 ...; dataplane/lab/topology.py AddressPlan.client_sources), so a row is
    seen deciding for many clients, as affinity needs.

IPv6 (FLOWS6, MANIFESTS6; a dual-stack lab: dataplane/lab/topology.py, AddressPlan(dual_stack=True))
    client   fd00:50::2     node fd00:50::1 (client side) and fd00:244:1::1 (every Pod veth)
    pods     pod1 fd00:244:1::11 ... pod4 fd00:244:1::14, on the same nodes as above
    cluster CIDR fd00:244::/32, Service CIDR fd00:96::/108
    ClusterIPs fd00:96::5:N, LoadBalancer fd00:60::N, externalIPs fd00:70::N; dual-stack
    Services also hold 10.96.5.N. Services 30 and up (NodePorts 300xx, 310xx), apart from MANIFESTS'.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataplane.config import DEFAULT_HASH_SEED
from dataplane.lab.manifests import endpoint_slice, port, service
from dataplane.lab.topology import AddressPlan
from dataplane.lb import maglev
from dataplane.lb.policy import ALGORITHM_ANNOTATION, WEIGHTS_ANNOTATION
from dataplane.lb.tables import DEFAULT_TABLE_SIZE, slot_of

NODE_NAME, NODE_ZONE = "node1", "zone-a"
CLIENT, NODE_IP = "192.168.50.2", "192.168.50.1"
POD_IPS = {"pod1": "10.244.1.11", "pod2": "10.244.1.12", "pod3": "10.244.1.13", "pod4": "10.244.1.14"}
POD_NODE = {"pod1": "node1", "pod2": "node1", "pod3": "node2", "pod4": "node2"}
CLUSTER_CIDR, SERVICE_CIDR = "10.244.0.0/16", "10.96.0.0/12"
SOURCES = {"client": CLIENT, "node": NODE_IP, **POD_IPS}


@dataclass(frozen=True, slots=True)
class Reached:
    """Every endpoint in `pods` answers, and only those.

    masqueraded: True, the Pod sees a node address; False, it sees the real
    source (a Pod reaching itself is always masqueraded: hairpin); None, not
    checked (the node's own traffic carries a node address anyway).
    """

    pods: frozenset[str]
    masqueraded: bool | None


@dataclass(frozen=True, slots=True)
class Sticky:
    """ClientIP affinity: every connection from one client lands on the same one of `pods`."""

    pods: frozenset[str]


@dataclass(frozen=True, slots=True)
class Forwarder:
    """Userspace mode: the forwarder decides every new flow of the row, and only `pods` may get one.

    The Service's `dataplane.io/weights` give every other endpoint weight 0
    (lb/policy.py), while the kernel's own `numgen` pick (or its affinity sets)
    would spread new flows over all of them: a new flow that reaches another
    Pod was not decided by the forwarder. With one Pod, the forwarder's choice
    for every flow is known in advance. The kernel-mode expectation (`expect`)
    still says where packets may go and how they are masqueraded.
    """

    pods: frozenset[str]


@dataclass(frozen=True, slots=True)
class Hashed:
    """A balancing table (Maglev, or weights): each flow reaches the one Pod the table holds for its
    source address and port (`table_pick`), among `pods` (the table's endpoints; `weights` as the
    Service's annotation gives them, 0: drained); `sticky`: with ClientIP affinity, later connections
    of a client stay on its first one's Pod."""

    pods: tuple[str, ...]
    masqueraded: bool | None
    weights: tuple[tuple[str, int], ...] = ()
    sticky: bool = False


def hashed(*pods: str, masqueraded: bool | None, weights: dict[str, int] | None = None,
           sticky: bool = False) -> Hashed:
    return Hashed(tuple(sorted(pods)), masqueraded, tuple(sorted((weights or {}).items())), sticky)


def table_pick(expect: Hashed, saddr: str, sport: int, size: int = DEFAULT_TABLE_SIZE,
               seed: int = DEFAULT_HASH_SEED) -> str:
    """The Pod a table sends saddr:sport to, restated from the parts: Maglev over the Pods' `ip:port`
    names (sorted by address, as the renderer orders them), the kernel's jhash of the source."""
    ips = POD_IPS6 if ":" in saddr else POD_IPS
    pods = sorted(expect.pods, key=lambda p: ips[p])
    names = [f"[{ips[p]}]:80" if ":" in saddr else f"{ips[p]}:80" for p in pods]
    weights = dict(expect.weights)
    table = maglev.build(names, [weights.get(p, 1) for p in pods], size)
    return pods[table[slot_of(saddr, sport, size, seed)]]


def forwarder(*pods: str) -> Forwarder:
    return Forwarder(frozenset(pods))


# Userspace mode leaves the row to the kernel's own pick, whatever the weights: external
# traffic of an externalTrafficPolicy: Local Service is not queued (README, "Userspace mode").
KERNEL = "KERNEL"

# Userspace mode leaves the row to the Service's kernel balancing table (Maglev, weights): nothing is
# queued for a Service whose algorithm needs no per-flow state (nat/README.md, "Balancing tables").
TABLE = "TABLE"

REJECT = "REJECT"  # refused at once: ICMP port unreachable (TCP: ECONNREFUSED)
DROP = "DROP"  # silently dropped: the client times out


@dataclass(frozen=True, slots=True)
class Flow:
    behaviour: str
    source: str  # "client", "node" or a pod name
    destination: str  # an IP address
    port: int
    protocol: str  # TCP or UDP
    expect: Reached | Sticky | Hashed | str
    userspace: Forwarder | str | None = None  # who decides in userspace mode (KERNEL, TABLE); None: not said

    @property
    def id(self) -> str:
        return self.behaviour


def reached(*pods: str, masqueraded: bool | None) -> Reached:
    return Reached(frozenset(pods), masqueraded)


ALL = ("pod1", "pod2", "pod3", "pod4")
BOTH_PORTS = [("TCP", 30000), ("UDP", 31000)]  # NodePort = base + the Service's number


def _ports(number: int, node_ports: bool) -> list[dict]:
    return [port(proto.lower(), 80, 80, proto, node_port=(base + number) if node_ports else None)
            for proto, base in BOTH_PORTS]


def _endpoints(name: str, pods, conditions: dict[str, dict] | None = None, hints: dict[str, str] | None = None,
               ips: dict[str, str] = POD_IPS, slice_name: str | None = None, address_type: str | None = None):
    slice_ = endpoint_slice(name, [ips[p] for p in pods], [("tcp", 80, "TCP"), ("udp", 80, "UDP")],
                            name=slice_name, address_type=address_type)
    for endpoint, pod_name in zip(slice_["endpoints"], pods):
        endpoint["nodeName"] = POD_NODE[pod_name]
        if conditions and pod_name in conditions:
            endpoint["conditions"] = conditions[pod_name]
        if hints and pod_name in hints:
            endpoint["hints"] = {"forZones": [{"name": hints[pod_name]}]}
    return slice_


def _weights(pods: dict[str, int], ips: dict[str, str]) -> dict[str, str]:
    """The dataplane.io/weights annotation giving each of `pods` its weight (by IP; the others weigh 1)."""
    return {WEIGHTS_ANNOTATION: ", ".join(f"{ips[pod]}={weight}" for pod, weight in pods.items())}


def _only(pod: str, of=ALL) -> dict[str, int]:
    """Weights that leave the forwarder `pod` alone: every other endpoint drained."""
    return {other: 0 for other in of if other != pod}


def _svc(name: str, number: int, pods=ALL, *, kind: str = "ClusterIP", lb: bool = False, external: bool = False,
         conditions=None, hints=None, weights: dict[str, int] | None = None, algorithm: str = "",
         **spec) -> list[dict]:
    node_ports = kind in ("NodePort", "LoadBalancer")
    documents = [service(name, f"10.96.5.{number}", _ports(number, node_ports), type=kind,
                         ingress_ips=[f"192.168.60.{number}"] if lb else (),
                         external_ips=[f"192.168.70.{number}"] if external else (), **spec)]
    annotations = {**(_weights(weights, POD_IPS) if weights else {}),
                   **({ALGORITHM_ANNOTATION: algorithm} if algorithm else {})}
    if annotations:
        documents[0]["metadata"]["annotations"] = annotations
    if pods is not None:
        documents.append(_endpoints(name, pods, conditions, hints))
    return documents


LEAST_CONN = "least-conn"
WEIGHTED = {"pod1": 3, "pod3": 0}  # Service 25's weights (pod2 and pod4 weigh 1)

TERMINATING = {"ready": False, "serving": True, "terminating": True}
GONE = {"ready": False, "serving": False, "terminating": True}

MANIFESTS = {
    "all.yaml": _svc("all", 1),
    "itp-local.yaml": _svc("itp-local", 2, kind="NodePort", internalTrafficPolicy="Local"),
    "itp-none.yaml": _svc("itp-none", 3, ("pod3", "pod4"), internalTrafficPolicy="Local"),
    "etp-local.yaml": _svc("etp-local", 4, ("pod1", "pod3"), kind="LoadBalancer", lb=True,
                           externalTrafficPolicy="Local"),
    "etp-none.yaml": _svc("etp-none", 5, ("pod3", "pod4"), kind="LoadBalancer", lb=True,
                          externalTrafficPolicy="Local"),
    "etp-cluster.yaml": _svc("etp-cluster", 6, kind="LoadBalancer", lb=True, external=True),
    "none.yaml": _svc("none", 7, (), kind="NodePort"),
    "terminating.yaml": _svc("terminating", 8, ("pod1", "pod2"), conditions={"pod1": TERMINATING, "pod2": GONE}),
    "etp-local-term.yaml": _svc("etp-local-term", 9, ("pod1", "pod3"), kind="LoadBalancer", lb=True,
                                externalTrafficPolicy="Local", conditions={"pod1": TERMINATING}),
    "sticky.yaml": _svc("sticky", 10, sessionAffinity="ClientIP"),
    "sticky-self.yaml": _svc("sticky-self", 11, ("pod1",), sessionAffinity="ClientIP"),
    "ranges.yaml": _svc("ranges", 12, ("pod1", "pod2"), kind="LoadBalancer", lb=True,
                        loadBalancerSourceRanges=[f"{CLIENT}/32"]),
    "ranges-node.yaml": _svc("ranges-node", 13, ("pod1", "pod2"), kind="LoadBalancer", lb=True,
                             loadBalancerSourceRanges=[f"{NODE_IP}/32"]),
    # The node's pod-side address is in the range, but it sends from 192.168.50.1.
    "ranges-node-other.yaml": _svc("ranges-node-other", 18, ("pod1", "pod2"), kind="LoadBalancer", lb=True,
                                   loadBalancerSourceRanges=["10.244.1.1/32"]),
    "zoned.yaml": _svc("zoned", 14, ("pod1", "pod3"), hints={"pod1": "zone-a", "pod3": "zone-b"}),
    "zoned-partial.yaml": _svc("zoned-partial", 15, ("pod1", "pod3"), hints={"pod1": "zone-a"}),
    "self.yaml": _svc("self", 17, ("pod1",)),
    "sticky-local.yaml": _svc("sticky-local", 16, ("pod1", "pod2", "pod3"), kind="LoadBalancer", lb=True,
                              externalTrafficPolicy="Local", sessionAffinity="ClientIP"),
    # Who decided: weights leave the forwarder one endpoint (or drain one); see Forwarder. least-conn:
    # the forwarder's (weighted random or round-robin would be a kernel table, as below).
    "decided.yaml": _svc("decided", 19, kind="LoadBalancer", lb=True, external=True, weights=_only("pod3"),
                         algorithm=LEAST_CONN),
    # Two local endpoints of three (local-2-of-3 -> local-pick-2); the forwarder may use pod2 only.
    "decided-local.yaml": _svc("decided-local", 20, ("pod1", "pod2", "pod3"), kind="LoadBalancer", lb=True,
                               externalTrafficPolicy="Local", weights=_only("pod2", ("pod1", "pod2", "pod3")),
                               algorithm=LEAST_CONN),
    "sticky-drained.yaml": _svc("sticky-drained", 21, sessionAffinity="ClientIP", weights={"pod2": 0},
                                algorithm=LEAST_CONN),
    "sticky-decided.yaml": _svc("sticky-decided", 22, kind="LoadBalancer", lb=True, sessionAffinity="ClientIP",
                                weights=_only("pod4"), algorithm=LEAST_CONN),
    "sticky-itp-local.yaml": _svc("sticky-itp-local", 23, internalTrafficPolicy="Local", sessionAffinity="ClientIP",
                                  weights=_only("pod1"), algorithm=LEAST_CONN),
    # Balancing tables: Maglev, and weights (pod1 3, pod3 drained) under the default algorithm.
    "maglev.yaml": _svc("maglev", 24, kind="LoadBalancer", lb=True, external=True, algorithm="maglev"),
    "weighted.yaml": _svc("weighted", 25, kind="NodePort", weights=WEIGHTED),
    "maglev-local.yaml": _svc("maglev-local", 26, ("pod1", "pod2", "pod3"), kind="LoadBalancer", lb=True,
                              externalTrafficPolicy="Local", algorithm="maglev"),
    "maglev-sticky.yaml": _svc("maglev-sticky", 27, kind="LoadBalancer", lb=True, sessionAffinity="ClientIP",
                               algorithm="maglev"),
    "maglev-itp-local.yaml": _svc("maglev-itp-local", 28, kind="NodePort", internalTrafficPolicy="Local",
                                  algorithm="maglev"),
    "maglev-local-none.yaml": _svc("maglev-local-none", 29, ("pod3", "pod4"), kind="LoadBalancer", lb=True,
                                   externalTrafficPolicy="Local", algorithm="maglev"),
}


def cip(n: int) -> str:
    return f"10.96.5.{n}"


def lb(n: int) -> str:
    return f"192.168.60.{n}"


def np(n: int, protocol: str = "TCP") -> int:
    return dict(BOTH_PORTS)[protocol] + n


FLOWS = [
    # ClusterIP, Cluster policy: every ready endpoint; masqueraded from outside the cluster CIDR only.
    Flow("clusterip-tcp-from-outside-reaches-all-masqueraded", "client", cip(1), 80, "TCP", reached(*ALL, masqueraded=True)),
    Flow("clusterip-udp-from-outside-reaches-all-masqueraded", "client", cip(1), 80, "UDP", reached(*ALL, masqueraded=True)),
    Flow("clusterip-tcp-from-pod-reaches-all-unmasqueraded", "pod2", cip(1), 80, "TCP", reached(*ALL, masqueraded=False)),
    Flow("clusterip-udp-from-pod-reaches-all-unmasqueraded", "pod2", cip(1), 80, "UDP", reached(*ALL, masqueraded=False)),
    Flow("hairpin-pod-reaching-itself-through-its-service", "pod1", cip(17), 80, "TCP", reached("pod1", masqueraded=True)),
    Flow("hairpin-udp", "pod1", cip(17), 80, "UDP", reached("pod1", masqueraded=True)),
    Flow("clusterip-from-the-node-itself", "node", cip(1), 80, "TCP", reached(*ALL, masqueraded=None)),
    # internalTrafficPolicy: Local.
    Flow("itp-local-clusterip-reaches-only-local-endpoints", "client", cip(2), 80, "TCP", reached("pod1", "pod2", masqueraded=True)),
    Flow("itp-local-from-pod-reaches-only-local-endpoints", "pod3", cip(2), 80, "UDP", reached("pod1", "pod2", masqueraded=False)),
    Flow("itp-local-nodeport-is-unaffected-by-itp", "client", NODE_IP, np(2), "TCP", reached(*ALL, masqueraded=True)),
    Flow("itp-local-without-local-endpoint-drops-tcp", "client", cip(3), 80, "TCP", DROP),
    Flow("itp-local-without-local-endpoint-drops-udp-from-pod", "pod1", cip(3), 80, "UDP", DROP),
    # externalTrafficPolicy: Local.
    Flow("etp-local-lb-reaches-local-endpoint-keeping-source", "client", lb(4), 80, "TCP", reached("pod1", masqueraded=False), KERNEL),
    Flow("etp-local-lb-udp-keeps-source", "client", lb(4), 80, "UDP", reached("pod1", masqueraded=False), KERNEL),
    Flow("etp-local-nodeport-reaches-local-endpoint-keeping-source", "client", NODE_IP, np(4), "TCP", reached("pod1", masqueraded=False), KERNEL),
    Flow("etp-local-lb-from-pod-short-circuits-to-all", "pod2", lb(4), 80, "TCP", reached("pod1", "pod3", masqueraded=False), KERNEL),
    Flow("etp-local-lb-from-node-reaches-all-masqueraded", "node", lb(4), 80, "TCP", reached("pod1", "pod3", masqueraded=None), KERNEL),
    Flow("etp-local-clusterip-is-cluster-wide", "client", cip(4), 80, "TCP", reached("pod1", "pod3", masqueraded=True)),
    Flow("etp-local-without-local-endpoint-drops-lb", "client", lb(5), 80, "TCP", DROP),
    Flow("etp-local-without-local-endpoint-drops-nodeport-udp", "client", NODE_IP, np(5, "UDP"), "UDP", DROP),
    Flow("etp-local-without-local-endpoint-pods-still-reach-remote", "pod1", lb(5), 80, "TCP", reached("pod3", "pod4", masqueraded=False), KERNEL),
    Flow("etp-local-without-local-endpoint-node-still-reaches-remote", "node", NODE_IP, np(5), "TCP", reached("pod3", "pod4", masqueraded=None), KERNEL),
    Flow("etp-local-without-local-endpoint-clusterip-works", "pod2", cip(5), 80, "TCP", reached("pod3", "pod4", masqueraded=False)),
    Flow("etp-local-only-terminating-local-endpoint-serves", "client", lb(9), 80, "TCP", reached("pod1", masqueraded=False), KERNEL),
    # externalTrafficPolicy: Cluster: external traffic always masqueraded.
    Flow("etp-cluster-lb-reaches-all-masqueraded", "client", lb(6), 80, "TCP", reached(*ALL, masqueraded=True)),
    Flow("etp-cluster-nodeport-udp-reaches-all-masqueraded", "client", NODE_IP, np(6, "UDP"), "UDP", reached(*ALL, masqueraded=True)),
    Flow("etp-cluster-external-ip-reaches-all-masqueraded", "client", "192.168.70.6", 80, "TCP", reached(*ALL, masqueraded=True)),
    Flow("etp-cluster-lb-from-pod-is-masqueraded", "pod1", lb(6), 80, "TCP", reached(*ALL, masqueraded=True)),
    # No endpoints at all: refused at once.
    Flow("no-endpoints-clusterip-tcp-rejects", "client", cip(7), 80, "TCP", REJECT),
    Flow("no-endpoints-clusterip-udp-rejects", "client", cip(7), 80, "UDP", REJECT),
    Flow("no-endpoints-nodeport-rejects", "client", NODE_IP, np(7), "TCP", REJECT),
    Flow("no-endpoints-from-pod-rejects", "pod1", cip(7), 80, "TCP", REJECT),
    Flow("no-endpoints-from-node-rejects", "node", cip(7), 80, "UDP", REJECT),
    # Terminating endpoints.
    Flow("no-ready-endpoint-falls-back-to-serving-terminating", "client", cip(8), 80, "TCP", reached("pod1", masqueraded=True)),
    # Session affinity.
    Flow("affinity-keeps-a-client-on-one-endpoint", "client", cip(10), 80, "TCP", Sticky(frozenset(ALL))),
    Flow("affinity-keeps-a-pod-on-one-endpoint-udp", "pod2", cip(10), 80, "UDP", Sticky(frozenset(ALL))),
    Flow("affinity-hairpin-is-masqueraded", "pod1", cip(11), 80, "TCP", reached("pod1", masqueraded=True)),
    Flow("affinity-with-etp-local-stays-local", "client", lb(16), 80, "TCP", Sticky(frozenset({"pod1", "pod2"})), KERNEL),
    # loadBalancerSourceRanges: LoadBalancer IPs only.
    Flow("source-range-admits-listed-client", "client", lb(12), 80, "TCP", reached("pod1", "pod2", masqueraded=True)),
    Flow("source-range-drops-pods-outside-it", "pod1", lb(12), 80, "TCP", DROP),
    Flow("source-range-does-not-apply-to-nodeports", "pod1", NODE_IP, np(12), "TCP", reached("pod1", "pod2", masqueraded=True)),
    Flow("source-range-drops-client-outside-it", "client", lb(13), 80, "TCP", DROP),
    Flow("source-range-holding-node-ip-admits-the-node", "node", lb(13), 80, "TCP", reached("pod1", "pod2", masqueraded=None)),
    Flow("source-range-holding-a-node-ip-admits-the-node-from-any-of-its-addresses", "node", lb(18), 80, "TCP",
         reached("pod1", "pod2", masqueraded=None)),
    Flow("source-range-holding-a-node-ip-still-drops-others", "client", lb(18), 80, "TCP", DROP),
    # Addresses and ports nobody serves.
    Flow("undefined-port-on-clusterip-rejects-tcp", "client", cip(1), 81, "TCP", REJECT),
    Flow("undefined-port-on-clusterip-rejects-udp-from-pod", "pod1", cip(1), 81, "UDP", REJECT),
    Flow("unallocated-service-address-drops", "client", "10.96.5.200", 80, "TCP", DROP),
    # Topology-aware routing (this node is in zone-a).
    Flow("zone-hints-keep-traffic-in-zone", "client", cip(14), 80, "TCP", reached("pod1", masqueraded=True)),
    Flow("zone-hints-ignored-unless-every-endpoint-has-one", "client", cip(15), 80, "TCP", reached("pod1", "pod3", masqueraded=True)),
    # Who decided, in every kind of pick chain (userspace mode; kernel mode spreads as ever).
    # cluster-N, external-N, nodeport-N: the forwarder's one endpoint, from the client, a Pod, the node.
    Flow("decided-clusterip-from-outside", "client", cip(19), 80, "TCP", reached(*ALL, masqueraded=True), forwarder("pod3")),
    Flow("decided-clusterip-udp-from-pod", "pod2", cip(19), 80, "UDP", reached(*ALL, masqueraded=False), forwarder("pod3")),
    Flow("decided-clusterip-from-the-node", "node", cip(19), 80, "TCP", reached(*ALL, masqueraded=None), forwarder("pod3")),
    Flow("decided-lb-ip-external-chain", "client", lb(19), 80, "TCP", reached(*ALL, masqueraded=True), forwarder("pod3")),
    Flow("decided-external-ip-udp-external-chain", "client", "192.168.70.19", 80, "UDP", reached(*ALL, masqueraded=True),
         forwarder("pod3")),
    Flow("decided-nodeport-chain", "client", NODE_IP, np(19), "TCP", reached(*ALL, masqueraded=True), forwarder("pod3")),
    Flow("decided-nodeport-udp-from-pod", "pod1", NODE_IP, np(19, "UDP"), "UDP", reached(*ALL, masqueraded=True),
         forwarder("pod3")),
    # externalTrafficPolicy: Local. Its ClusterIP is the forwarder's; its external traffic is not queued,
    # so the kernel picks there (local-pick-M, nodeport-local-pick-M, and Pods through cluster-N and
    # nodeport-direct-N), pod1 and pod3 included although their weight is 0.
    Flow("decided-local-clusterip", "client", cip(20), 80, "TCP", reached("pod1", "pod2", "pod3", masqueraded=True),
         forwarder("pod2")),
    Flow("local-lb-is-the-kernels-pick-through-local-pick", "client", lb(20), 80, "TCP",
         reached("pod1", "pod2", masqueraded=False), KERNEL),
    Flow("local-nodeport-udp-is-the-kernels-pick-through-nodeport-local-pick", "client", NODE_IP, np(20, "UDP"), "UDP",
         reached("pod1", "pod2", masqueraded=False), KERNEL),
    Flow("local-lb-from-pod-short-circuits-through-cluster-chain", "pod4", lb(20), 80, "TCP",
         reached("pod1", "pod2", "pod3", masqueraded=False), KERNEL),
    Flow("local-nodeport-from-pod-short-circuits-through-nodeport-direct", "pod4", NODE_IP, np(20), "TCP",
         reached("pod1", "pod2", "pod3", masqueraded=False), KERNEL),
    # sessionAffinity: ClientIP: the first connection of each client is decided, later ones stick.
    Flow("sticky-drained-endpoint-gets-no-new-client", "client", cip(21), 80, "TCP", Sticky(frozenset(ALL)),
         forwarder("pod1", "pod3", "pod4")),
    Flow("sticky-decided-clusterip", "client", cip(22), 80, "TCP", Sticky(frozenset(ALL)), forwarder("pod4")),
    Flow("sticky-decided-lb-ip", "client", lb(22), 80, "TCP", Sticky(frozenset(ALL)), forwarder("pod4")),
    Flow("sticky-decided-nodeport-udp", "client", NODE_IP, np(22, "UDP"), "UDP", Sticky(frozenset(ALL)),
         forwarder("pod4")),
    Flow("sticky-decided-itp-local", "client", cip(23), 80, "TCP", Sticky(frozenset({"pod1", "pod2"})),
         forwarder("pod1")),
    Flow("affinity-with-etp-local-is-the-kernels-pick", "client", lb(16), 80, "UDP", Sticky(frozenset({"pod1", "pod2"})),
         KERNEL),
    # Balancing tables: the table names the endpoint of every flow, in every kind of pick chain; no upcall.
    Flow("maglev-clusterip-from-outside", "client", cip(24), 80, "TCP", hashed(*ALL, masqueraded=True), TABLE),
    Flow("maglev-clusterip-udp-from-pod", "pod2", cip(24), 80, "UDP", hashed(*ALL, masqueraded=False), TABLE),
    Flow("maglev-clusterip-from-the-node", "node", cip(24), 80, "TCP", hashed(*ALL, masqueraded=None), TABLE),
    Flow("maglev-lb-ip-external-chain", "client", lb(24), 80, "TCP", hashed(*ALL, masqueraded=True), TABLE),
    Flow("maglev-external-ip-udp", "client", "192.168.70.24", 80, "UDP", hashed(*ALL, masqueraded=True), TABLE),
    Flow("maglev-nodeport-chain", "client", NODE_IP, np(24), "TCP", hashed(*ALL, masqueraded=True), TABLE),
    Flow("maglev-nodeport-udp-from-pod", "pod1", NODE_IP, np(24, "UDP"), "UDP", hashed(*ALL, masqueraded=True), TABLE),
    Flow("weighted-clusterip-drains-weight-0", "client", cip(25), 80, "TCP",
         hashed(*ALL, masqueraded=True, weights=WEIGHTED), TABLE),
    Flow("weighted-nodeport-udp-drains-weight-0", "client", NODE_IP, np(25, "UDP"), "UDP",
         hashed(*ALL, masqueraded=True, weights=WEIGHTED), TABLE),
    Flow("maglev-etp-local-lb-uses-the-local-table", "client", lb(26), 80, "TCP",
         hashed("pod1", "pod2", masqueraded=False), TABLE),
    Flow("maglev-etp-local-nodeport-udp-uses-the-local-table", "client", NODE_IP, np(26, "UDP"), "UDP",
         hashed("pod1", "pod2", masqueraded=False), TABLE),
    Flow("maglev-etp-local-lb-from-pod-uses-every-endpoint", "pod4", lb(26), 80, "TCP",
         hashed("pod1", "pod2", "pod3", masqueraded=False), TABLE),
    Flow("maglev-etp-local-nodeport-from-pod-direct", "pod4", NODE_IP, np(26), "TCP",
         hashed("pod1", "pod2", "pod3", masqueraded=False), TABLE),
    Flow("maglev-etp-local-lb-from-the-node", "node", lb(26), 80, "TCP",
         hashed("pod1", "pod2", "pod3", masqueraded=None), TABLE),
    Flow("maglev-etp-local-clusterip-is-cluster-wide", "client", cip(26), 80, "TCP",
         hashed("pod1", "pod2", "pod3", masqueraded=True), TABLE),
    Flow("maglev-etp-local-without-local-endpoint-drops", "client", lb(29), 80, "TCP", DROP),
    Flow("maglev-etp-local-without-local-endpoint-pods-reach-remote", "pod1", lb(29), 80, "TCP",
         hashed("pod3", "pod4", masqueraded=False), TABLE),
    Flow("maglev-affinity-places-then-keeps-a-client", "client", cip(27), 80, "TCP",
         hashed(*ALL, masqueraded=True, sticky=True), TABLE),
    Flow("maglev-affinity-nodeport-udp", "client", NODE_IP, np(27, "UDP"), "UDP",
         hashed(*ALL, masqueraded=True, sticky=True), TABLE),
    Flow("maglev-itp-local-clusterip-uses-the-local-table", "client", cip(28), 80, "TCP",
         hashed("pod1", "pod2", masqueraded=True), TABLE),
    Flow("maglev-itp-local-nodeport-uses-every-endpoint", "client", NODE_IP, np(28), "TCP",
         hashed(*ALL, masqueraded=True), TABLE),
]

DAEMON_FLAGS = ["--service-cidr", SERVICE_CIDR, "--node-zone", NODE_ZONE]


# IPv6: the same behaviours over real IPv6 packets (see the address plan at the top).
CLIENT6, NODE_IP6 = "fd00:50::2", "fd00:50::1"
POD_IPS6 = {"pod1": "fd00:244:1::11", "pod2": "fd00:244:1::12", "pod3": "fd00:244:1::13", "pod4": "fd00:244:1::14"}
CLUSTER_CIDR6, SERVICE_CIDR6 = "fd00:244::/32", "fd00:96::/108"
SOURCES6 = {"client": CLIENT6, "node": NODE_IP6, **POD_IPS6}


def cip6(n: int) -> str:
    return f"fd00:96::5:{n}"


def lb6(n: int) -> str:
    return f"fd00:60::{n}"


def ext6(n: int) -> str:
    return f"fd00:70::{n}"


def _svc6(name: str, number: int, pods=ALL, *, kind: str = "ClusterIP", lb: bool = False, external: bool = False,
          dual: bool = False, conditions=None, weights: dict[str, int] | None = None, algorithm: str = "",
          **spec) -> list[dict]:
    """An IPv6 Service (with `dual`, a dual-stack one: IPv4 first, as a cluster would list it)."""
    node_ports = kind in ("NodePort", "LoadBalancer")
    families = [(4, cip(number), f"192.168.60.{number}", f"192.168.70.{number}")] if dual else []
    families.append((6, cip6(number), lb6(number), ext6(number)))
    documents = [service(
        name, families[0][1], _ports(number, node_ports), type=kind,
        ingress_ips=[ingress for _, _, ingress, _ in families] if lb else (),
        external_ips=[address for _, _, _, address in families] if external else (),
        clusterIPs=[cluster_ip for _, cluster_ip, _, _ in families],
        ipFamilies=[f"IPv{version}" for version, _, _, _ in families],
        ipFamilyPolicy="RequireDualStack" if dual else "SingleStack", **spec)]
    annotations = {**(_weights(weights, POD_IPS6) if weights else {}),
                   **({ALGORITHM_ANNOTATION: algorithm} if algorithm else {})}
    if annotations:
        documents[0]["metadata"]["annotations"] = annotations
    if pods is not None:
        if dual:
            documents.append(_endpoints(name, pods, conditions, slice_name=f"{name}-v4", address_type="IPv4"))
        documents.append(_endpoints(name, pods, conditions, ips=POD_IPS6, slice_name=f"{name}-v6", address_type="IPv6"))
    return documents


MANIFESTS6 = {
    "v6-all.yaml": _svc6("v6-all", 31),
    "v6-dual.yaml": _svc6("v6-dual", 32, dual=True),
    "v6-nodeport.yaml": _svc6("v6-nodeport", 33, kind="NodePort"),
    "v6-lb.yaml": _svc6("v6-lb", 34, kind="LoadBalancer", lb=True, external=True),
    "v6-etp-local.yaml": _svc6("v6-etp-local", 35, ("pod1", "pod3"), kind="LoadBalancer", lb=True,
                               externalTrafficPolicy="Local"),
    "v6-none.yaml": _svc6("v6-none", 36, (), kind="NodePort"),
    "v6-self.yaml": _svc6("v6-self", 37, ("pod1",)),
    "v6-sticky.yaml": _svc6("v6-sticky", 38, sessionAffinity="ClientIP"),
    "v6-sticky-self.yaml": _svc6("v6-sticky-self", 39, ("pod1",), sessionAffinity="ClientIP"),
    "v6-etp-none.yaml": _svc6("v6-etp-none", 40, ("pod3", "pod4"), kind="LoadBalancer", lb=True,
                              externalTrafficPolicy="Local"),
    "v6-itp-local.yaml": _svc6("v6-itp-local", 41, internalTrafficPolicy="Local"),
    "v6-ranges.yaml": _svc6("v6-ranges", 42, ("pod1", "pod2"), kind="LoadBalancer", lb=True,
                            loadBalancerSourceRanges=[f"{CLIENT6}/128"]),
    "v6-dual-nodeport.yaml": _svc6("v6-dual-nodeport", 43, kind="NodePort", dual=True),
    "v6-decided.yaml": _svc6("v6-decided", 44, kind="LoadBalancer", lb=True, external=True, weights=_only("pod3"),
                             algorithm=LEAST_CONN),
    "v6-sticky-drained.yaml": _svc6("v6-sticky-drained", 45, sessionAffinity="ClientIP", weights={"pod2": 0},
                                    algorithm=LEAST_CONN),
    "v6-decided-local.yaml": _svc6("v6-decided-local", 46, ("pod1", "pod2", "pod3"), kind="LoadBalancer", lb=True,
                                   externalTrafficPolicy="Local", weights=_only("pod2", ("pod1", "pod2", "pod3")),
                                   algorithm=LEAST_CONN),
    "v6-maglev.yaml": _svc6("v6-maglev", 47, kind="LoadBalancer", lb=True, external=True, algorithm="maglev"),
    "v6-weighted.yaml": _svc6("v6-weighted", 48, kind="NodePort", weights=WEIGHTED),
    "v6-maglev-local.yaml": _svc6("v6-maglev-local", 49, ("pod1", "pod2", "pod3"), kind="LoadBalancer", lb=True,
                                  externalTrafficPolicy="Local", algorithm="maglev"),
    "v6-maglev-sticky.yaml": _svc6("v6-maglev-sticky", 51, sessionAffinity="ClientIP", algorithm="maglev"),
}

FLOWS6 = [
    # ClusterIP over IPv6: masqueraded from outside the cluster CIDR only.
    Flow("v6-clusterip-tcp-from-outside-reaches-all-masqueraded", "client", cip6(31), 80, "TCP", reached(*ALL, masqueraded=True)),
    Flow("v6-clusterip-udp-from-outside-reaches-all-masqueraded", "client", cip6(31), 80, "UDP", reached(*ALL, masqueraded=True)),
    Flow("v6-clusterip-tcp-from-pod-reaches-all-unmasqueraded", "pod2", cip6(31), 80, "TCP", reached(*ALL, masqueraded=False)),
    Flow("v6-clusterip-udp-from-pod-reaches-all-unmasqueraded", "pod2", cip6(31), 80, "UDP", reached(*ALL, masqueraded=False)),
    Flow("v6-clusterip-from-the-node-itself", "node", cip6(31), 80, "TCP", reached(*ALL, masqueraded=None)),
    # A dual-stack Service answers on both its ClusterIPs, each family to its own endpoints.
    Flow("dual-stack-service-answers-on-its-ipv4-clusterip", "client", cip(32), 80, "TCP", reached(*ALL, masqueraded=True)),
    Flow("dual-stack-service-answers-on-its-ipv6-clusterip", "client", cip6(32), 80, "TCP", reached(*ALL, masqueraded=True)),
    Flow("dual-stack-ipv6-clusterip-udp-from-pod", "pod3", cip6(32), 80, "UDP", reached(*ALL, masqueraded=False)),
    Flow("dual-stack-nodeport-on-the-node-ipv4-address", "client", NODE_IP, np(43), "TCP", reached(*ALL, masqueraded=True)),
    Flow("dual-stack-nodeport-on-the-node-ipv6-address", "client", NODE_IP6, np(43), "TCP", reached(*ALL, masqueraded=True)),
    # NodePort on the node's IPv6 address; LoadBalancer and external IPs over IPv6.
    Flow("v6-nodeport-tcp-on-the-node-ipv6-address", "client", NODE_IP6, np(33), "TCP", reached(*ALL, masqueraded=True)),
    Flow("v6-nodeport-udp-on-the-node-ipv6-address", "client", NODE_IP6, np(33, "UDP"), "UDP", reached(*ALL, masqueraded=True)),
    Flow("v6-lb-ingress-ip-reaches-all-masqueraded", "client", lb6(34), 80, "TCP", reached(*ALL, masqueraded=True)),
    Flow("v6-external-ip-udp-reaches-all-masqueraded", "client", ext6(34), 80, "UDP", reached(*ALL, masqueraded=True)),
    # externalTrafficPolicy: Local over IPv6: the client's source is kept.
    Flow("v6-etp-local-lb-reaches-local-endpoint-keeping-source", "client", lb6(35), 80, "TCP", reached("pod1", masqueraded=False), KERNEL),
    Flow("v6-etp-local-nodeport-udp-keeps-source", "client", NODE_IP6, np(35, "UDP"), "UDP", reached("pod1", masqueraded=False), KERNEL),
    Flow("v6-etp-local-lb-from-pod-short-circuits-to-all", "pod2", lb6(35), 80, "TCP", reached("pod1", "pod3", masqueraded=False), KERNEL),
    Flow("v6-etp-local-without-local-endpoint-drops-lb", "client", lb6(40), 80, "TCP", DROP),
    Flow("v6-itp-local-clusterip-reaches-only-local-endpoints", "client", cip6(41), 80, "TCP", reached("pod1", "pod2", masqueraded=True)),
    # No endpoints: ICMPv6 port unreachable. A TCP client on this host (the lab's client, a Pod)
    # is refused only at its SYN retransmission, about 1 s later: the ICMPv6 error reaches the
    # socket while connect() still holds it, and TCP then keeps it as a soft error (seen on
    # Linux 6.18; the IPv4 ICMP is taken at once). The e2e check allows for that.
    Flow("v6-no-endpoints-clusterip-tcp-rejects", "client", cip6(36), 80, "TCP", REJECT),
    Flow("v6-no-endpoints-clusterip-udp-rejects", "client", cip6(36), 80, "UDP", REJECT),
    Flow("v6-no-endpoints-nodeport-rejects", "client", NODE_IP6, np(36), "TCP", REJECT),
    Flow("v6-no-endpoints-from-pod-rejects", "pod1", cip6(36), 80, "UDP", REJECT),
    Flow("v6-no-endpoints-from-node-rejects", "node", cip6(36), 80, "UDP", REJECT),
    # Addresses and ports nobody serves.
    Flow("v6-undefined-port-on-clusterip-rejects-tcp", "client", cip6(31), 81, "TCP", REJECT),
    Flow("v6-undefined-port-on-clusterip-rejects-udp-from-pod", "pod1", cip6(31), 81, "UDP", REJECT),
    Flow("v6-unallocated-service-address-drops", "client", cip6(200), 80, "TCP", DROP),
    # Hairpin and affinity over IPv6.
    Flow("v6-hairpin-pod-reaching-itself-through-its-service", "pod1", cip6(37), 80, "TCP", reached("pod1", masqueraded=True)),
    Flow("v6-hairpin-udp", "pod1", cip6(37), 80, "UDP", reached("pod1", masqueraded=True)),
    Flow("v6-affinity-keeps-a-client-on-one-endpoint", "client", cip6(38), 80, "TCP", Sticky(frozenset(ALL))),
    Flow("v6-affinity-keeps-a-pod-on-one-endpoint-udp", "pod2", cip6(38), 80, "UDP", Sticky(frozenset(ALL))),
    Flow("v6-affinity-hairpin-is-masqueraded", "pod1", cip6(39), 80, "TCP", reached("pod1", masqueraded=True)),
    # loadBalancerSourceRanges over IPv6.
    Flow("v6-source-range-admits-listed-client", "client", lb6(42), 80, "TCP", reached("pod1", "pod2", masqueraded=True)),
    Flow("v6-source-range-drops-pods-outside-it", "pod1", lb6(42), 80, "TCP", DROP),
    # Who decided, over IPv6 (see the IPv4 rows).
    Flow("v6-decided-clusterip-from-outside", "client", cip6(44), 80, "TCP", reached(*ALL, masqueraded=True), forwarder("pod3")),
    Flow("v6-decided-clusterip-udp-from-pod", "pod2", cip6(44), 80, "UDP", reached(*ALL, masqueraded=False), forwarder("pod3")),
    Flow("v6-decided-lb-ip-external-chain", "client", lb6(44), 80, "TCP", reached(*ALL, masqueraded=True), forwarder("pod3")),
    Flow("v6-decided-external-ip-udp-external-chain", "client", ext6(44), 80, "UDP", reached(*ALL, masqueraded=True),
         forwarder("pod3")),
    Flow("v6-decided-nodeport-chain", "client", NODE_IP6, np(44), "TCP", reached(*ALL, masqueraded=True), forwarder("pod3")),
    Flow("v6-sticky-drained-endpoint-gets-no-new-client", "client", cip6(45), 80, "TCP", Sticky(frozenset(ALL)),
         forwarder("pod1", "pod3", "pod4")),
    Flow("v6-decided-local-clusterip", "client", cip6(46), 80, "TCP", reached("pod1", "pod2", "pod3", masqueraded=True),
         forwarder("pod2")),
    Flow("v6-local-lb-is-the-kernels-pick-through-local-pick", "client", lb6(46), 80, "TCP",
         reached("pod1", "pod2", masqueraded=False), KERNEL),
    Flow("v6-local-nodeport-from-pod-short-circuits-through-nodeport-direct", "pod4", NODE_IP6, np(46), "TCP",
         reached("pod1", "pod2", "pod3", masqueraded=False), KERNEL),
    # Balancing tables over IPv6 (see the IPv4 rows).
    Flow("v6-maglev-clusterip-from-outside", "client", cip6(47), 80, "TCP", hashed(*ALL, masqueraded=True), TABLE),
    Flow("v6-maglev-clusterip-udp-from-pod", "pod2", cip6(47), 80, "UDP", hashed(*ALL, masqueraded=False), TABLE),
    Flow("v6-maglev-lb-ip-external-chain", "client", lb6(47), 80, "TCP", hashed(*ALL, masqueraded=True), TABLE),
    Flow("v6-maglev-nodeport-chain", "client", NODE_IP6, np(47), "TCP", hashed(*ALL, masqueraded=True), TABLE),
    Flow("v6-weighted-nodeport-drains-weight-0", "client", NODE_IP6, np(48), "TCP",
         hashed(*ALL, masqueraded=True, weights=WEIGHTED), TABLE),
    Flow("v6-maglev-etp-local-lb-uses-the-local-table", "client", lb6(49), 80, "TCP",
         hashed("pod1", "pod2", masqueraded=False), TABLE),
    Flow("v6-maglev-etp-local-lb-from-pod-uses-every-endpoint", "pod4", lb6(49), 80, "TCP",
         hashed("pod1", "pod2", "pod3", masqueraded=False), TABLE),
    Flow("v6-maglev-affinity-places-then-keeps-a-client", "client", cip6(51), 80, "TCP",
         hashed(*ALL, masqueraded=True, sticky=True), TABLE),
]

# For a dual-stack node (MANIFESTS and MANIFESTS6 together): DAEMON_FLAGS with both families' CIDRs.
DUAL_STACK_CLUSTER_CIDRS = f"{CLUSTER_CIDR},{CLUSTER_CIDR6}"
DUAL_STACK_DAEMON_FLAGS = ["--service-cidr", f"{SERVICE_CIDR},{SERVICE_CIDR6}", "--node-zone", NODE_ZONE]


# The client's further source addresses (dataplane/lab/topology.py AddressPlan.client_sources):
# enough that a kernel pick over four endpoints avoiding one of them for every client is
# (3/4)^32, about 1e-4.
CLIENT_ADDRESSES = 32

def source_ip(flow: Flow) -> str:
    """The address `flow.source` sends from: of the destination's family."""
    return (SOURCES6 if ":" in flow.destination else SOURCES)[flow.source]


# The lab the e2e table runs in (dual-stack, four Pods, the client's further addresses).
LAB_PLAN = AddressPlan(pods=4, dual_stack=True, client_aliases=CLIENT_ADDRESSES)


def sources(flow: Flow) -> tuple[str, ...]:
    """Every address a row of who decided sends from: all the client's, or the one of another source."""
    if flow.source == "client":
        return LAB_PLAN.client_sources6 if ":" in flow.destination else LAB_PLAN.client_sources
    return (source_ip(flow),)


def connections_per_source(flow: Flow) -> int:
    """How many new connections a row of who decided makes from each of its `sources`: a dozen from a
    lone source; from the client's many addresses one each, or three with affinity (to see them stick)."""
    if len(sources(flow)) == 1:
        return 12
    return 3 if isinstance(flow.expect, Sticky) else 1
