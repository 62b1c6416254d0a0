"""The packet-flow table (tests/flows.py) with real packets, in every proxy mode.

Each row sends real TCP or UDP from a namespace (the client outside the
cluster, a Pod, or the node itself) and checks which Pods answered, whether
they saw the real source or a node address, or that the connection was
refused at once or dropped.
"""

from __future__ import annotations

import subprocess

import pytest

from dataplane.lab import AddressPlan, Daemon, Failure, Lab, ManifestDir, environment_problem, request, sample
from dataplane.lab.daemon import dataplane_executable

from tests.flows import CLIENT, DAEMON_FLAGS, DROP, FLOWS, MANIFESTS, REJECT, SOURCES, Flow, Reached, Sticky

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
    with Lab.build(AddressPlan(pods=4)) as lab:
        lab.start_echo(tcp=[80], udp=[80])
        # Real nodes have a default route; without one the node's own packets to
        # LoadBalancer IPs fail routing before netfilter sees them.
        lab.node.ip("route", "add", "default", "via", CLIENT)
        yield lab


@pytest.fixture(scope="module", params=proxy_modes())
def daemon(request, lab, tmp_path_factory):
    manifests = ManifestDir(tmp_path_factory.mktemp("flows"))
    for name, documents in MANIFESTS.items():
        manifests.write(name, documents)
    mode = request.param
    with Daemon.for_source(lab.node, manifests.path, tmp_path_factory.mktemp("log") / "dataplane.log",
                           extra=[*DAEMON_FLAGS, "--proxy-mode", mode]) as daemon:
        yield daemon


def namespace(lab: Lab, source: str):
    return {"client": lab.client, "node": lab.node}.get(source) or lab.pod(source).ns


@pytest.mark.parametrize("flow", FLOWS, ids=[f.id for f in FLOWS])
def test_packet_flow(lab: Lab, daemon: Daemon, flow: Flow) -> None:
    ns = namespace(lab, flow.source)

    def send(timeout: float = 1.0):
        return request(flow.protocol, ns, flow.destination, flow.port, timeout)

    expect = flow.expect
    if expect == REJECT and flow.source == "node":
        # The node's own packet is rejected in the output hook: the sender gets EPERM at once.
        with pytest.raises(PermissionError):
            send()
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
        source_ip = SOURCES[flow.source]
        for outcome in outcomes:
            masqueraded = outcome.reply.peer[0] != source_ip
            hairpin = outcome.pod == flow.source
            if hairpin:
                assert masqueraded, f"a Pod reaching itself must be masqueraded: {outcome}"
            elif expect.masqueraded is not None:
                assert masqueraded == expect.masqueraded, f"masqueraded should be {expect.masqueraded}: {outcome}"
