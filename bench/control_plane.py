"""Control-plane cost: full sync, one change, memory, at 1k/10k/30k Services.

For each size, in a network namespace of its own: write the cluster as one
YAML file per Service, start `dataplane run` on it and read its log.
- cold start: daemon start -> first full sync live (includes parsing YAML);
- full sync: the daemon's own figure for render + plan + apply;
- change latency: rewrite one Service's file (one endpoint moves) -> the
  daemon logs the partial sync as applied; wall clock, file write to log;
- peak RSS of the daemon;
- the yardstick: kube-proxy's iptables layout for the same cluster
  (`iptables_reference.py`), timed through iptables-nft-restore in a
  namespace of its own.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import iptables_reference
from .manifests import service_yaml, synthetic_cluster, write_cluster

_SYNC_LINE = re.compile(r'msg="(full|partial) sync: (\d+) commands in ([\d.]+) ms')


@dataclass
class ControlPlaneResult:
    services: int
    endpoints_per_service: int
    cold_start_s: float
    full_sync_s: float
    change_latency_ms: list[float] = field(default_factory=list)
    change_sync_ms: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    def summary(self) -> dict:
        data = asdict(self)
        for key in ("change_latency_ms", "change_sync_ms"):
            values = data.pop(key)
            data[f"{key}_median"] = round(statistics.median(values), 2) if values else None
            data[f"{key}_p90"] = round(_percentile(values, 0.9), 2) if values else None
        data["changes"] = len(self.change_latency_ms)
        return data


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Netns:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> "_Netns":
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        for command in ("ip link set lo up", "ip link add node0 type veth peer name node1",
                        "ip link set node0 up", "ip addr add 192.168.50.1/24 dev node0"):
            subprocess.run(["ip", "netns", "exec", self.name, *command.split()], check=True)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "pids", self.name], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], check=False)


class _Daemon:
    """`dataplane run` in a namespace, with its log lines timestamped as they arrive."""

    def __init__(self, netns: str, source: Path):
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "dataplane", "run", "--source", str(source),
             "--hostname-override", "node-0", "--cluster-cidr", "10.128.0.0/9",
             "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249",
             "--min-sync-period", "0", "--sync-period", "86400"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put((time.monotonic(), line))

    def next_sync(self, kind: str, timeout: float) -> tuple[float, float]:
        """(arrival time, logged sync milliseconds) of the next `kind` sync line."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stamp, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {kind} sync within {timeout} s") from None
            match = _SYNC_LINE.search(line)
            if match and match.group(1) == kind:
                return stamp, float(match.group(3))
            if "level=error" in line:
                print(f"  daemon: {line.strip()}", file=sys.stderr)

    def peak_rss_mb(self) -> float:
        # The daemon is the child of `ip netns exec`, which execs it: same pid.
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def measure(services: int, endpoints: int = 10, changes: int = 100, progress=print) -> ControlPlaneResult:
    with tempfile.TemporaryDirectory(prefix="dataplane-bench-") as tmp, _Netns(f"dpbench-{os.getpid()}") as netns:
        source = Path(tmp) / "manifests"
        write_cluster(source, services, endpoints)
        daemon = _Daemon(netns.name, source)
        try:
            live, full_ms = daemon.next_sync("full", timeout=600)
            result = ControlPlaneResult(services, endpoints, live - daemon.started, full_ms / 1000)
            progress(f"  {services} services: cold start {result.cold_start_s:.2f} s, full sync {full_ms:.0f} ms")
            time.sleep(1.0)  # let the watcher settle after the initial scan
            generation: dict[int, int] = {}
            for k in range(changes):
                i = (k * 7919) % services  # spread over the cluster
                generation[i] = generation.get(i, 0) + 1
                path = source / f"svc-{i}.yaml"
                text = service_yaml(i, endpoints, generation[i])
                written = time.monotonic()
                path.write_text(text)
                applied, sync_ms = daemon.next_sync("partial", timeout=30)
                result.change_latency_ms.append((applied - written) * 1000)
                result.change_sync_ms.append(sync_ms)
                time.sleep(0.05)
            result.peak_rss_mb = daemon.peak_rss_mb()
            return result
        finally:
            daemon.stop()


def iptables_restore_seconds(services: int, endpoints: int = 10, cluster_cidr: str = "10.128.0.0/9") -> float:
    """Seconds iptables-nft-restore takes to load kube-proxy's layout of the same cluster, in a fresh namespace."""
    from dataplane.lab.netns import Netns, delete_netns

    text = iptables_reference.render(synthetic_cluster(services, endpoints), cluster_cidr)
    name = f"dpbench-ipt-{os.getpid()}"
    delete_netns(name)
    ns = Netns.create(name)
    try:
        return iptables_reference.load(ns, text)
    finally:
        ns.delete()
