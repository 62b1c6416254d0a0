"""A node, a client and N Pods, each in its own network namespace.

    client 192.168.50.2/24 ── eth0 │ veth │ client 192.168.50.1/24 ──┐
                                                                     node (router, ip_forward=1,
    pod1   10.244.1.11/32  ── eth0 │ veth │ pod1   10.244.1.1/32  ───┤  runs the data plane)
    pod2   10.244.1.12/32  ── eth0 │ veth │ pod2   10.244.1.1/32  ───┤
    ...                                                              ┘

Every Pod has its own routed veth, as with Calico: the Pod holds a /32 and a
default route via 10.244.1.1, which the node puts on every Pod-facing veth,
with a /32 route per Pod. The client's default route points at the node, so
ClusterIPs (10.96.0.0/12, assigned nowhere), LoadBalancer and external IPs all
reach it.

`AddressPlan(dual_stack=True)` adds IPv6 beside, in the same shape: client
fd00:50::2/64, node fd00:50::1/64; Pod i holds fd00:244:1::<10+i>/128 (pod1
is fd00:244:1::11, beside 10.244.1.11) with a default route via fd00:244:1::1,
which the node puts on every Pod veth with a /128 route per Pod. IPv6
forwarding is on in the node only. Duplicate address detection is off in
every namespace (accept_dad=0, and `nodad` addresses), so addresses are
usable at once rather than after a second or two of DAD.

Invariants: nothing in the root namespace changes (no links, routes or
sysctls: veths are created inside the node namespace and their peers moved
straight to their own namespace); every namespace a lab makes carries its
unique prefix and is deleted on exit, whatever happened, with every process
started inside it; a lab deletes leftovers of its prefix, and of labs whose
owner process is gone, before it builds.
"""

from __future__ import annotations

import itertools
import os
import selectors
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

from .netns import Netns, delete_netns, leftovers, list_netns

_serials = itertools.count(1)


@dataclass(frozen=True, slots=True)
class AddressPlan:
    """Where everything sits. Pod i (1-based) gets `pod_network[pod_host_offset + i]`.

    With `dual_stack`, every namespace gets the IPv6 addresses (`*6` fields) too;
    without it, none of them is used and the lab is IPv4 only.
    """

    pods: int = 3
    client: IPv4Interface = IPv4Interface("192.168.50.2/24")
    node_client_side: IPv4Interface = IPv4Interface("192.168.50.1/24")
    pod_network: IPv4Network = IPv4Network("10.244.1.0/24")
    pod_gateway: IPv4Address = IPv4Address("10.244.1.1")
    pod_host_offset: int = 10
    cluster_cidr: IPv4Network = IPv4Network("10.244.0.0/16")
    service_cidr: IPv4Network = IPv4Network("10.96.0.0/12")
    dual_stack: bool = False
    client6: IPv6Interface = IPv6Interface("fd00:50::2/64")
    node_client_side6: IPv6Interface = IPv6Interface("fd00:50::1/64")
    pod_network6: IPv6Network = IPv6Network("fd00:244:1::/64")
    pod_gateway6: IPv6Address = IPv6Address("fd00:244:1::1")
    cluster_cidr6: IPv6Network = IPv6Network("fd00:244::/32")
    service_cidr6: IPv6Network = IPv6Network("fd00:96::/108")
    # Further client addresses, for tests that need many clients (affinity, who decided):
    # the client's network from host 100 on (192.168.50.100, fd00:50::100, ...).
    client_aliases: int = 0

    def __post_init__(self):
        if not 1 <= self.pods <= self.pod_network.num_addresses - self.pod_host_offset - 2:
            raise ValueError(f"pods: {self.pods} does not fit in {self.pod_network}")
        if not 0 <= self.client_aliases <= self.client.network.num_addresses - 101 - 1:
            raise ValueError(f"client_aliases: {self.client_aliases} do not fit in {self.client.network}")
        # A Pod outside the cluster CIDR would be taken for an outside client (masqueraded).
        for pods, cluster in ((self.pod_network, self.cluster_cidr), (self.pod_network6, self.cluster_cidr6)):
            if not pods.subnet_of(cluster):
                raise ValueError(f"pod network {pods} is not inside the cluster CIDR {cluster}")

    def pod_ip(self, index: int) -> IPv4Address:
        """The IP of pod `index` (1-based)."""
        return self.pod_network[self.pod_host_offset + index]

    def pod_ip6(self, index: int) -> IPv6Address:
        """The IPv6 address of pod `index` (1-based): its IPv4 host number's digits, so pod1 is ...::11."""
        return self.pod_network6[int(str(self.pod_host_offset + index), 16)]

    @property
    def client_sources(self) -> tuple[str, ...]:
        """Every address the client sends from: its own, then the aliases (192.168.50.100, .101, ...)."""
        network = self.client.network
        return (str(self.client.ip), *(str(network[100 + i]) for i in range(self.client_aliases)))

    @property
    def client_sources6(self) -> tuple[str, ...]:
        """The same for IPv6: fd00:50::2, then fd00:50::100, ::101, ... (hex, like the Pods' digits)."""
        network = self.client6.network
        return (str(self.client6.ip), *(str(network[int(str(100 + i), 16)]) for i in range(self.client_aliases)))

    @property
    def cluster_cidrs(self) -> str:
        """The daemon's --cluster-cidr for this plan: IPv4, and IPv6 when dual-stack."""
        return f"{self.cluster_cidr},{self.cluster_cidr6}" if self.dual_stack else str(self.cluster_cidr)

    @property
    def service_cidrs(self) -> str:
        """The daemon's --service-cidr for this plan: IPv4, and IPv6 when dual-stack."""
        return f"{self.service_cidr},{self.service_cidr6}" if self.dual_stack else str(self.service_cidr)

    @property
    def node_ip(self) -> IPv4Address:
        """The node's address as the client sees it (for NodePorts)."""
        return self.node_client_side.ip

    @property
    def node_ip6(self) -> IPv6Address:
        """The node's IPv6 address as the client sees it (dual-stack plans)."""
        return self.node_client_side6.ip


