"""The README demo: a Service load-balancing real connections across Pods.

Builds a node, a client and three Pod namespaces (dataplane.lab), serves
HTTP in each Pod, runs `dataplane run` on the manifests in examples/, curls
the ClusterIP and the NodePort from the client, deletes a Pod from the
manifests and shows traffic move, then removes everything it made.

Run as root: scripts/demo.sh (which installs what is needed first).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataplane.lab.daemon import Daemon, cleanup
from dataplane.lab.topology import Lab

EXAMPLES = Path(__file__).parent
CLUSTER_IP, NODE_PORT = "10.96.0.10:8080", 30120
REQUESTS = 9


def curl(lab: Lab, url: str) -> str:
    """Which Pod answered: the echo server's reply starts with its name."""
    done = lab.client.run("curl", "-s", "--max-time", "2", url, check=False)
    words = done.stdout.split()
    return words[0] if words else f"(no answer: curl exit {done.returncode})"


def spread(lab: Lab, url: str) -> None:
    answers = [curl(lab, url) for _ in range(REQUESTS)]
    for number, answer in enumerate(answers, 1):
        print(f"    request {number}: answered by {answer}")
    counts = collections.Counter(answers)
    print("    => " + ", ".join(f"{pod}: {count}" for pod, count in sorted(counts.items())))


def step(text: str) -> None:
    print(f"\n== {text}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dataplane-demo-") as tmp, Lab.build() as lab:
        manifests = Path(tmp) / "manifests"
        manifests.mkdir()
        for path in EXAMPLES.glob("*.yaml"):
            shutil.copy(path, manifests / path.name)
        step("Three Pods, each serving HTTP on port 80 in its own network namespace")
        lab.start_echo(http=[80])
        for pod in lab.pods:
            print(f"    {pod.name}: {pod.ip}  (manifest: nginx-{pod.name[-1]}.yaml)")

        step(f"dataplane run --source {manifests}  (inside the node namespace)")
        dns = f"{lab.plan.node_ip}:53"
        with Daemon.for_source(lab.node, manifests, Path(tmp) / "dataplane.log",
                               extra=["--dns-bind-address", dns]) as daemon:
            print("    /healthz is 200: the rules are in the kernel. The Service map:")
            listing = lab.node.run("nft", "list", "map", "ip", "dataplane", "service-ips").stdout
            for line in listing.splitlines():
                if "goto" in line:
                    print("     ", line.strip().rstrip(","))

            step(f"The built-in cluster DNS on {dns}: dig from the client")
            for name in ("nginx.default.svc.cluster.local", "nginx-headless.default.svc.cluster.local"):
                answer = lab.client.run("dig", "+short", f"@{lab.plan.node_ip}", name, check=False).stdout.split()
                print(f"    {name} -> {', '.join(answer) or '(no answer)'}")
            # `ip netns exec` gives a namespace /etc/netns/NAME/resolv.conf as its resolv.conf.
            resolv = Path("/etc/netns") / lab.client.name / "resolv.conf"
            resolv.parent.mkdir(parents=True, exist_ok=True)
            resolv.write_text(f"search default.svc.cluster.local svc.cluster.local cluster.local\n"
                              f"nameserver {lab.plan.node_ip}\n")
            try:
                url = "http://nginx.default.svc.cluster.local:8080/"
                print(f"    curl {url} -> answered by {curl(lab, url)}")
                print(f"    curl http://nginx:8080/ (search path) -> answered by {curl(lab, 'http://nginx:8080/')}")
            finally:
                shutil.rmtree(resolv.parent, ignore_errors=True)

            step(f"curl http://{CLUSTER_IP}/ from the client, {REQUESTS} times (ClusterIP)")
            spread(lab, f"http://{CLUSTER_IP}/")
            step(f"curl http://{lab.plan.node_ip}:{NODE_PORT}/ from the client (NodePort)")
            spread(lab, f"http://{lab.plan.node_ip}:{NODE_PORT}/")

            step("Delete Pod nginx-3 from the manifests (rm nginx-3.yaml)")
            syncs = daemon.log_text().count("partial sync")
            (manifests / "nginx-3.yaml").unlink()
            started = time.monotonic()
            while daemon.log_text().count("partial sync") == syncs:
                if time.monotonic() - started > 5:
                    print("    no sync within 5 s: the demo failed")
                    return 1
                time.sleep(0.02)
            print(f"    the rules changed {time.monotonic() - started:.2f} s later "
                  "(at most one sync per --min-sync-period, 1 s); now:")
            spread(lab, f"http://{CLUSTER_IP}/")

            step("The daemon's log")
            for line in daemon.log_text().splitlines()[-4:]:
                print("    " + line)
        step("dataplane cleanup; deleting the namespaces")
        cleanup(lab.node)
        left = lab.node.run("nft", "list", "tables").stdout.strip()
        print(f"    tables left in the node namespace: {left or 'none'}")
    print("\nDone.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as error:
        print(f"demo failed: {error}", file=sys.stderr)
        sys.exit(1)
