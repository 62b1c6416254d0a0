"""One bad manifest never takes the node down (issue 13), with real packets through `dataplane run`:
- a Service without endpoints on another's ClusterIP:port does not make it refuse connections;
- a manifest cannot capture the node's own 127.0.0.1:80 (loopback and the like are refused, logged);
- FIFOs, endless devices, deep nesting and YAML bombs are refused alone: /healthz stays 200 and
  new Services are still programmed; the daemon's peak RSS is measured under the worst of them.

One lab and one daemon (kernel mode) for the module; each test owns its names and addresses.

Address plan
    client          192.168.50.2/24, default route via the node
    node            192.168.50.1 / 10.244.1.1; runs `dataplane run`, and an echo server "node" on TCP 80
    pods            pod1 10.244.1.11, pod2 10.244.1.12, pod3 10.244.1.13; echo on TCP 80
    ClusterIPs      10.96.3.10-11 good (with endpoints) vs bad (none) on the same address:port
                    10.96.3.20 beside the loopback captures; 10.96.3.30-31 after the bad files
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dataplane.lab import Daemon, Lab, ManifestDir, Pod, environment_problem, sample, tally, tcp_request, wait_until
from dataplane.lab.manifests import endpoint_slice, port, service

PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]

POD_IPS = {"pod1": "10.244.1.11", "pod2": "10.244.1.12", "pod3": "10.244.1.13"}
ALL = set(POD_IPS)
CONVERGENCE = 2.0
FIGURES = Path(os.environ.get("BAD_INPUT_REPORT", "/dev/null"))


def web(name: str, cluster_ip: str, pods=ALL, created: str | None = None, **fields) -> list[dict]:
    svc = service(name, cluster_ip, [port("http", 80)], **fields)
    if created:
        svc["metadata"]["creationTimestamp"] = created
    documents = [svc]
    if pods:
        documents.append(endpoint_slice(name, [POD_IPS[p] for p in sorted(pods)], [("http", 80, "TCP")]))
    return documents


@pytest.fixture(scope="module")
def lab():
    with Lab.build() as lab:
        lab.start_echo(tcp=[80])
        # The node's own service on 127.0.0.1:80, which no manifest may capture.
        own = Pod("node", "127.0.0.1", lab.node, "").start_echo(tcp=[80])
        try:
            yield lab
        finally:
            own.kill()
            own.wait()


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    return ManifestDir(tmp_path_factory.mktemp("manifests"))


@pytest.fixture(scope="module")
def daemon(lab, manifests, tmp_path_factory):
    log = tmp_path_factory.mktemp("daemon") / "dataplane.log"
    with Daemon.for_source(lab.node, manifests.path, log, extra=["-v"]) as daemon:
        yield daemon


def answers(lab, ns, address: str, pods=ALL, tries: int = 40) -> dict:
    """Who answered `tries` connections (a failure counts under its kind)."""
    return dict(tally(tcp_request(ns, address, 80, timeout=0.5) for _ in range(tries)))


def serving(lab, address: str, pods=ALL) -> None:
    wait_until(lambda: set(tally(sample(lambda: tcp_request(lab.client, address, 80, timeout=0.3), pods, tries=30,
                                        give_up_after=3))) == pods,
               timeout=10, what=f"{sorted(pods)} serve {address}:80")


@pytest.mark.parametrize("good_first", [True, False], ids=["bad-arrives-later", "bad-was-there-first"])
def test_a_service_without_endpoints_cannot_make_another_refuse(lab, daemon, manifests, good_first):
    address = "10.96.3.10" if good_first else "10.96.3.11"
    good = web(f"good-{int(good_first)}", address, created="2024-01-01T00:00:00Z")
    # "bad" sorts before "good": only the creation time makes good the first.
    bad = web(f"bad-{int(good_first)}", address, pods=(), created="2024-06-01T00:00:00Z")
    for filename, documents in ((("good", good), ("bad", bad)) if good_first else (("bad", bad), ("good", good))):
        manifests.write(f"{filename}-{int(good_first)}.yaml", documents)
        time.sleep(CONVERGENCE if filename == "good" else 0)
    try:
        serving(lab, address)
        time.sleep(CONVERGENCE)  # every change made, and in the kernel
        assert answers(lab, lab.client, address).keys() == ALL, "no refusal, no other answer"
        listing = lab.node.run("nft", "list", "map", "ip", "dataplane", "no-endpoint-services").stdout
        assert address not in listing, listing
        wait_until(lambda: f"Service default/bad-{int(good_first)}: spec.ports[0]: is already served "
                           f"({address}:80/TCP by Service default/good-{int(good_first)})" in daemon.log_text(),
                   timeout=CONVERGENCE, what="the conflict is logged, naming both")
    finally:
        manifests.remove(f"good-{int(good_first)}.yaml")
        manifests.remove(f"bad-{int(good_first)}.yaml")


@pytest.mark.parametrize("capture, field", [
    pytest.param(lambda: web("capture-reject", "127.0.0.1", pods=()), "spec.clusterIP", id="clusterip-no-endpoints"),
    pytest.param(lambda: web("capture-dnat", "127.0.0.1"), "spec.clusterIP", id="clusterip-to-pods"),
    pytest.param(lambda: web("capture-external", "10.96.3.21", external_ips=["127.0.0.1"]), "spec.externalIPs[0]",
                 id="external-ip-to-pods"),
    pytest.param(lambda: web("capture-any", "0.0.0.0"), "spec.clusterIP", id="clusterip-unspecified"),
])
def test_a_manifest_cannot_capture_the_nodes_loopback(lab, daemon, manifests, capture, field):
    assert answers(lab, lab.node, "127.0.0.1", tries=5) == {"node": 5}
    documents = capture()
    name = documents[0]["metadata"]["name"]
    manifests.write("beside.yaml", web("beside", "10.96.3.20"))
    manifests.write(f"{name}.yaml", documents)
    try:
        serving(lab, "10.96.3.20")  # written after the capture attempt would have been programmed
        wait_until(lambda: f"Service default/{name}: {field}: may not be a" in daemon.log_text(),
                   timeout=CONVERGENCE, what=f"the refusal is logged naming {field}")
        time.sleep(CONVERGENCE)
        assert answers(lab, lab.node, "127.0.0.1", tries=20) == {"node": 20}
    finally:
        manifests.remove(f"{name}.yaml")
        manifests.remove("beside.yaml")


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_no_bad_file_takes_the_daemon_down(lab, daemon, manifests):
    root = manifests.path
    before_kb = vm_hwm_kb(daemon.process.pid)
    bad = {
        "fifo.yaml": lambda p: os.mkfifo(p),
        "zero.yaml": lambda p: p.symlink_to("/dev/zero"),
        "urandom.yml": lambda p: p.symlink_to("/dev/urandom"),
        "deep-block.yaml": lambda p: p.write_text("- " * 60_000 + "x\n"),
        "deep-brackets.json": lambda p: p.write_text("[" * 100_000),
        "laughs.yaml": lambda p: p.write_text("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
            f"{n}: &{n} [{', '.join([f'*{q}'] * 9)}]\n" for q, n in zip("abcdefgh", "bcdefghi"))),
        "huge.yaml": lambda p: p.write_text("#" * (17 * 2**20)),  # past the 16 MiB limit
        # The worst file that is read: at the size limit, one node per two bytes.
        "widest.yaml": lambda p: p.write_text("- [" + "1," * (8 * 2**20 - 8) + "1]\n"),
    }
    try:
        for name, make in bad.items():
            make(root / name)
        manifests.write("after-bad.yaml", web("after-bad", "10.96.3.30"))
        serving(lab, "10.96.3.30")
        for name in bad:
            wait_until(lambda: f"{root / name}: " in daemon.log_text(), timeout=10, what=f"{name} refused by name")
        assert daemon.running and daemon.health() == 200
        manifests.write("after-bad-2.yaml", web("after-bad-2", "10.96.3.31"))
        serving(lab, "10.96.3.31")
        assert daemon.health() == 200
        peak_kb = vm_hwm_kb(daemon.process.pid)
        FIGURES.write_text(json.dumps({"daemon_peak_rss_mb_before": round(before_kb / 1024, 1),
                                       "daemon_peak_rss_mb_after_bad_files": round(peak_kb / 1024, 1)}) + "\n")
        assert peak_kb < 400 * 1024, f"peak RSS {peak_kb // 1024} MB"
    finally:
        for name in bad:
            (root / name).unlink(missing_ok=True)
        manifests.remove("after-bad.yaml")
        manifests.remove("after-bad-2.yaml")
