"""python -m bench.dns_bench [--services 10000] [--duration 10] [--quick]: cluster DNS cost.

No root needed: everything runs on 127.0.0.1 with high ports.

1. Zone (in process, uvloop): a full build of the records of N ClusterIP Services
   with 10 endpoints each (one in ten headless), one change applied incrementally
   (an endpoint of a headless Service moves; median of 100), and the event loop's
   longest stall while a full build runs: built in a worker thread, as the server
   does, and built on the loop, for contrast; each as the daemon runs now, and
   again with the long-lived heap frozen (gc.freeze), as `python -m dataplane.dns` does.
2. dnsperf against `python -m dataplane.dns` serving the same manifests on
   127.0.0.1: queries per second at saturation (dnsperf's default 100 queries in
   flight), then p50/p99 latency at half that rate, from dnsperf's per-query log (-v).
   Mixes: `hot` repeats 100 names (the answer cache serves them); `spread` asks
   A, SRV and PTR for every Service plus 10% missing names, more distinct
   queries than the cache holds, so nearly every answer is built afresh.

Results: bench/out/dns.json and dns.md, and printed with the commands that made them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import uvloop

from dataplane.dns.server import DnsServer
from dataplane.dns.zone import Zone
from dataplane.sync.manifests import ManifestSource
from dataplane.sync.store import Store

from .manifests import cluster_ip, service_yaml, write_cluster

OUT = Path(__file__).parent / "out"
PORT = 15353
_QPS = re.compile(r"Queries per second:\s+([\d.]+)")
_LOST = re.compile(r"Queries lost:\s+(\d+)")
_VERBOSE = re.compile(r"^> (\S+) \S+ \S+ ([\d.]+)$", re.M)


def write_manifests(directory: Path, services: int) -> None:
    """N Services x 10 endpoints in namespace `bench`; every tenth one headless."""
    write_cluster(directory, services, 10)
    for i in range(0, services, 10):
        path = directory / f"svc-{i}.yaml"
        path.write_text(path.read_text().replace(f"clusterIP: {cluster_ip(i)}", "clusterIP: None"))


def load(directory: Path) -> tuple[Store, ManifestSource]:
    store = Store()
    source = ManifestSource(directory, store)
    source.load_all()
    return store, source


# Part 1: the zone.

def measure_zone(directory: Path, services: int, changes: int) -> dict:
    store, source = load(directory)
    snapshot = store.snapshot()
    builds = []
    for _ in range(3):
        gc.collect()
        began = time.perf_counter()
        zone = Zone.build(snapshot)
        builds.append(time.perf_counter() - began)
    tracemalloc.start()
    measured = Zone.build(snapshot)
    memory, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del measured
    updates = []
    rng = random.Random(1)
    generations: dict[int, int] = {}
    for _ in range(changes):
        # A headless Service's endpoint moves: its A, PTR and SRV records change (a ClusterIP
        # Service's endpoints do not touch DNS at all).
        i = rng.randrange(0, services, 10)
        generations[i] = generations.get(i, 0) + 1
        path = directory / f"svc-{i}.yaml"
        path.write_text(service_yaml(i, 10, generations[i]).replace(f"clusterIP: {cluster_ip(i)}", "clusterIP: None"))
        source.load(path)
        snapshot = store.snapshot()
        began = time.perf_counter()
        changed = zone.update(snapshot)
        updates.append(time.perf_counter() - began)
        assert changed == 1, changed
    stalls = uvloop.run(_stalls(snapshot))
    gc.collect()
    gc.freeze()  # as `python -m dataplane.dns` does once loaded: long-lived objects out of the GC's walks
    stalls.update({f"{key}_gc_frozen": value for key, value in uvloop.run(_stalls(snapshot)).items()})
    gc.unfreeze()
    return {
        "services": services,
        "records": len(zone.records()),
        "full_build_ms": round(statistics.median(builds) * 1000, 1),
        "zone_memory_mb": round(memory / 1e6, 1),
        "one_change_ms_median": round(statistics.median(updates) * 1000, 3),
        "one_change_ms_max": round(max(updates) * 1000, 3),
        **stalls,
    }


async def _stalls(snapshot) -> dict:
    """The longest event-loop stall while a full zone is built off the loop, then on it."""
    result = {}
    for where in ("thread", "loop"):
        server = DnsServer("127.0.0.1:0", upstreams=[])
        await server.start()
        stall = 0.0
        done = asyncio.Event()

        async def tick() -> None:
            nonlocal stall
            while not done.is_set():
                began = time.perf_counter()
                await asyncio.sleep(0.001)
                stall = max(stall, time.perf_counter() - began - 0.001)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        began = time.perf_counter()
        if where == "thread":
            server.publish(snapshot)  # the first snapshot of a large cluster: built in a worker thread
            await server.applied()
        else:
            server.zone = Zone.build(snapshot)
        elapsed = time.perf_counter() - began
        done.set()
        await ticker
        await server.close()
        result[f"build_{where}_ms"] = round(elapsed * 1000, 1)
        result[f"loop_stall_{where}_ms"] = round(stall * 1000, 1)
    return result


# Part 2: dnsperf.

def query_files(directory: Path, services: int) -> dict[str, Path]:
    rng = random.Random(2)
    hot = [f"svc-{i}.bench.svc.cluster.local A" for i in rng.sample(range(services), min(100, services))]
    spread = []
    for i in range(services):
        spread.append(f"svc-{i}.bench.svc.cluster.local A")
        spread.append(f"_http._tcp.svc-{i}.bench.svc.cluster.local SRV")
        if i % 10:
            ip = cluster_ip(i).split(".")
            spread.append(f"{'.'.join(reversed(ip))}.in-addr.arpa PTR")
        if i % 10 == 0:
            spread.append(f"missing-{i}.bench.svc.cluster.local A")
    rng.shuffle(spread)
    files = {}
    for name, lines in (("hot", hot), ("spread", spread)):
        path = directory / f"queries-{name}.txt"
        path.write_text("\n".join(lines) + "\n")
        files[name] = path
    return files


def dnsperf(queries: Path, duration: float, rate: int | None = None, mode: str = "udp") -> dict:
    argv = ["dnsperf", "-s", "127.0.0.1", "-p", str(PORT), "-m", mode, "-d", str(queries), "-l", str(duration),
            "-c", "4", "-T", "1"]
    if rate:
        argv += ["-Q", str(rate), "-v"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    result = {
        "command": " ".join(argv[:-1] if rate else argv),
        "qps": round(float(_QPS.search(done.stdout).group(1))),
        "lost": int(_LOST.search(done.stdout).group(1)),
    }
    if rate:
        latencies = sorted(float(m.group(2)) for m in _VERBOSE.finditer(done.stdout))
        codes = {}
        for m in _VERBOSE.finditer(done.stdout):
            codes[m.group(1)] = codes.get(m.group(1), 0) + 1
        result.update(
            p50_ms=round(latencies[len(latencies) // 2] * 1000, 3),
            p99_ms=round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
            max_ms=round(latencies[-1] * 1000, 3),
            rcodes=codes,
        )
    return result


def measure_dnsperf(directory: Path, services: int, duration: float) -> dict:
    if shutil.which("dnsperf") is None:
        raise SystemExit("dnsperf is not installed (apt-get install dnsperf)")
    files = query_files(directory.parent, services)
    server = subprocess.Popen(
        [sys.executable, "-m", "dataplane.dns", "--source", str(directory), "--bind", f"127.0.0.1:{PORT}",
         "--upstream", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        began = time.perf_counter()
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("python -m dataplane.dns did not start")
        ready = time.perf_counter() - began
        runs = {}
        for mix, path in files.items():
            saturated = dnsperf(path, duration)
            paced = dnsperf(path, duration, rate=max(1000, saturated["qps"] // 2))
            runs[mix] = {"saturated": saturated, "half_rate": paced}
        runs["spread_tcp"] = {"saturated": dnsperf(files["spread"], duration, mode="tcp")}
        rss = _rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    return {"server_ready_s": round(ready, 2), "server_rss_mb": rss, "runs": runs}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def markdown(results: dict) -> str:
    zone, perf = results["zone"], results["dnsperf"]
    lines = [
        f"Command: `{results['command']}` ({results['date']}, {results['machine']['cpus']} CPUs, "
        f"Python {results['machine']['python']})",
        "",
        f"Zone, {zone['services']} Services ({zone['records']} records): full build {zone['full_build_ms']} ms, "
        f"{zone['zone_memory_mb']} MB; one change {zone['one_change_ms_median']} ms median "
        f"(max {zone['one_change_ms_max']} ms); longest event-loop stall during a full build: "
        f"{zone['loop_stall_thread_ms']} ms off the loop (build {zone['build_thread_ms']} ms) vs "
        f"{zone['loop_stall_loop_ms']} ms on it; with the long-lived heap frozen (gc.freeze) "
        f"{zone['loop_stall_thread_ms_gc_frozen']} ms off the loop vs {zone['loop_stall_loop_ms_gc_frozen']} ms on it.",
        "",
        f"Server: ready in {perf['server_ready_s']} s (reads the manifests, builds the zone), "
        f"RSS {perf['server_rss_mb']} MB.",
        "",
        "| mix | transport | saturated qps | paced at | p50 (ms) | p99 (ms) | max (ms) | lost |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mix, run in perf["runs"].items():
        saturated, paced = run["saturated"], run.get("half_rate")
        transport = "tcp" if mix.endswith("_tcp") else "udp"
        if paced:
            lines.append(f"| {mix} | {transport} | {saturated['qps']} | {paced['qps']} qps | {paced['p50_ms']} | "
                         f"{paced['p99_ms']} | {paced['max_ms']} | {saturated['lost'] + paced['lost']} |")
        else:
            lines.append(f"| {mix.removesuffix('_tcp')} | {transport} | {saturated['qps']} | | | | | "
                         f"{saturated['lost']} |")
    lines += ["", "dnsperf commands:"]
    for run in perf["runs"].values():
        for measured in run.values():
            lines.append(f"- `{measured['command']}`")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dns_bench")
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per dnsperf run")
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="1,000 Services, 3 s runs: a smoke test")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    if args.quick:
        args.services, args.duration, args.changes = 1000, 3.0, 20
    with tempfile.TemporaryDirectory(prefix="dns-bench-") as temp:
        directory = Path(temp) / "manifests"
        write_manifests(directory, args.services)
        print(f"zone: {args.services} Services", flush=True)
        zone = measure_zone(directory, args.services, args.changes)
        print(json.dumps(zone), flush=True)
        print("dnsperf ...", flush=True)
        perf = measure_dnsperf(directory, args.services, args.duration)
    results = {
        "command": " ".join(["python -m bench.dns_bench", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "zone": zone,
        "dnsperf": perf,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dns.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "dns.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
