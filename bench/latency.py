"""Data-plane latency: the same requests through every path, interleaved in one run.

One lab (`dataplane.lab.Lab`: client, node, one Pod) per path and Service
count, all built before the first measurement and kept until the last:

    direct               client -> Pod IP; the node only routes (no Service, no
                         NAT rules, no conntrack): the floor
    kernel               client -> ClusterIP; `dataplane run --proxy-mode kernel`
    userspace            the same with `--proxy-mode userspace`, when the
                         installed `dataplane run --help` offers it (its
                         defaults: a queue per CPU, fanned out by CPU, a
                         forwarder process pinned to each)
    userspace-event-loop the same with `--forwarder-loop event`: packets read by
                         the workers' event loop instead of a blocking thread: opt-in
    userspace-python     the same with the compiled hot loop turned off
                         (DATAPLANE_NFQUEUE_COMPILED=0): decided in Python,
                         what a machine without gcc at install runs
    userspace-busy-poll  the same with `--busy-poll 50` (µs): opt-in path
    netfilterqueue       the reference forwarder (bench/forwarders.py): the
                         NetfilterQueue binding, one verdict per packet, the
                         same balancer and the same placement (a process per
                         queue, pinned to its CPU), in a userspace lab whose
                         daemon was stopped (its rules stay)
    userspace-blocking   the same with our queue socket read by a bare blocking
                         loop (no control thread, no lock): opt-in path
    iptables-reference   client -> ClusterIP; kube-proxy's iptables layout for
                         the same cluster (iptables_reference.py), loaded with
                         iptables-nft-restore
    direct-on-kernel-node  client -> Pod IP through the kernel-mode lab's node:
                         no Service, but conntrack and the data plane's hooks
                         are there (what every non-Service packet pays)

The cluster at size N is N-1 synthetic Services (10 endpoints each, nowhere)
plus the measured Service, last (the worst place in a linear walk), whose 10
endpoints are 10 addresses of the lab's one Pod. The client is inside the
cluster CIDR, as a Pod would be, so no path masquerades.

Rounds: each round runs every mode (tcp-crr, udp-crr, tcp-rr, udp-rr) on
every target, the targets in an order rotated by one each round, so that
a burst of noise from the shared machine lands on different paths in
different rounds instead of on one path.

Pinning: by default the client and the Pod's server share one CPU (taskset).
Split over two CPUs, every request pays a cross-CPU wake-up (on this VM about
50 µs per round trip, against 6 µs on one CPU), which hides what the data plane
costs; `split_cpus` measures that way anyway.

Invariant: everything is built in namespaces this process made and removed
in `close()`, which runs on any exit (also KeyboardInterrupt); traffic goes
only to addresses inside those namespaces.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Interface
from pathlib import Path

from dataplane.lab.client import http_get
from dataplane.lab.daemon import Daemon, dataplane_executable
from dataplane.lab.topology import AddressPlan, Lab

from . import iptables_reference, loadgen, stats
from .manifests import ServiceSpec, measured_spec, synthetic_cluster, write_specs

PATHS = ("direct", "kernel", "userspace", "netfilterqueue", "iptables-reference", "direct-on-kernel-node",
         "userspace-event-loop", "userspace-busy-poll", "userspace-blocking", "kernel-maglev", "userspace-python")
DEFAULT_PATHS = PATHS[:6]
USERSPACE_PATHS = {"userspace", "netfilterqueue", "userspace-event-loop", "userspace-busy-poll", "userspace-blocking",
                   "userspace-python"}
REFERENCE_FORWARDERS = {"netfilterqueue": "netfilterqueue", "userspace-blocking": "blocking"}
BUSY_POLL_US = 50
MAGLEV = (("dataplane.io/lb-algorithm", "maglev"),)  # kernel-maglev: the measured Service's balancing table
SERVICE_PORT = 80
SERVER_PORT = 7000
ENDPOINTS = 10
NODE_NAME = "node1"  # run_argv's default --hostname-override: the measured endpoints are local
PLAN = AddressPlan(pods=1, client=IPv4Interface("10.244.0.2/24"), node_client_side=IPv4Interface("10.244.0.1/24"))


def endpoint_ips() -> list[str]:
    return [str(PLAN.pod_ip(1) + k) for k in range(ENDPOINTS)]


def proxy_modes() -> list[str]:
    """The --proxy-mode choices the installed `dataplane run --help` lists."""
    done = subprocess.run([dataplane_executable(), "run", "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    match = re.search(r"--proxy-mode \{([^}]*)\}", done.stdout)
    if match:
        return match.group(1).split(",")
    # The help that describes the modes in prose instead of listing choices ("... userspace: ...").
    described = re.search(r"--proxy-mode PROXY_MODE\s+(.*?)(?:\n  -|\Z)", done.stdout, re.S)
    return re.findall(r"\b(kernel|userspace)\b", described.group(1)) if described else []


def measured(services: int) -> ServiceSpec:
    """The Service every path but `direct` goes through, in the cluster of `services` Services."""
    return measured_spec(services - 1, endpoint_ips(), NODE_NAME, SERVICE_PORT, SERVER_PORT)


def cluster(services: int) -> list[ServiceSpec]:
    """The specs of the cluster at size `services`: synthetic ones, then the measured one last."""
    return [*synthetic_cluster(services - 1, ENDPOINTS), measured(services)]


@dataclass
class Target:
    """One lab ready to be measured."""

    path: str
    services: int | None  # None for direct: no Services at all
    lab: Lab
    destination: str
    port: int
    setup: dict = field(default_factory=dict)
    daemon: Daemon | None = None
    forwarders: list = field(default_factory=list)  # reference forwarder processes (netfilterqueue, blocking)

    @property
    def key(self) -> str:
        return self.path if self.services is None else f"{self.path}/{self.services}"


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    paths: tuple[str, ...]
    modes: tuple[str, ...] = loadgen.MODES
    rounds: int = 10
    count: dict = field(default_factory=lambda: {"tcp-crr": 1000, "udp-crr": 1000, "tcp-rr": 5000, "udp-rr": 5000})
    seconds: float = 3.0  # cap per client run
    client_cpu: int | None = None  # taskset CPUs; None: not pinned
    server_cpu: int | None = None


class LatencyBench:
    """Builds the labs (`build`), measures (`run`), and always removes them (`close`, or use `with`)."""

    def __init__(self, settings: Settings, workdir: Path, progress: Callable[[str], None]):
        self.settings = settings
        self.workdir = workdir
        self.progress = progress
        self.targets: list[Target] = []
        self.unavailable: dict[str, str] = {}  # path -> why it was not measured
        self.binary: Path | None = None
        self._labs: list[Lab] = []
        self._ports: dict[str, int] = {}  # target key -> next udp-crr source port
        self.cpu: dict[str, dict[str, list]] = {}  # target key -> mode -> [forwarder CPU seconds, new flows]

    def __enter__(self) -> "LatencyBench":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for target in self.targets:
            for child in target.forwarders:
                child.terminate()
            if target.daemon is not None:
                try:
                    target.daemon.stop()
                except Exception as error:  # noqa: BLE001 - cleanup goes on whatever the daemon did
                    self.progress(f"  {target.key}: daemon stop: {error}")
        for lab in self._labs:
            lab.close()
        self._labs.clear()

    # ---- building ----

    def build(self) -> None:
        self.binary = loadgen.build(self.workdir)
        paths = list(self.settings.paths)
        if USERSPACE_PATHS & set(paths) and "userspace" not in proxy_modes():
            for path in USERSPACE_PATHS & set(paths):
                self.unavailable[path] = "not available: `dataplane run --help` offers no userspace proxy mode"
                paths.remove(path)
            self.progress("  userspace: not available (dataplane run --proxy-mode has no userspace choice yet)")
        if "netfilterqueue" in paths:
            try:
                import netfilterqueue  # noqa: F401
            except ImportError as error:
                self.unavailable["netfilterqueue"] = f"not available: {error} (the `bench` extra installs it)"
                paths.remove("netfilterqueue")
        if "direct" in paths:
            self._add(self._direct())
        for size in self.settings.sizes:
            specs = cluster(size)
            source = self.workdir / f"manifests-{size}"
            if ({"kernel"} | USERSPACE_PATHS) & set(paths):
                write_specs(source, specs)
            for path in paths:
                if path == "kernel-maglev":
                    # The same cluster, the measured Service balanced by its Maglev table (nat/tables.py).
                    maglev_source = self.workdir / f"manifests-maglev-{size}"
                    write_specs(maglev_source, [*specs[:-1], replace(specs[-1], annotations=MAGLEV)])
                    target = self._daemon("kernel", size, maglev_source, "kernel-maglev")
                    self._add(replace(target, path="kernel-maglev") if target else None)
                elif path == "kernel" or path in USERSPACE_PATHS:
                    target = self._daemon(path, size, source)
                    self._add(target)
                    if path == "kernel" and target and "direct-on-kernel-node" in paths:
                        self._add(Target("direct-on-kernel-node", size, target.lab, endpoint_ips()[0], SERVER_PORT))
                elif path == "iptables-reference":
                    self._add(self._iptables(size, specs))

    def _add(self, target: Target | None) -> None:
        if target is None:
            return
        try:
            self._check(target)
        except (RuntimeError, loadgen.LoadgenError) as error:
            if target.path == "direct":
                raise  # without the floor there is nothing to compare with
            self.unavailable[target.key] = f"broken: {error}"
            self.progress(f"  {target.key}: not measured: {error}")
            return
        self.targets.append(target)

    def _lab(self) -> Lab:
        lab = Lab.build(PLAN)
        self._labs.append(lab)
        pod = lab.pods[0]
        extra = endpoint_ips()[1:]
        pod.ns.ip_batch([f"address add {ip}/32 dev eth0" for ip in extra])
        lab.node.ip_batch([f"route add {ip}/32 dev {pod.veth} scope link" for ip in extra])
        # The client opens thousands of short connections per round; let it reuse
        # TIME_WAIT ports (its own namespace only) rather than run out of them.
        lab.client.sysctl(net__ipv4__tcp_tw_reuse=1,
                          net__ipv4__ip_local_port_range=f"{loadgen.PORT_LOW} {loadgen.PORT_HIGH}")
        loadgen.start_server(pod.ns, self.binary, SERVER_PORT, self.settings.server_cpu)
        return lab

    def _direct(self) -> Target:
        started = time.monotonic()
        lab = self._lab()
        self.progress(f"  direct: lab ready in {time.monotonic() - started:.1f} s")
        return Target("direct", None, lab, endpoint_ips()[0], SERVER_PORT)

    def _daemon(self, path: str, size: int, source: Path, name: str = "") -> Target | None:
        lab = self._lab()
        spec = measured(size)
        extra = ["--proxy-mode", "kernel" if path == "kernel" else "userspace", "--sync-period", "86400"]
        if path == "userspace-busy-poll":
            extra += ["--busy-poll", str(BUSY_POLL_US)]
        if path == "userspace-event-loop":
            extra += ["--forwarder-loop", "event"]
        daemon = Daemon.for_source(lab.node, source, self.workdir / f"{name or path}-{size}.log", extra=extra,
                                   cluster_cidr=str(PLAN.cluster_cidr))
        if path == "userspace-python":  # the workers inherit the daemon's environment
            daemon.argv = ["env", "DATAPLANE_NFQUEUE_COMPILED=0", *daemon.argv]
        started = time.monotonic()
        try:
            daemon.start(timeout=900)
        except Exception as error:  # noqa: BLE001 - reported, the other paths go on
            self.unavailable[f"{path}/{size}"] = f"daemon did not start: {str(error).splitlines()[0]}"
            self.progress(f"  {path}/{size}: daemon did not start: {error}")
            return None
        ready = time.monotonic() - started
        self.progress(f"  {path}/{size}: daemon healthy {ready:.1f} s after start")
        target = Target(path, size, lab, spec.cluster_ip, SERVICE_PORT, {"daemon_ready_s": ready}, daemon)
        if path in REFERENCE_FORWARDERS:
            try:
                self._hand_over(target, spec)
            except Exception as error:  # noqa: BLE001 - reported, the other paths go on
                self.unavailable[f"{path}/{size}"] = f"reference forwarder did not start: {error}"
                self.progress(f"  {path}/{size}: reference forwarder did not start: {error}")
                return None
        return target

    def _hand_over(self, target: Target, spec: ServiceSpec) -> None:
        """Stops the daemon (its rules stay) and binds its queues with a reference forwarder, one per CPU."""
        names = {f"{spec.namespace}/{spec.name}:{port.name}" for port in spec.ports}
        deadline = time.monotonic() + 120
        while True:  # the workers may still be taking in the Services; their answer then leaves them out
            body = json.loads(http_get(target.lab.node, "127.0.0.1", 10249, "/status", timeout=120)[1])
            found = {s["service"]: s for s in body["services"] if s["service"] in names}
            if len(found) == len(names) or time.monotonic() > deadline:
                break
            time.sleep(1)
        queues = body["queues"]
        tables = []
        for port in spec.ports:
            name = f"{spec.namespace}/{spec.name}:{port.name}"
            if name not in found:
                raise RuntimeError(f"/status does not show {name}")
            status = found[name]
            tables.append({"name": name, "addresses": [spec.cluster_ip], "port": port.port,
                           "protocol": 6 if port.protocol == "TCP" else 17, "algorithm": status["algorithm"],
                           "targets": [[e["id"], *e["endpoint"].rsplit(":", 1), e["weight"]]
                                       for e in status["endpoints"]]})
        for table in tables:
            table["targets"] = [[i, ip, int(port), w] for i, ip, port, w in table["targets"]]
        workers = forwarder_pids(target.daemon.process.pid)
        target.daemon.stop()
        target.daemon = None
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)  # a worker still alive still holds its queue (EBUSY)
        fanout = body.get("queue_fanout", False)
        for index, queue in enumerate(queues):
            cpu = index if fanout else -1  # fanout: queue i gets CPU i's packets (one queue per CPU)
            child = target.lab.node.popen(sys.executable, "-m", "bench.forwarders", REFERENCE_FORWARDERS[target.path],
                                          str(queue), str(cpu), json.dumps(tables), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True,
                                          cwd=str(Path(__file__).resolve().parent.parent))
            line = child.stdout.readline().strip()
            if line != "ready":
                child.kill()
                why = child.stderr.read().strip().splitlines()
                raise RuntimeError(f"bench.forwarders {target.path} queue {queue}: "
                                   f"{why[-1] if why else f'exited with status {child.wait()}'}")
            target.forwarders.append(child)
        self.progress(f"  {target.key}: daemon stopped (rules kept), {len(queues)} reference forwarder(s) bound")

    def forwarder_cpu(self, target: Target) -> float | None:
        """CPU seconds the target's forwarder processes used so far; None outside userspace paths.

        Read from /proc (on-CPU nanoseconds of every thread: clock ticks are too
        coarse), not from /status, which at 10,000 Services costs the workers more
        than the flows measured.
        """
        if target.path not in USERSPACE_PATHS:
            return None
        pids = [child.pid for child in target.forwarders]
        if target.daemon is not None and target.daemon.process is not None:
            pids = forwarder_pids(target.daemon.process.pid)
        seconds = 0.0
        for pid in pids:
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    seconds += int((task / "schedstat").read_text().split()[0]) / 1e9
            except OSError:
                pass  # a worker that is being restarted
        return seconds

    def _iptables(self, size: int, specs: list) -> Target:
        lab = self._lab()
        text = iptables_reference.render(specs, str(PLAN.cluster_cidr))
        seconds = iptables_reference.load(lab.node, text)
        rules = iptables_reference.rule_count(text)
        self.progress(f"  iptables-reference/{size}: {rules} rules loaded by iptables-nft-restore in {seconds:.2f} s")
        return Target("iptables-reference", size, lab, specs[-1].cluster_ip, SERVICE_PORT,
                      {"iptables_restore_s": seconds, "rules": rules})

    def _check(self, target: Target) -> None:
        """A few requests of every mode must all be answered, or the target is broken: raise."""
        for mode in self.settings.modes:
            run = self._measure(target, mode, 20, 5.0)
            if run.failed or len(run.samples_ns) != 20:
                raise RuntimeError(f"{target.key} does not answer {mode}: {run.failed} failed, errno {run.errors}")

    # ---- measuring ----

    def _measure(self, target: Target, mode: str, count: int, seconds: float) -> loadgen.Run:
        first = None
        if mode == "udp-crr":
            # Fresh source ports, in order, so that every datagram is a new flow for the node's conntrack:
            # 64,000 ports last the whole run; a wrap comes long after the 30 s UDP conntrack timeout.
            first = self._ports.get(target.key, loadgen.PORT_LOW)
            span = loadgen.PORT_HIGH - loadgen.PORT_LOW + 1
            self._ports[target.key] = loadgen.PORT_LOW + (first - loadgen.PORT_LOW + count) % span
        return loadgen.measure(target.lab.client, self.binary, mode, target.destination, target.port, count,
                               seconds, self.settings.client_cpu, first)

    def run(self) -> dict:
        """Warms every target up, runs the rounds; returns the raw per-round runs keyed by target then mode."""
        s = self.settings
        raw = {t.key: {m: [] for m in s.modes} for t in self.targets}
        self.cpu = {t.key: {m: [0.0, 0] for m in ("tcp-crr", "udp-crr")} for t in self.targets
                    if t.path in USERSPACE_PATHS}  # CPU seconds of the forwarders, new flows measured
        for target in self.targets:  # one untimed pass: caches, conntrack, ARP
            for mode in s.modes:
                self._measure(target, mode, min(200, s.count[mode]), s.seconds)
        for r in range(s.rounds):
            shift = r % len(self.targets)
            order = self.targets[shift:] + self.targets[:shift]
            started = time.monotonic()
            for mode in s.modes:
                for target in order:
                    counted = mode in ("tcp-crr", "udp-crr") and target.key in self.cpu
                    before = self.forwarder_cpu(target) if counted else None
                    run = self._measure(target, mode, s.count[mode], s.seconds)
                    raw[target.key][mode].append(run)
                    if before is not None:
                        self.cpu[target.key][mode][0] += self.forwarder_cpu(target) - before
                        self.cpu[target.key][mode][1] += len(run.samples_ns) + run.failed
            medians = []
            for target in self.targets:
                run = raw[target.key][s.modes[0]][-1]
                if run.samples_ns:
                    medians.append(f"{target.key} {stats.percentile(sorted(run.samples_ns), 50) / 1000:.0f}")
            self.progress(f"  round {r + 1}/{s.rounds} ({time.monotonic() - started:.1f} s), "
                          f"{s.modes[0]} p50 µs: " + ", ".join(medians))
        return raw


def forwarder_pids(daemon_pid: int) -> list[int]:
    """The pids of a daemon's forwarder worker processes (`python -m dataplane.queue.workers`)."""
    found = []
    for task in Path(f"/proc/{daemon_pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                if b"dataplane.queue.workers" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
            except OSError:
                pass
    return found


# (reference path, its Service count or "same", record key) -> the paths compared with it
REFERENCES = {
    ("direct", None, "vs_direct"): set(PATHS) - {"direct"},
    ("kernel", "same", "vs_kernel"): USERSPACE_PATHS | {"kernel-maglev"},
    ("userspace", "same", "vs_userspace"): USERSPACE_PATHS - {"userspace"},
    ("direct-on-kernel-node", "same", "vs_pod_ip_same_node"): {"kernel"},
}


def summarize(targets: list[Target], raw: dict, settings: Settings, cpu: dict | None = None) -> list[dict]:
    """One record per (target, mode): pooled percentiles (µs), per-round spread, CDF, ratios to direct.

    Userspace records also carry ratios to kernel mode at the same size, and
    for new flows the forwarders' CPU time per flow (`cpu`: LatencyBench.cpu).
    """
    records = []
    per_round: dict[tuple[str, str], dict[str, list]] = {}
    for target in targets:
        for mode in settings.modes:
            runs = raw[target.key][mode]
            rounds_p50, rounds_p99 = [], []
            pooled: list[float] = []
            failed, errors = 0, {}
            for run in runs:
                us = sorted(x / 1000 for x in run.samples_ns)
                pooled.extend(us)
                rounds_p50.append(stats.percentile(us, 50) if us else None)
                rounds_p99.append(stats.percentile(us, 99) if us else None)
                failed += run.failed
                for code, n in run.errors.items():
                    errors[os.strerror(code)] = errors.get(os.strerror(code), 0) + n
            per_round[(target.key, mode)] = {"p50": rounds_p50, "p99": rounds_p99}
            records.append({
                "path": target.path, "services": target.services, "mode": mode,
                "latency_us": stats.summarize(pooled), "failed": failed, "errors": errors,
                "rounds_p50_us": stats.spread(rounds_p50), "rounds_p99_us": stats.spread(rounds_p99),
                "cdf_us": stats.cdf_points(pooled),
            })
            spent = (cpu or {}).get(target.key, {}).get(mode)
            if spent and spent[1]:
                # Includes the forwarder's idle wake-ups and, under busy polling, its spinning.
                records[-1]["forwarder_cpu_us_per_flow"] = round(spent[0] / spent[1] * 1e6, 1)
    by_key = {(r["path"], r["services"], r["mode"]): r for r in records}
    for record in records:
        for (reference_path, reference_size, name), compared in REFERENCES.items():
            if record["path"] not in compared:
                continue
            reference_size = record["services"] if reference_size == "same" else reference_size
            reference = by_key.get((reference_path, reference_size, record["mode"]))
            if not reference or not reference["latency_us"] or not record["latency_us"]:
                continue
            key = _key(record)
            ref_key = reference_path if reference_size is None else f"{reference_path}/{reference_size}"
            mine, theirs = per_round[(key, record["mode"])], per_round[(ref_key, record["mode"])]
            rounds_p50 = stats.spread(stats.paired_ratios(mine["p50"], theirs["p50"]))
            rounds_p99 = stats.spread(stats.paired_ratios(mine["p99"], theirs["p99"]))
            record[name] = {
                # The figure quoted: the median over rounds of this round's value / the reference's same round.
                "p50": rounds_p50["median"] if rounds_p50 else None,
                "p99": rounds_p99["median"] if rounds_p99 else None,
                "rounds_p50": rounds_p50, "rounds_p99": rounds_p99,
                # The same from all samples pooled, for comparison.
                "pooled_p50": record["latency_us"]["p50"] / reference["latency_us"]["p50"],
                "pooled_p99": record["latency_us"]["p99"] / reference["latency_us"]["p99"],
                "pooled_p99.9": record["latency_us"]["p99.9"] / reference["latency_us"]["p99.9"],
            }
    return records


def _key(record: dict) -> str:
    return record["path"] if record["services"] is None else f"{record['path']}/{record['services']}"


def setup_records(targets: list[Target]) -> list[dict]:
    return [{"path": t.path, "services": t.services, **t.setup} for t in targets]


