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

`python -m bench.control_plane` runs the daemon once per nftables applier
(`--nftables-backend netlink` and `nft`) at each size, alternating which
goes first, and reports both side by side with their ratio; the apply part
of a sync (the daemon logs render, plan and apply apart) is where the two
differ.
"""

from __future__ import annotations

import argparse
import json
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import iptables_reference
from .manifests import spec_yaml, synthetic_cluster, synthetic_spec, write_cluster

_SYNC_LINE = re.compile(r'msg="(full|partial) sync: (\d+) commands in ([\d.]+) ms'
                        r'(?: \(render ([\d.]+), plan ([\d.]+), apply ([\d.]+))?')
APPLIERS = ("netlink", "nft")
# A Service balanced by a kernel table (issue 15): its slots are map elements, 16,381 for 10 endpoints.
TABLE_ANNOTATIONS = (("dataplane.io/lb-algorithm", "maglev"),)


def service_yaml(i: int, endpoints: int, generation: int = 0, tables: int = 0) -> str:
    """Synthetic Service i; the first `tables` Services are balanced by Maglev tables."""
    spec = synthetic_spec(i, endpoints, generation)
    return spec_yaml(replace(spec, annotations=TABLE_ANNOTATIONS) if i < tables else spec)


@dataclass
class ControlPlaneResult:
    services: int
    endpoints_per_service: int
    cold_start_s: float
    full_sync_s: float
    change_latency_ms: list[float] = field(default_factory=list)
    change_sync_ms: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    backend: str = "netlink"
    full_apply_s: float = 0.0  # the apply part of the full sync
    change_apply_ms: list[float] = field(default_factory=list)
    resync_s: float | None = None  # a periodic full resync with nothing changed (the kernel's generation vouches)
    resync_apply_s: float | None = None
    # The next periodic resync after an unrelated commit in the namespace (another table's): the
    # generation cannot vouch, so the tables are flushed and refilled in place.
    forced_resync_s: float | None = None
    forced_resync_apply_s: float | None = None
    # A second daemon started on the first one's rules (a restart, a DaemonSet update): to the first sync
    # live, to /healthz 200, and its peak RSS.
    restart_s: float | None = None
    restart_healthz_s: float | None = None
    restart_full_sync_s: float | None = None
    restart_peak_rss_mb: float | None = None
    tables: int = 0  # Services balanced by Maglev tables among `services`
    text_fallbacks: int = 0  # transactions the netlink applier handed to nft as text (the daemon's log)
    healthz_s: float | None = None  # daemon start -> /healthz first answers 200 (polled once the full sync is logged)

    def summary(self) -> dict:
        data = asdict(self)
        for key in ("change_latency_ms", "change_sync_ms", "change_apply_ms"):
            values = data.pop(key)
            data[f"{key}_median"] = round(statistics.median(values), 2) if values else None
            data[f"{key}_p90"] = round(_percentile(values, 0.9), 2) if values else None
            data[f"{key}_p99"] = round(_percentile(values, 0.99), 2) if values else None
        data["change_latency_ms_all"] = [round(v, 2) for v in self.change_latency_ms]
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

    def __init__(self, netns: str, source: Path, backend: str = "netlink", sync_period: float = 86400):
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.netns = netns
        self.started = time.monotonic()
        self.last_apply_ms = 0.0
        self.text_fallbacks = 0
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "dataplane", "run", "--source", str(source),
             "--hostname-override", "node-0", "--cluster-cidr", "10.128.0.0/9",
             "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249",
             "--min-sync-period", "0", "--sync-period", str(sync_period), "--nftables-backend", backend],
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
                self.last_apply_ms = float(match.group(6) or 0.0)
                return stamp, float(match.group(3))
            if "applied as nft text" in line:
                self.text_fallbacks += 1
            if "level=error" in line:
                print(f"  daemon: {line.strip()}", file=sys.stderr)

    def healthy_after(self, timeout: float) -> float:
        """When /healthz (127.0.0.1:10256 in the daemon's namespace) first answers 200; an upper bound
        by the time one poll takes (a curl in the namespace, about 10 ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = subprocess.run(["ip", "netns", "exec", self.netns, "curl", "-s", "-o", "/dev/null", "-w",
                                     "%{http_code}", "http://127.0.0.1:10256/healthz"], capture_output=True, text=True)
            if answer.stdout == "200":
                return time.monotonic()
            time.sleep(0.01)
        raise TimeoutError(f"/healthz not 200 within {timeout} s")

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


def measure(services: int, endpoints: int = 10, changes: int = 100, progress=print,
            backend: str = "netlink", resync_after: float = 0.0, tables: int = 0,
            restart: bool = False) -> ControlPlaneResult:
    """With `resync_after`, the daemon's --sync-period: after the changes, the next periodic
    full resync (nothing changed) is timed, then one after another table's commit. With `restart`,
    a second daemon is started on the first one's rules. The first `tables` Services are Maglev-balanced."""
    with tempfile.TemporaryDirectory(prefix="dataplane-bench-") as tmp, _Netns(f"dpbench-{os.getpid()}") as netns:
        source = Path(tmp) / "manifests"
        write_cluster(source, services, endpoints)
        for i in range(min(tables, services)):
            (source / f"svc-{i}.yaml").write_text(service_yaml(i, endpoints, tables=tables))
        daemon = _Daemon(netns.name, source, backend, resync_after or 86400)
        try:
            live, full_ms = daemon.next_sync("full", timeout=600)
            result = ControlPlaneResult(services, endpoints, live - daemon.started, full_ms / 1000, backend=backend,
                                        full_apply_s=daemon.last_apply_ms / 1000, tables=min(tables, services))
            result.healthz_s = daemon.healthy_after(timeout=60) - daemon.started
            progress(f"  {services} services ({backend}): cold start {result.cold_start_s:.2f} s "
                     f"(/healthz 200 at {result.healthz_s:.2f} s), "
                     f"full sync {full_ms:.0f} ms (apply {daemon.last_apply_ms:.0f} ms)")
            time.sleep(1.0)  # let the watcher settle after the initial scan
            generation: dict[int, int] = {}
            for k in range(changes):
                i = (k * 7919) % services  # spread over the cluster
                generation[i] = generation.get(i, 0) + 1
                path = source / f"svc-{i}.yaml"
                text = service_yaml(i, endpoints, generation[i], tables)
                written = time.monotonic()
                path.write_text(text)
                applied, sync_ms = daemon.next_sync("partial", timeout=30)
                result.change_latency_ms.append((applied - written) * 1000)
                result.change_sync_ms.append(sync_ms)
                result.change_apply_ms.append(daemon.last_apply_ms)
                time.sleep(0.05)
            if resync_after:
                _, resync_ms = daemon.next_sync("full", timeout=resync_after + 600)
                result.resync_s, result.resync_apply_s = resync_ms / 1000, daemon.last_apply_ms / 1000
                subprocess.run(["ip", "netns", "exec", netns.name, "nft", "add table inet bench-other"], check=True)
                _, forced_ms = daemon.next_sync("full", timeout=resync_after + 600)
                result.forced_resync_s, result.forced_resync_apply_s = forced_ms / 1000, daemon.last_apply_ms / 1000
                progress(f"  {services} services ({backend}): full resync {resync_ms:.0f} ms "
                         f"(nothing changed), {forced_ms:.0f} ms after another table's commit "
                         f"(apply {daemon.last_apply_ms:.0f} ms)")
            result.peak_rss_mb = daemon.peak_rss_mb()
            result.text_fallbacks = daemon.text_fallbacks
        finally:
            daemon.stop()
        if restart:  # the rules stay when a daemon stops: the next one starts on them
            daemon = _Daemon(netns.name, source, backend, 86400)
            try:
                live, full_ms = daemon.next_sync("full", timeout=600)
                result.restart_s, result.restart_full_sync_s = live - daemon.started, full_ms / 1000
                result.restart_healthz_s = daemon.healthy_after(timeout=60) - daemon.started
                result.restart_peak_rss_mb = daemon.peak_rss_mb()
                progress(f"  {services} services ({backend}): restart on the rules in place: first sync live at "
                         f"{result.restart_s:.2f} s (/healthz 200 at {result.restart_healthz_s:.2f} s), "
                         f"full sync {full_ms:.0f} ms, peak RSS {result.restart_peak_rss_mb:.0f} MB")
            finally:
                daemon.stop()
        return result


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


def compare_appliers(sizes: list[int], changes: int, change_size: int, progress=print,
                     resync_after: float = 0.0, appliers: tuple[str, ...] = APPLIERS, tables: int = 0,
                     restart: bool = False) -> list[dict]:
    """Both appliers at every size, in one run; the order alternates so that neither always runs on a
    machine warmed (or loaded) by the other. Changes are timed at `change_size` only."""
    records = []
    for index, size in enumerate(sizes):
        order = appliers if index % 2 == 0 else appliers[::-1]
        pair = {}
        for backend in order:
            before = _loadavg()
            summary = measure(size, changes=changes if size == change_size else 0, progress=progress,
                              backend=backend, resync_after=resync_after, tables=tables,
                              restart=restart).summary()
            summary["loadavg"] = f"{before} before, {_loadavg()} after"
            pair[backend] = summary
        if len(pair) < 2:  # one applier only: nothing to compare
            records.append({"services": size, **pair})
            continue
        netlink, text = pair["netlink"], pair["nft"]
        record = {"services": size, "netlink": netlink, "nft": text, "ratio_netlink_to_nft": {
            key: round(netlink[key] / text[key], 3) if netlink.get(key) and text.get(key) else None
            for key in ("cold_start_s", "healthz_s", "full_sync_s", "full_apply_s", "resync_s", "resync_apply_s",
                        "forced_resync_s", "restart_healthz_s", "restart_peak_rss_mb",
                        "change_latency_ms_median", "change_sync_ms_median", "change_apply_ms_median",
                        "peak_rss_mb")}}
        records.append(record)
        progress(f"  {size} services: netlink/nft full sync {record['ratio_netlink_to_nft']['full_sync_s']}, "
                 f"apply {record['ratio_netlink_to_nft']['full_apply_s']}")
    return records


def markdown(records: list[dict]) -> str:
    lines = ["| Services | figure | netlink | nft | netlink / nft |", "|---:|---|---:|---:|---:|"]
    tables = {record.get(backend, {}).get("tables", 0) for record in records for backend in APPLIERS}
    if tables - {0}:
        lines.insert(0, f"Maglev-balanced Services among them: {', '.join(map(str, sorted(tables)))}\n")
    figures = [("cold_start_s", "cold start (s)"), ("healthz_s", "cold start to /healthz 200 (s)"),
               ("full_sync_s", "full sync (s)"),
               ("full_apply_s", "  of which apply (s)"), ("resync_s", "full resync, nothing changed (s)"),
               ("resync_apply_s", "  of which apply (s)"),
               ("forced_resync_s", "full resync after another table's commit (s)"),
               ("forced_resync_apply_s", "  of which apply (s)"),
               ("restart_healthz_s", "restart on the rules in place to /healthz 200 (s)"),
               ("restart_full_sync_s", "  its full sync (s)"),
               ("restart_peak_rss_mb", "  its peak RSS (MB)"),
               ("change_latency_ms_median", "one change, write -> live (ms, median)"),
               ("change_latency_ms_p90", "one change, write -> live (ms, p90)"),
               ("change_latency_ms_p99", "one change, write -> live (ms, p99)"),
               ("change_sync_ms_median", "one change, sync (ms, median)"),
               ("change_apply_ms_median", "  of which apply (ms, median)"), ("peak_rss_mb", "daemon peak RSS (MB)"),
               ("text_fallbacks", "transactions sent as nft text")]
    for record in records:
        if "netlink" not in record or "nft" not in record:
            (backend,) = [k for k in APPLIERS if k in record]
            for key, name in figures:
                if record[backend].get(key) is not None:
                    lines.append(f"| {record['services']:,} | {name} | "
                                 + (f"{record[backend][key]:.3f} | - | - |" if backend == "netlink"
                                    else f"- | {record[backend][key]:.3f} | - |"))
            continue
        for key, name in figures:
            a, b = record["netlink"].get(key), record["nft"].get(key)
            if a is None or b is None:
                continue
            ratio = f"{a / b:.2f}x" if b else "-"
            lines.append(f"| {record['services']:,} | {name} | {a:.3f} | {b:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane",
                                     description="both nftables appliers side by side: full syncs and one change")
    parser.add_argument("--sizes", default="1000,10000,30000", help="Service counts, comma-separated")
    parser.add_argument("--changes", type=int, default=30, help="endpoint changes timed at --change-size")
    parser.add_argument("--change-size", type=int, default=10000)
    parser.add_argument("--resync-after", type=float, default=0.0,
                        help="seconds: the daemon's --sync-period; the first periodic resync is timed (0: none)")
    parser.add_argument("--restart", action="store_true",
                        help="then start a second daemon on the first one's rules, as a restart does")
    parser.add_argument("--appliers", default=",".join(APPLIERS), help="netlink, nft or both, comma-separated")
    parser.add_argument("--tables", type=int, default=0,
                        help="the first N Services balanced by Maglev tables (16,381 slots each at 10 endpoints)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "appliers"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.control_plane: needs root (it builds network namespaces)", file=sys.stderr)
        return 3
    sizes = [int(s) for s in args.sizes.split(",") if s]
    started = time.strftime("%Y-%m-%d %H:%M")
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    records = compare_appliers(sizes, args.changes, args.change_size, progress=lambda m: print(m, flush=True),
                               resync_after=args.resync_after,
                               appliers=tuple(a for a in args.appliers.split(",") if a in APPLIERS),
                               tables=args.tables, restart=args.restart)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.control_plane", *(argv if argv is not None else sys.argv[1:])])
    (out / "results.json").write_text(json.dumps({"command": command, "date": started, "code": code,
                                                  "records": records}, indent=1) + "\n")
    text = f"`{command}` at {code}, {started}\n\n" + markdown(records)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
