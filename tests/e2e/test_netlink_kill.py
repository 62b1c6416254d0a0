"""A kill -9 at any moment of a full sync leaves the previous complete ruleset or the new one, never a mix.

A child process programs a full sync through the netlink applier (alternately
replacing the table and flushing and refilling it in place, as the daemon's
resync does) between two worlds that differ in every map: world A has every
Service with 3 endpoints, world B with 5 and another port. The parent kills
it with SIGKILL at a random moment: anywhere in its life, or (half of the
rounds) within a few milliseconds of the moment it hands the batch to the
kernel. After each kill the table's signature (elements per map and set,
rules per chain) must be exactly A's or exactly B's.

Address plan: ClusterIPs 10.96.0.0/16, Pods 10.244.0.0/16, node 192.168.50.1.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed"),
]

SERVICES = 1500
KILLS = 40

# The child: `python -c CHILD ns world mode`; prints "sending" just before the batch goes to the kernel.
CHILD = textwrap.dedent("""
    import sys
    from dataplane.config import NodeSettings
    from dataplane.model import parse_objects
    from dataplane.nat import netlink, plan
    from dataplane.nat.nftables import NftCommand, Nftables
    from dataplane.nat.render import RulesetBuilder
    from dataplane.sync.store import Store

    ns, world, mode = sys.argv[1:4]
    endpoints, port = (3, 80) if world == "A" else (5, 8080)
    docs = []
    for i in range(int(sys.argv[4])):
        name = f"s{i}"
        docs.append({"kind": "Service", "metadata": {"name": name, "namespace": "default"},
                     "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                              "ports": [{"name": "p", "port": port, "protocol": "TCP"}]}})
        docs.append({"kind": "EndpointSlice",
                     "metadata": {"name": f"{name}-x", "namespace": "default",
                                  "labels": {"kubernetes.io/service-name": name}},
                     "ports": [{"name": "p", "port": 9000, "protocol": "TCP"}],
                     "endpoints": [{"addresses": [f"10.244.{(i * 7 + j) // 250 % 250}.{(i * 7 + j) % 250 + 1}"],
                                    "nodeName": "node-b"} for j in range(endpoints)]})
    store = Store()
    store.replace("f", parse_objects(docs)[0])
    nft = Nftables(NftCommand(["ip", "netns", "exec", ns, "nft"]), applier="netlink", netns=ns)
    ruleset = RulesetBuilder(NodeSettings(node_name="node-a", cluster_cidrs=("10.244.0.0/16",))).build(
        store.snapshot(), ["192.168.50.1"])
    existing = nft.list_objects("ip", "dataplane") if mode == "in-place" else None
    tx, _ = plan.full(ruleset, existing)
    send = netlink.NetlinkBatches.send

    def announced(self, messages):
        print("sending", flush=True)
        send(self, messages)

    netlink.NetlinkBatches.send = announced
    nft.apply(tx)
    assert nft.fallbacks == 0
    print("done", flush=True)
""")


def _child(ns: str, world: str, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, ns, world, mode, str(SERVICES)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signature(ns: str) -> dict[str, int]:
    """Elements per map and set, rules per chain, of `ip dataplane`; {} when there is no table."""
    done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "ip", "dataplane"],
                          capture_output=True, text=True)
    if done.returncode:
        assert "No such file or directory" in done.stderr, done.stderr
        return {}
    counts: dict[str, int] = {}
    for item in json.loads(done.stdout)["nftables"]:
        for kind in ("set", "map"):
            if kind in item:
                counts[f"{kind} {item[kind]['name']}"] = len(item[kind].get("elem", []))
        if "chain" in item:
            counts.setdefault(f"chain {item['chain']['name']}", 0)
        if "rule" in item:
            counts[f"chain {item['rule']['chain']}"] = counts.get(f"chain {item['rule']['chain']}", 0) + 1
    return counts


def _complete(ns: str, world: str, mode: str) -> dict[str, int]:
    child = _child(ns, world, mode)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and "done" in out, err
    return signature(ns)


def test_kill_9_during_full_syncs_leaves_one_whole_ruleset() -> None:
    rng = random.Random(int(os.environ.get("KILL_SEED", "9")))
    ns = f"dp-kill-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        worlds = {"A": _complete(ns, "A", "replace"), "B": _complete(ns, "B", "in-place")}
        assert worlds["A"] != worlds["B"]
        assert sum(worlds["B"].values()) > 5 * SERVICES  # the endpoint map alone
        started = time.monotonic()
        _complete(ns, "A", "in-place")
        lifetime = time.monotonic() - started
        current = "A"
        outcomes = {"old": 0, "new": 0}
        for round_ in range(KILLS):
            target = "B" if current == "A" else "A"
            mode = rng.choice(["replace", "in-place"])
            child = _child(ns, target, mode)
            if round_ % 2:
                # Near the batch: a kill just before, during or just after sendmsg().
                assert child.stdout.readline().strip() == "sending", child.stderr.read()
                time.sleep(rng.uniform(0, 0.05))
            else:
                time.sleep(rng.uniform(0, lifetime * 1.1))
            child.send_signal(signal.SIGKILL)
            child.wait(30)
            child.stdout.close()
            child.stderr.close()
            found = signature(ns)
            assert found in (worlds["A"], worlds["B"]), f"round {round_}: a mix of A and B ({mode})"
            landed = "A" if found == worlds["A"] else "B"
            outcomes["new" if landed == target else "old"] += 1
            current = landed
        # Both outcomes happened: the kills did land on both sides of the commit.
        assert outcomes["old"] and outcomes["new"], outcomes
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
