"""The packet-flow table (tests/flows.py) with real packets, in every proxy mode.

Each row sends real TCP or UDP from a namespace (the client outside the
cluster, a Pod, or the node itself) and checks which Pods answered, whether
they saw the real source or a node address, or that the connection was
refused at once or dropped. The lab is dual-stack and the daemon serves
MANIFESTS and MANIFESTS6 together: FLOWS run over IPv4, FLOWS6 over IPv6
(and both families of dual-stack Services).
"""

from __future__ import annotations

import subprocess

import pytest

from dataplane.lab import (
    AddressPlan, Daemon, Failure, Lab, ManifestDir, UdpSession, environment_problem, request, sample, tally,
    wait_until,
)
from dataplane.lab.daemon import dataplane_executable
from dataplane.lab.manifests import endpoint_slice, port, service

from tests.flows import (
    CLIENT, CLIENT6, DROP, DUAL_STACK_CLUSTER_CIDRS, DUAL_STACK_DAEMON_FLAGS, FLOWS, FLOWS6, MANIFESTS, MANIFESTS6,
    POD_IPS, POD_IPS6, REJECT, Flow, Reached, Sticky, cip, cip6, source_ip,
)

PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]


def proxy_modes() -> list[str]:
    """kernel, and userspace where this build offers it."""
    if PROBLEM is not None:
        return ["kernel"]
    usage = subprocess.run([dataplane_executable(), "run", "--help"], capture_output=True, text=True).stdout
    return ["kernel", "userspace"] if "userspace" in usage else ["kernel"]


@pytest.fixture(scope="module")
def lab():
    with Lab.build(AddressPlan(pods=4, dual_stack=True)) as lab:
        assert lab.plan.cluster_cidrs == DUAL_STACK_CLUSTER_CIDRS
        assert {p.name: p.ip6 for p in lab.pods} == POD_IPS6
        lab.start_echo(tcp=[80], udp=[80])
        # Real nodes have a default route; without one the node's own packets to
        # LoadBalancer IPs fail routing before netfilter sees them.
        lab.node.ip("route", "add", "default", "via", CLIENT)
        lab.node.ip("-6", "route", "add", "default", "via", CLIENT6)
        yield lab


@pytest.fixture(scope="module", params=proxy_modes())
def daemon(request, lab, tmp_path_factory):
    manifests = ManifestDir(tmp_path_factory.mktemp("flows"))
    assert not MANIFESTS.keys() & MANIFESTS6.keys()
    for name, documents in {**MANIFESTS, **MANIFESTS6}.items():
        manifests.write(name, documents)
    mode = request.param
    with Daemon.for_source(lab.node, manifests.path, tmp_path_factory.mktemp("log") / "dataplane.log",
                           extra=[*DUAL_STACK_DAEMON_FLAGS, "--proxy-mode", mode],
                           cluster_cidr=DUAL_STACK_CLUSTER_CIDRS) as daemon:
        yield daemon


@pytest.fixture
def manifests(daemon: Daemon) -> ManifestDir:
    """The directory the running daemon reads (its --source)."""
    return ManifestDir(daemon.argv[daemon.argv.index("--source") + 1])


def namespace(lab: Lab, source: str):
    return {"client": lab.client, "node": lab.node}.get(source) or lab.pod(source).ns


@pytest.mark.parametrize("flow", FLOWS, ids=[f.id for f in FLOWS])
def test_packet_flow(lab: Lab, daemon: Daemon, flow: Flow) -> None:
    check(lab, flow)


@pytest.mark.parametrize("flow", FLOWS6, ids=[f.id for f in FLOWS6])
def test_packet_flow_ipv6(lab: Lab, daemon: Daemon, flow: Flow) -> None:
    check(lab, flow)


def check(lab: Lab, flow: Flow) -> None:
    ns = namespace(lab, flow.source)

    def send(timeout: float = 1.0):
        return request(flow.protocol, ns, flow.destination, flow.port, timeout)

    expect = flow.expect
    if expect == REJECT and flow.source == "node":
        # The node's own packet is rejected in the output hook: the sender gets EPERM at once.
        with pytest.raises(PermissionError):
            send()
    elif expect == REJECT and flow.protocol == "TCP" and ":" in flow.destination:
        # ICMPv6 port unreachable refuses a local TCP connect only at its SYN retransmission
        # (about 1 s, see FLOWS6); a drop would still time out.
        outcome = send(timeout=2.5)
        assert outcome.failure == Failure.REFUSED and outcome.elapsed < 1.5, str(outcome)
    elif expect == REJECT:
        outcome = send()
        assert outcome.failure == Failure.REFUSED and outcome.elapsed < 0.5, str(outcome)
    elif expect == DROP:
        for _ in range(2):
            outcome = send(timeout=0.5)
            assert outcome.failure == Failure.TIMEOUT, f"expected a silent drop, got {outcome}"
    elif isinstance(expect, Sticky):
        outcomes = [send() for _ in range(8)]
        assert all(o.ok for o in outcomes), [str(o) for o in outcomes]
        pods = {o.pod for o in outcomes}
        assert len(pods) == 1 and pods <= expect.pods, f"affinity broken: {sorted(pods)}"
    else:
        assert isinstance(expect, Reached)
        outcomes = sample(send, want=expect.pods, tries=80, give_up_after=3)
        failed = [str(o) for o in outcomes if not o.ok]
        assert not failed, failed
        assert {o.pod for o in outcomes} == expect.pods
        source = source_ip(flow)
        for outcome in outcomes:
            masqueraded = outcome.reply.peer[0] != source
            hairpin = outcome.pod == flow.source
            if hairpin:
                assert masqueraded, f"a Pod reaching itself must be masqueraded: {outcome}"
            elif expect.masqueraded is not None:
                assert masqueraded == expect.masqueraded, f"masqueraded should be {expect.masqueraded}: {outcome}"


# Conntrack cleanup per family: a UDP flow pinned to an endpoint that leaves its Service
# must move to one that stays (its conntrack entry deleted), not keep going to the old one.
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_udp_flow_moves_off_a_removed_endpoint(lab: Lab, daemon: Daemon, manifests: ManifestDir, family: int):
    name, address, ips = f"udp-move-v{family}", (cip(50), cip6(50))[family == 6], (POD_IPS, POD_IPS6)[family == 6]

    def publish(pods) -> None:
        manifests.write(f"{name}.yaml", [
            service(name, address, [port("udp", 80, 80, "UDP")], clusterIPs=[address], ipFamilies=[f"IPv{family}"]),
            endpoint_slice(name, [ips[p] for p in pods], [("udp", 80, "UDP")], name=f"{name}-1"),
        ])

    def everyone_answers() -> bool:
        outcomes = sample(lambda: request("UDP", lab.client, address, 80, 0.3), {"pod1", "pod2"}, 30, give_up_after=3)
        return set(tally(outcomes)) == {"pod1", "pod2"}

    publish(("pod1", "pod2"))
    wait_until(everyone_answers, timeout=10, what=f"pod1 and pod2 serve {address}")
    with UdpSession(lab.client, address, 80, timeout=0.3) as session:
        stuck = session.request().pod
        assert stuck in ("pod1", "pod2")
        publish({"pod1", "pod2"} - {stuck})
        try:
            wait_until(lambda: session.request().pod not in (stuck, None), timeout=3, interval=0.1,
                       what=f"the UDP flow from {session.local} moves off {stuck}")
        finally:
            manifests.remove(f"{name}.yaml")
