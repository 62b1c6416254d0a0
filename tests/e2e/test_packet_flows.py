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
    Daemon, Failure, Lab, ManifestDir, TcpSession, UdpSession, environment_problem, http_get, request, sample,
    tally, tcp_request, wait_until,
)
from dataplane.lab.daemon import cleanup, dataplane_executable
from dataplane.lab.manifests import endpoint_slice, port, service

from tests.flows import (
    CLIENT, CLIENT6, DROP, DUAL_STACK_CLUSTER_CIDRS, DUAL_STACK_DAEMON_FLAGS, FLOWS,
    FLOWS6, LAB_PLAN, MANIFESTS, MANIFESTS6, POD_IPS, POD_IPS6, REJECT, Flow, Forwarder, Hashed,
    Reached, Sticky, cip, cip6, connections_per_source, source_ip, sources, table_pick,
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
    with Lab.build(LAB_PLAN) as lab:
        assert lab.plan.cluster_cidrs == DUAL_STACK_CLUSTER_CIDRS
        assert (lab.plan.client_sources[0], lab.plan.client_sources6[0]) == (CLIENT, CLIENT6)
        assert {p.name: p.ip6 for p in lab.pods} == POD_IPS6
        lab.start_echo(tcp=[80], udp=[80])
        # Real nodes have a default route; without one the node's own packets to
        # LoadBalancer IPs fail routing before netfilter sees them.
        lab.node.ip("route", "add", "default", "via", CLIENT)
        lab.node.ip("-6", "route", "add", "default", "via", CLIENT6)
        # The client's further addresses are usable sources, seen as such (no Service on the way).
        aliases = ((lab.plan.client_sources[-1], POD_IPS["pod1"]), (lab.plan.client_sources6[-1], POD_IPS6["pod1"]))
        for alias, pod_ip in aliases:
            outcome = tcp_request(lab.client, pod_ip, 80, source=alias)
            assert outcome.ok and outcome.reply.peer[0] == alias, str(outcome)
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
    # The next mode starts from a node without rules or flows: clients the kernel's affinity
    # sets learned, or a UDP flow whose 5-tuple a new request happens to reuse, in one mode
    # must not decide for the next.
    cleanup(lab.node)
    lab.node.run("conntrack", "-F", check=False)


def proxy_mode(daemon: Daemon) -> str:
    return daemon.argv[daemon.argv.index("--proxy-mode") + 1]


@pytest.fixture
def manifests(daemon: Daemon) -> ManifestDir:
    """The directory the running daemon reads (its --source)."""
    return ManifestDir(daemon.argv[daemon.argv.index("--source") + 1])


def namespace(lab: Lab, source: str):
    return {"client": lab.client, "node": lab.node}.get(source) or lab.pod(source).ns


@pytest.mark.parametrize("flow", FLOWS, ids=[f.id for f in FLOWS])
def test_packet_flow(lab: Lab, daemon: Daemon, flow: Flow) -> None:
    check(lab, daemon, flow)


@pytest.mark.parametrize("flow", FLOWS6, ids=[f.id for f in FLOWS6])
def test_packet_flow_ipv6(lab: Lab, daemon: Daemon, flow: Flow) -> None:
    check(lab, daemon, flow)


def check(lab: Lab, daemon: Daemon, flow: Flow) -> None:
    if isinstance(flow.expect, Hashed):
        check_hashed(lab, flow, flow.expect, userspace=proxy_mode(daemon) == "userspace")
    elif proxy_mode(daemon) == "userspace" and isinstance(flow.userspace, Forwarder):
        check_decided(lab, flow)
    else:
        check_outcome(lab, flow)


def queued_packets(lab: Lab) -> int:
    """Packets ever queued to userspace on the node, every queue (nfnetlink_queue's id_sequence)."""
    text = lab.node.run("cat", "/proc/net/netfilter/nfnetlink_queue", check=False).stdout
    # queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
    return sum(int(line.split()[7]) for line in text.splitlines() if line.strip())


def table_request(flow: Flow, ns, source: str | None):
    """One new connection (or UDP flow) from a fresh port; (the local address and port, the outcome)."""
    bound = (source, 0) if source else None
    if flow.protocol == "TCP":
        with TcpSession(ns, flow.destination, flow.port, 1.0, bound) as session:
            failed = session.connect()
            return session.local, failed or session.request()
    with UdpSession(ns, flow.destination, flow.port, 1.0, bound) as session:
        return session.local, session.request()


def check_hashed(lab: Lab, flow: Flow, expect: Hashed, userspace: bool) -> None:
    """A table row with real packets: every new flow, from every client address (or the row's one
    source, a dozen times), reaches the Pod the table names for its source address and port
    (flows.table_pick: the kernel's jhash, restated), with the row's masquerade; with affinity,
    a client's later connections stay on its first Pod. In userspace mode nothing is queued."""
    ns = namespace(lab, flow.source)
    before = queued_packets(lab) if userspace else 0
    wrong, first_pod = [], {}
    count = 2 if flow.source == "client" else 12
    for address in sources(flow):
        for _ in range(3 if expect.sticky else count):
            (local_ip, local_port), outcome = table_request(flow, ns, address if flow.source == "client" else None)
            if not outcome.ok:
                wrong.append(f"{local_ip}:{local_port}: {outcome}")
                continue
            want = first_pod.setdefault(local_ip, table_pick(expect, local_ip, local_port)) if expect.sticky \
                else table_pick(expect, local_ip, local_port)
            if outcome.pod != want:
                wrong.append(f"{local_ip}:{local_port}: the table names {want}, {outcome.pod} answered")
            masqueraded = outcome.reply.peer[0] != local_ip
            if outcome.pod == flow.source:
                assert masqueraded, f"a Pod reaching itself must be masqueraded: {outcome}"
            elif expect.masqueraded is not None and masqueraded != expect.masqueraded:
                wrong.append(f"{local_ip}:{local_port}: masqueraded should be {expect.masqueraded}: {outcome}")
    assert wrong == []
    if userspace:
        assert queued_packets(lab) == before, "a table-balanced Service's flow was queued to userspace"


def check_decided(lab: Lab, flow: Flow) -> None:
    """Userspace mode, a row the forwarder decides: only its Pods answer, from every client address
    (several connections each with affinity, which must each stay on one Pod), or from the row's one
    source over a dozen connections; the kernel's own pick would have spread them."""
    assert isinstance(flow.userspace, Forwarder)
    ns = namespace(lab, flow.source)
    queued_before = queued_packets(lab)
    addresses = sources(flow)
    by_source: dict[str, list] = {}
    for address in addresses:
        bound = address if flow.source == "client" else None  # another source has one address: the kernel's
        by_source[address] = [request(flow.protocol, ns, flow.destination, flow.port, 1.0, source=bound)
                              for _ in range(connections_per_source(flow))]
    outcomes = [o for found in by_source.values() for o in found]
    failed = [str(o) for o in outcomes if not o.ok]
    assert not failed, failed
    # What check_hashed's "nothing queued" relies on: the count moves when the forwarder decides.
    assert queued_packets(lab) >= queued_before + len(outcomes), "the forwarder's flows were not counted as queued"
    answered = {o.pod for o in outcomes}
    if not answered <= flow.userspace.pods:
        elsewhere = {a: [o.pod for o in found] for a, found in by_source.items()
                     if {o.pod for o in found} - flow.userspace.pods}
        raise AssertionError(
            f"the weights leave the forwarder {sorted(flow.userspace.pods)}, yet "
            f"{sorted(answered - flow.userspace.pods)} answered: the kernel picked, not the forwarder. "
            f"By source: {elsewhere}; fail-open counters: {fail_open_counters(lab)}")
    if isinstance(flow.expect, Sticky):
        moved = {a: sorted({o.pod for o in found}) for a, found in by_source.items() if len({o.pod for o in found}) > 1}
        assert not moved, f"affinity broken: {moved}"
    masqueraded = flow.expect.masqueraded if isinstance(flow.expect, Reached) else None
    for address, found in by_source.items():
        for outcome in found:
            seen_as_masqueraded = outcome.reply.peer[0] != address
            if outcome.pod == flow.source:
                assert seen_as_masqueraded, f"a Pod reaching itself must be masqueraded: {outcome}"
            elif masqueraded is not None:
                assert seen_as_masqueraded == masqueraded, f"masqueraded should be {masqueraded}: {outcome}"


def fail_open_counters(lab: Lab) -> list[str]:
    """The `fail-open` counters (new flows that reached a pick without a decision), for a failure message."""
    return [lab.node.run("nft", "list", "counter", family, "dataplane", "fail-open", check=False).stdout.strip()
            for family in ("ip", "ip6")]


def check_outcome(lab: Lab, flow: Flow) -> None:
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


def test_status_says_which_path_each_service_port_takes(lab: Lab, daemon: Daemon) -> None:
    """/status: a Maglev or weighted Service port takes its kernel table in both modes; a plain one the
    forwarder in userspace mode (its Local-policy external traffic the kernel's pick), else the kernel's pick."""
    import json

    code, body = http_get(lab.node, "127.0.0.1", 10249, "/status", timeout=10)
    assert code == 200
    paths = {(p["service"], p["family"]): p for p in json.loads(body)["paths"]}
    userspace = proxy_mode(daemon) == "userspace"
    assert paths[("default/maglev:tcp", "ip")]["paths"] == ["kernel-table"]
    assert paths[("default/maglev:tcp", "ip")]["table_slots"] == 4093
    assert paths[("default/v6-weighted:udp", "ip6")]["paths"] == ["kernel-table"]
    assert paths[("default/maglev-sticky:tcp", "ip")]["paths"] == ["kernel-table"]
    assert paths[("default/all:tcp", "ip")]["paths"] == (["forwarder"] if userspace else ["kernel-random"])
    assert sorted(paths[("default/etp-local:tcp", "ip")]["paths"]) == (
        ["forwarder", "kernel-random"] if userspace else ["kernel-random"])


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
