"""Sync latency from an API event to the kernel, with `--source kube` (issue 5).

    .venv/bin/python -m bench.api_latency [--services 1000] [--changes 100]     (root)

In a network namespace of its own: the stand-in API server
(dataplane/lab/kubeapi.py) listens on 127.0.0.1:6443 there and holds N
Services x 10 endpoints; `dataplane run --source kube` programs them. Then,
one at a time, an EndpointSlice moves one endpoint to a new address, and we
time from the API server committing the change (the moment the watch event
exists) to the daemon logging that sync's transaction as applied (its log
line follows the kernel's commit). The daemon runs with --min-sync-period 0,
so the figure is the pipeline's, not the rate limiter's. The last change is
checked in the kernel's ruleset too.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time

from dataplane.lab.kubeapi import KubeApi, netns_listener
from dataplane.lab.manifests import endpoint_slice, port, service
from dataplane.lab.netns import Netns, delete_netns

_SYNC = re.compile(r'msg="(full|partial) sync: (\d+) commands in ([\d.]+) ms')


def cluster_ip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def endpoint_ip(i: int, j: int, generation: int = 0) -> str:
    n = i * 10 + j + generation * 100_000
    return f"10.{128 + n // 65536 % 64}.{n // 256 % 256}.{n % 256}"


def objects(i: int, generation: int = 0) -> tuple[dict, dict]:
    ips = [endpoint_ip(i, j) for j in range(9)] + [endpoint_ip(i, 9, generation)]
    return (service(f"svc-{i}", cluster_ip(i), [port("http", 80)], namespace="bench"),
            endpoint_slice(f"svc-{i}", ips, [("http", 8080, "TCP")], namespace="bench"))


def measure(services: int, changes: int) -> dict:
    ns = Netns.create(f"dpapibench-{os.getpid()}")
    api = None
    daemon = None
    try:
        api = KubeApi(netns_listener(ns, 6443), bookmark_interval=30.0).start()
        for i in range(services):
            for obj in objects(i):
                api.apply(obj)
        lines: queue.Queue[tuple[float, str]] = queue.Queue()
        started = time.monotonic()
        daemon = ns.popen(sys.executable, "-m", "dataplane", "run", "--source", "kube",
                          "--master", "http://127.0.0.1:6443", "--hostname-override", "node-0",
                          "--cluster-cidr", "10.128.0.0/9", "--healthz-bind-address", "127.0.0.1:10256",
                          "--metrics-bind-address", "127.0.0.1:10249", "--min-sync-period", "0",
                          "--sync-period", "86400", stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, bufsize=1)

        def read() -> None:
            for line in daemon.stderr:
                lines.put((time.monotonic(), line))

        threading.Thread(target=read, daemon=True).start()

        def next_sync(kind: str, timeout: float) -> tuple[float, float]:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    stamp, line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(f"no {kind} sync within {timeout} s") from None
                match = _SYNC.search(line)
                if match and match.group(1) == kind:
                    return stamp, float(match.group(3))
                if "level=error" in line:
                    print(f"  daemon: {line.strip()}", file=sys.stderr)

        live, full_ms = next_sync("full", 300)
        print(f"{services} Services x 10 endpoints from the API: first full sync live {live - started:.2f} s "
              f"after start ({full_ms:.0f} ms in the sync)")
        time.sleep(1.0)
        latencies, syncs = [], []
        generation: dict[int, int] = {}
        last = None
        for k in range(changes):
            i = (k * 7919) % services
            generation[i] = generation.get(i, 0) + 1
            changed = time.monotonic()
            api.apply(objects(i, generation[i])[1])
            applied, sync_ms = next_sync("partial", 30)
            latencies.append((applied - changed) * 1000)
            syncs.append(sync_ms)
            last = endpoint_ip(i, 9, generation[i])
            time.sleep(0.05)
        in_kernel = last in ns.run("nft", "list", "ruleset").stdout
        status = open(f"/proc/{daemon.pid}/status").read()  # `ip netns exec` execs: same pid
        peak_rss_mb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        return {
            "command": " ".join(["python -m bench.api_latency", *sys.argv[1:]]),
            "services": services, "endpoints_per_service": 10, "changes": changes,
            "first_full_sync_live_s": round(live - started, 2),
            "latency_ms_median": round(statistics.median(latencies), 1),
            "latency_ms_p90": round(sorted(latencies)[int(0.9 * len(latencies))], 1),
            "sync_ms_median": round(statistics.median(syncs), 1),
            "last_change_in_kernel": in_kernel,
            "daemon_peak_rss_mb": round(peak_rss_mb),
        }
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if api is not None:
            api.close()
        ns.stop_children()
        delete_netns(ns.name)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_latency")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("python -m bench.api_latency: needs root (it builds a network namespace)", file=sys.stderr)
        return 3
    result = measure(args.services, args.changes)
    print(json.dumps(result, indent=2))
    return 0 if result["last_change_in_kernel"] else 1


if __name__ == "__main__":
    sys.exit(main())