@dataclass(slots=True)
class Pod:
    """A Pod namespace: its name (as echo servers report it), IPs and namespace."""

    name: str
    ip: str
    ns: Netns
    veth: str  # the node-side interface
    ip6: str | None = None  # with a dual-stack plan

    def start_echo(self, tcp=(), udp=(), http=(), timeout: float = 10.0) -> subprocess.Popen:
        """Starts `dataplane.lab.echo` in this Pod; returns once it listens. Raises RuntimeError if it dies first."""
        return _await_ready(self._spawn_echo(tcp, udp, http), f"echo server in {self.name}", timeout)

    def _spawn_echo(self, tcp, udp, http) -> subprocess.Popen:
        argv = ["-u", "-m", "dataplane.lab.echo", "--name", self.name]
        for flag, ports in (("--tcp", tcp), ("--udp", udp), ("--http", http)):
            argv += [x for port in ports for x in (flag, str(port))]
        return self.ns.python(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _await_ready(child: subprocess.Popen, what: str, timeout: float) -> subprocess.Popen:
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        if selector.select(timeout):
            line = child.stdout.readline()
            if line.strip() == "ready":
                return child
    child.kill()
    _, stderr = child.communicate()
    raise RuntimeError(f"{what} did not start (exit {child.returncode}): {stderr.strip()}")


@dataclass(slots=True)
class Lab:
    """A built topology. Use `with Lab.build(...) as lab:`; see the module docstring for the shape."""

    prefix: str
    plan: AddressPlan
    node: Netns
    client: Netns
    pods: list[Pod] = field(default_factory=list)

    @classmethod
    def build(cls, plan: AddressPlan | None = None, prefix: str | None = None) -> "Lab":
        """Builds the namespaces, links and routes; on any failure deletes what was made and re-raises."""
        plan = plan or AddressPlan()
        prefix = prefix or f"dplab-{os.getpid()}-{next(_serials)}-"
        for name in leftovers(list_netns(), prefix):
            delete_netns(name)
        made: list[Netns] = []
        try:
            node = _new(made, prefix + "node")
            client = _new(made, prefix + "client")
            pods = [
                Pod(f"pod{i}", str(plan.pod_ip(i)), _new(made, f"{prefix}pod{i}"), f"pod{i}",
                    str(plan.pod_ip6(i)) if plan.dual_stack else None)
                for i in range(1, plan.pods + 1)
            ]
            lab = cls(prefix, plan, node, client, pods)
            lab._wire()
            return lab
        except BaseException:
            for ns in reversed(made):
                ns.delete()
            raise

    def _wire(self) -> None:
        plan = self.plan
        # rp_filter: before any link exists, so that every interface inherits it; loose,
        # as on most Kubernetes nodes. icmp_ratelimit: the kernel allows a burst of 6
        # ICMP errors per peer, then 1/s; tests that expect several quick refusals
        # (rejects are ICMP port unreachable) in a row would otherwise see timeouts.
        self.node.sysctl(net__ipv4__ip_forward=1, net__ipv4__conf__all__rp_filter=2,
                         net__ipv4__conf__default__rp_filter=2, net__ipv4__icmp_ratelimit=0)
        if plan.dual_stack:
            # Before any link exists too: a veth peer moved into a namespace takes that
            # namespace's defaults. ICMPv6 errors have their own per-peer rate limit.
            self.node.sysctl(net__ipv6__conf__all__forwarding=1, net__ipv6__icmp__ratelimit=0)
            for ns in self.namespaces:
                ns.sysctl(net__ipv6__conf__all__accept_dad=0, net__ipv6__conf__default__accept_dad=0)
        node_lines = [
            f"link add client type veth peer name eth0 netns {self.client.name}",
            f"address add {plan.node_client_side} dev client",
            "link set client up",
        ]
        client_lines = [
            f"address add {plan.client} dev eth0",
            "link set eth0 up",
            f"route add default via {plan.node_client_side.ip}",
        ]
        if plan.dual_stack:
            node_lines.insert(2, f"address add {plan.node_client_side6} dev client nodad")
            client_lines += [
                f"address add {plan.client6} dev eth0 nodad",
                f"route add default via {plan.node_client_side6.ip}",
            ]
        prefix, prefix6 = plan.client.network.prefixlen, plan.client6.network.prefixlen
        client_lines += [f"address add {ip}/{prefix} dev eth0" for ip in plan.client_sources[1:]]
        if plan.dual_stack:
            # Deprecated at once (preferred_lft 0): taken only when a socket binds to them, so the
            # client's own address stays the source of everything else, as in IPv4 (secondaries).
            client_lines += [f"address add {ip}/{prefix6} dev eth0 nodad preferred_lft 0"
                             for ip in plan.client_sources6[1:]]
        for pod in self.pods:
            node_lines += [
                f"link add {pod.veth} type veth peer name eth0 netns {pod.ns.name}",
                f"address add {plan.pod_gateway}/32 dev {pod.veth}",
                f"link set {pod.veth} up",
                f"route add {pod.ip}/32 dev {pod.veth} scope link",
            ]
            if pod.ip6:
                node_lines += [
                    f"address add {plan.pod_gateway6}/128 dev {pod.veth} nodad",
                    f"route add {pod.ip6}/128 dev {pod.veth}",
                ]
        self.node.ip_batch(node_lines)
        self.client.ip_batch(client_lines)
        for pod in self.pods:
            pod_lines = [
                f"address add {pod.ip}/32 dev eth0",
                "link set eth0 up",
                f"route add {plan.pod_gateway}/32 dev eth0 scope link",
                f"route add default via {plan.pod_gateway} dev eth0",
            ]
            if pod.ip6:
                pod_lines += [
                    f"address add {pod.ip6}/128 dev eth0 nodad",
                    f"route add {plan.pod_gateway6}/128 dev eth0",
                    f"route add default via {plan.pod_gateway6} dev eth0",
                ]
            pod.ns.ip_batch(pod_lines)

    @property
    def namespaces(self) -> list[Netns]:
        return [self.node, self.client, *(pod.ns for pod in self.pods)]

    def pod(self, name: str) -> Pod:
        """The Pod called `name`; KeyError if there is none."""
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(name)

    def start_echo(self, tcp=(), udp=(), http=()) -> None:
        """Starts the same echo servers in every Pod (in parallel) and waits until all listen."""
        children = [(pod, pod._spawn_echo(tcp, udp, http)) for pod in self.pods]
        for pod, child in children:
            _await_ready(child, f"echo server in {pod.name}", 10.0)

    def close(self) -> None:
        """Stops every process started in the lab and deletes its namespaces. Idempotent, never raises."""
        for ns in self.namespaces:
            ns.stop_children()
        for ns in self.namespaces:
            delete_netns(ns.name)
        for name in list_netns():
            if name.startswith(self.prefix):  # made by someone else under our prefix, e.g. a test
                delete_netns(name)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _new(made: list[Netns], name: str) -> Netns:
    ns = Netns.create(name)
    made.append(ns)
    return ns
