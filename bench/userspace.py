"""python -m bench.userspace [--quick]: userspace mode against kernel mode, in one run (needs root).

Measures, in a lab of namespaces (client -> node running `dataplane run` -> 3 Pods):
1. the first packet of a new flow: TCP connect time and the round trip of a
   UDP datagram on a new socket, through a ClusterIP, kernel vs userspace
   mode, in alternating rounds so that drift hits both alike;
2. packets of established flows: request/response on one TCP connection and
   one UDP socket, both modes (they never reach userspace);
3. forwarder capacity: UDP flows, each from a new source address and port,
   sent with sendmmsg on a raw socket (bench/flood.c, compiled with gcc; a
   Python sender without it) at rising rates for a few seconds each; a rate is held when
   every flow was decided (queued = sent) with no fail-open and no queue drop;
4. Maglev: building the 65,537-slot table for 1,000 endpoints.

Results go to bench/out/userspace.json and .md; the command line is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataplane.lab import Daemon, Lab, ManifestDir, http_get
from dataplane.lab.manifests import endpoint_slice, port, service
from dataplane.lb import maglev

CLUSTER_IP = "10.96.0.10"
FLOOD_PORT = 9  # a UDP Service port with endpoints but no listener: Pods answer with an ICMP error

FLOOD = r"""
import socket, struct, sys, time
rate, seconds, dst, dport, base = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
daddr = socket.inet_aton(dst)
pack = struct.Struct("!BBHHHBBH4s4sHHHH").pack
sent, start = 0, time.monotonic()
while True:
    now = time.monotonic() - start
    if now >= seconds:
        break
    due = min(int(now * rate) + 64, int(seconds * rate))
    while sent < due:
        n = base + sent
        # A new flow each: source port, and every 64,000 flows the source address, vary.
        src = bytes((192, 168, 50, 10 + n // 64000 % 200))
        s.sendto(pack(0x45, 0, 28, n & 0xFFFF, 0, 64, 17, 0, src, daddr, 1024 + n % 64000, dport, 8, 0), (dst, 0))
        sent += 1
    if sent >= int((time.monotonic() - start) * rate):
        time.sleep(0.0002)
print(sent, time.monotonic() - start)
"""


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_us": round(statistics.median(values) * 1e6, 1),
            "p99_us": round(percentile(values, 0.99) * 1e6, 1), "mean_us": round(statistics.fmean(values) * 1e6, 1)}


def tcp_connects(ns, count: int) -> list[float]:
    times = []
    for _ in range(count):
        sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST on close: no TIME_WAIT pile
        started = time.perf_counter()
        sock.connect((CLUSTER_IP, 80))
        times.append(time.perf_counter() - started)
        sock.close()
    return times


def udp_first_packets(ns, count: int) -> list[float]:
    times = []
    for _ in range(count):
        sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(2)
        sock.connect((CLUSTER_IP, 53))
        started = time.perf_counter()
        sock.send(b"x")
        sock.recv(512)
        times.append(time.perf_counter() - started)
        sock.close()
    return times


def tcp_round_trips(ns, count: int) -> list[float]:
    sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect((CLUSTER_IP, 80))
    times = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(b"x\n")
        buffer = b""
        while not buffer.endswith(b"\n"):
            buffer += sock.recv(512)
        times.append(time.perf_counter() - started)
    sock.close()
    return times


def udp_round_trips(ns, count: int) -> list[float]:
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    sock.connect((CLUSTER_IP, 53))
    times = []
    for _ in range(count):
        started = time.perf_counter()
        sock.send(b"x")
        sock.recv(512)
        times.append(time.perf_counter() - started)
    sock.close()
    return times


def status(lab: Lab) -> dict:
    return json.loads(http_get(lab.node, "127.0.0.1", 10249, "/status")[1])


def compile_flood() -> str | None:
    """bench/flood.c built into a temporary directory (sendmmsg: far above Python's rate), or None without gcc."""
    target = Path(tempfile.mkdtemp(prefix="bench-flood-")) / "flood"
    done = subprocess.run(["gcc", "-O2", "-o", str(target), str(Path(__file__).with_name("flood.c"))],
                          capture_output=True, text=True)
    return str(target) if done.returncode == 0 else None


FLOOD_BINARY: str | None = None


def flood(lab: Lab, rate: int, seconds: float, base: int) -> tuple[int, float]:
    args = (str(rate), str(seconds), CLUSTER_IP, str(FLOOD_PORT), str(base))
    if FLOOD_BINARY:
        child = lab.client.popen(FLOOD_BINARY, *args, stdout=subprocess.PIPE, text=True)
    else:
        child = lab.client.python("-c", FLOOD, *args, stdout=subprocess.PIPE, text=True)
    sent, took = child.communicate(timeout=seconds + 60)[0].split()
    return int(sent), float(took)


def capacity(lab: Lab, rates: list[int], seconds: float, progress) -> list[dict]:
    results, base = [], 0
    for rate in rates:
        lab.node.run("conntrack", "-D", "-p", "udp", "--dport", str(FLOOD_PORT), check=False)
        before = status(lab)
        sent, took = flood(lab, rate, seconds, base)
        base += sent
        time.sleep(1.5)  # workers (--queues > 1) report once a second
        after = status(lab)
        queued = after["packets_queued"] - before["packets_queued"]
        fail_open = after["fail_open"] - before["fail_open"]
        held = fail_open == 0 and queued >= sent
        results.append({"target_rate": rate, "sent": sent, "achieved_rate": round(sent / took),
                        "decided": queued, "fail_open": fail_open, "held": held})
        progress(f"  {rate}/s target: sent {sent} at {sent / took:,.0f}/s, decided {queued}, fail-open {fail_open}"
                 f" -> {'held' if held else 'NOT held'}")
    lab.node.run("conntrack", "-D", "-p", "udp", "--dport", str(FLOOD_PORT), check=False)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.userspace")
    parser.add_argument("--quick", action="store_true", help="fewer samples: a smoke test")
    parser.add_argument("--rounds", type=int, default=None, help="alternating kernel/userspace rounds")
    parser.add_argument("--rates", default=None, help="flood rates to try, new flows/s, comma-separated")
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--only", choices=("latency", "capacity"), default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.userspace: needs root (it builds network namespaces)", file=sys.stderr)
        return 3
    rounds = args.rounds or (2 if args.quick else 6)
    per_round = {"connect": 300 if args.quick else 1000, "udp_first": 300 if args.quick else 1000,
                 "tcp_rr": 1000 if args.quick else 5000, "udp_rr": 1000 if args.quick else 5000}
    rates = [int(r) for r in (args.rates or ("20000,50000" if args.quick else
                                             "20000,40000,50000,60000,70000,80000,100000,120000")).split(",")]
    started = time.monotonic()
    global FLOOD_BINARY
    FLOOD_BINARY = compile_flood()
    results_generator = "bench/flood.c (sendmmsg)" if FLOOD_BINARY else "Python raw socket"

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    samples = {mode: {k: [] for k in per_round} for mode in ("kernel", "userspace")}
    results: dict = {"command": " ".join(["python -m bench.userspace", *(sys.argv[1:] if argv is None else argv)]),
                     "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "queues": args.queues,
                     "generator": results_generator, "loadavg_start": open("/proc/loadavg").read().split()[:3]}
    with Lab.build() as lab:
        lab.start_echo(tcp=[80], udp=[80])
        manifests = ManifestDir(Path(f"/tmp/bench-userspace-{os.getpid()}"))
        manifests.write("web.yaml", [
            service("web", CLUSTER_IP, [port("http", 80), port("dns", 53, 80, "UDP"),
                                        port("flood", FLOOD_PORT, FLOOD_PORT, "UDP")]),
            endpoint_slice("web", [p.ip for p in lab.pods], [("http", 80, "TCP"), ("dns", 80, "UDP"),
                                                             ("flood", FLOOD_PORT, "UDP")]),
        ])
        log = Path(args.out) / "userspace-daemon.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        for round_ in range(rounds if args.only != "capacity" else 0):
            for mode in ("kernel", "userspace") if round_ % 2 == 0 else ("userspace", "kernel"):
                extra = ["--proxy-mode", mode, "--queues", str(args.queues)]
                with Daemon.for_source(lab.node, manifests.path, log, extra=extra):
                    time.sleep(0.3)
                    tcp_connects(lab.client, 50)  # warm up both paths (ARP, caches)
                    samples[mode]["connect"] += tcp_connects(lab.client, per_round["connect"])
                    samples[mode]["udp_first"] += udp_first_packets(lab.client, per_round["udp_first"])
                    samples[mode]["tcp_rr"] += tcp_round_trips(lab.client, per_round["tcp_rr"])
                    samples[mode]["udp_rr"] += udp_round_trips(lab.client, per_round["udp_rr"])
                lab.node.run("conntrack", "-F", check=False)
                progress(f"round {round_ + 1}/{rounds} {mode}: connect p50 "
                         f"{statistics.median(samples[mode]['connect']) * 1e6:.0f} us")
        if args.only != "capacity":
            results["latency"] = {mode: {k: summary(v) for k, v in kinds.items()} for mode, kinds in samples.items()}
            results["ratio_p50"] = {k: round(results["latency"]["userspace"][k]["p50_us"]
                                             / results["latency"]["kernel"][k]["p50_us"], 3) for k in per_round}
        with Daemon.for_source(lab.node, manifests.path, log,
                               extra=["--proxy-mode", "userspace", "--queues", str(args.queues)]):
            time.sleep(0.3)
            progress("forwarder capacity")
            results["capacity"] = [] if args.only == "latency" else capacity(lab, rates, 2.0 if args.quick else 3.0,
                                                                              progress)
        held = [r["achieved_rate"] for r in results["capacity"] if r["held"]]
        results["max_rate_held"] = max(held) if held else 0
        manifests.remove("web.yaml")
    names = [f"10.{i // 250}.{i % 250}.1:80" for i in range(1000)]
    builds = []
    for _ in range(5):
        t = time.perf_counter()
        maglev.build(names)
        builds.append(time.perf_counter() - t)
    results["maglev_1000_build_ms"] = round(statistics.median(builds) * 1000, 1)
    out = Path(args.out)
    (out / "userspace.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "userspace.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    lat = r.get("latency")
    names = {"connect": "TCP connect (new flow)", "udp_first": "UDP first packet round trip (new flow)",
             "tcp_rr": "TCP round trip, established", "udp_rr": "UDP round trip, established"}
    lines = [f"Command: `{r['command']}` ({r['date']}, {r['cpus']} CPUs, {r['queues']} queue(s))", "",
             "| path | kernel p50 (us) | kernel p99 | userspace p50 (us) | userspace p99 | p50 ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, name in names.items() if lat else ():
        k, u = lat["kernel"][key], lat["userspace"][key]
        lines.append(f"| {name} | {k['p50_us']} | {k['p99_us']} | {u['p50_us']} | {u['p99_us']} | "
                     f"{r['ratio_p50'][key]}x |")
    lines += ["", f"Flood generator: {r['generator']}, in the client namespace on the same 2 cores; "
              f"load average at start {' '.join(r['loadavg_start'])}.", "", "| new flows/s (target) | achieved | decided | fail-open | held |", "|---:|---:|---:|---:|---|"]
    for c in r["capacity"]:
        lines.append(f"| {c['target_rate']} | {c['achieved_rate']} | {c['decided']} | {c['fail_open']} | "
                     f"{'yes' if c['held'] else 'no'} |")
    lines += ["", f"Highest rate held (every flow decided, no fail-open): {r['max_rate_held']} new flows/s",
              f"Maglev table (65,537 slots, 1,000 endpoints): {r['maglev_1000_build_ms']} ms"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
