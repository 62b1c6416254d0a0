"""python -m bench.userspace [--quick]: userspace mode against kernel mode, in one run (needs root).

Measures, in a lab of namespaces (client -> node running `dataplane run` -> 3 Pods):
1. the first packet of a new flow: TCP connect time and the round trip of a
   UDP datagram on a new socket, through a ClusterIP, kernel vs userspace
   mode, in alternating rounds so that drift hits both alike;
2. packets of established flows: request/response on one TCP connection and
   one UDP socket, both modes (they never reach userspace);
3. forwarder capacity: UDP flows, each from a new source address and port,
   sent with sendmmsg on a raw socket (bench/flood.c, compiled with gcc; a
   Python sender without it), one sender pinned to each CPU (fanout puts a
   packet on the queue of the CPU it was sent from, so every queue gets its
   share), at rising rates for a few seconds each. In userspace mode a rate
   is held when every flow was decided (queued = sent) with no fail-open; the
   forwarders' CPU time per decided flow is reported. The same floods go
   through kernel mode, counted on the Pods' veths, for its rate;
4. Maglev: building the 65,537-slot table for 1,000 endpoints;
5. where a decided packet's microseconds go in Python (`stages`): decoding
   the netlink message, parsing the headers, the balancer's decision (parse
   included), encoding the verdict, per packet in batches of 1 and 256,
   on the same bytes the kernel sends (no socket: the syscalls and the
   wake-up are what the lab figures add to these).

Results go to bench/out/userspace.json and .md; the command line is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
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
    """One sender per CPU, pinned, each at rate / CPUs, from disjoint flow numbers; returns (sent, seconds)."""
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, rate // len(cpus))
    children = []
    for i, cpu in enumerate(cpus):
        args = (str(share), str(seconds), CLUSTER_IP, str(FLOOD_PORT), str(base + i * 10_000_000))
        command = (FLOOD_BINARY, *args) if FLOOD_BINARY else (sys.executable, "-c", FLOOD, *args)
        children.append(lab.client.popen("taskset", "-c", str(cpu), *command, stdout=subprocess.PIPE, text=True))
    sent, took = 0, 0.0
    for child in children:
        count, elapsed = child.communicate(timeout=seconds + 60)[0].split()
        sent, took = sent + int(count), max(took, float(elapsed))
    return sent, took


def forwarded(lab: Lab) -> int:
    """Packets the node sent to the Pods so far (their veths' tx counters)."""
    links = json.loads(lab.node.run("ip", "-j", "-s", "link", "show").stdout)
    veths = {pod.veth for pod in lab.pods}
    return sum(link["stats64"]["tx"]["packets"] for link in links if link["ifname"] in veths)


def capacity(lab: Lab, rates: list[int], seconds: float, progress, mode: str = "userspace") -> list[dict]:
    results, base = [], 0
    for rate in rates:
        lab.node.run("conntrack", "-D", "-p", "udp", "--dport", str(FLOOD_PORT), check=False)
        before = status(lab) if mode == "userspace" else None
        through = forwarded(lab)
        sent, took = flood(lab, rate, seconds, base)
        base += sent
        time.sleep(0.3)
        through = forwarded(lab) - through
        row = {"target_rate": rate, "sent": sent, "achieved_rate": round(sent / took), "forwarded": through}
        if mode == "userspace":
            after = status(lab)
            queued = after["packets_queued"] - before["packets_queued"]
            fail_open = after["fail_open"] - before["fail_open"]
            cpu = (after.get("forwarder_cpu_seconds") or 0) - (before.get("forwarder_cpu_seconds") or 0)
            user = (after.get("forwarder_cpu_user_seconds") or 0) - (before.get("forwarder_cpu_user_seconds") or 0)
            row.update(decided=queued, fail_open=fail_open, held=fail_open == 0 and queued >= sent,
                       forwarder_cpu_us_per_flow=round(cpu / queued * 1e6, 2) if queued else None,
                       forwarder_user_us_per_flow=round(user / queued * 1e6, 2) if queued else None)
            progress(f"  userspace {rate}/s target: sent {sent} at {sent / took:,.0f}/s, decided {queued}, "
                     f"fail-open {fail_open}, forwarder CPU {row['forwarder_cpu_us_per_flow']} us/flow "
                     f"({row['forwarder_user_us_per_flow']} in userspace) -> {'held' if row['held'] else 'NOT held'}")
        else:
            row.update(held=through >= sent)
            progress(f"  kernel {rate}/s target: sent {sent} at {sent / took:,.0f}/s, reached the Pods {through} "
                     f"-> {'held' if row['held'] else 'NOT held'}")
        results.append(row)
    lab.node.run("conntrack", "-D", "-p", "udp", "--dport", str(FLOOD_PORT), check=False)
    return results


def stages(repeat: int = 2000) -> dict:
    """Per-packet Python cost of each step of a decision, in µs (best of 5), for batches of 1 and 256."""
    from dataplane.lb.balancer import Balancer, ServicesChanged
    from dataplane.lb.policy import PortTable, Target, packed
    from dataplane.packet import parse
    from dataplane.queue import nfqueue
    from dataplane.netlink import codec

    def message(packet_id: int) -> bytes:
        # What nfnetlink_queue sends for a forwarded packet: header, indev, mark, hwaddr, then 28 bytes copied.
        ip = struct.pack("!BBHHHBBH4s4sHHHH", 0x45, 0, 28, 1, 0, 64, 17, 0, socket.inet_aton("192.168.50.2"),
                         socket.inet_aton(CLUSTER_IP), 40000 + packet_id % 20000, FLOOD_PORT, 8, 0)
        attrs = [(nfqueue.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 0)), (5, b"\0\0\0\2"),
                 (nfqueue.NFQA_MARK, struct.pack("!I", 0x2000)), (9, bytes(12)), (nfqueue.NFQA_PAYLOAD, ip)]
        return codec.request(codec.message_type(nfqueue.NFNL_SUBSYS_QUEUE, nfqueue.NFQNL_MSG_PACKET), 0, 0,
                             socket.AF_INET, 0, attrs)

    balancer = Balancer()
    targets = tuple(Target(i + 1, f"10.244.1.{11 + i}", FLOOD_PORT) for i in range(3))
    balancer.handle(ServicesChanged({"web": (PortTable("default/web:flood", 17, (packed(CLUSTER_IP),), FLOOD_PORT,
                                                       None, targets, "random", None),)}, 0.0))
    out = {}
    for batch in (1, 256):
        data = [message(i) for i in range(batch)]
        packets: list = []
        for d in data:
            nfqueue.decode_packets(d, packets)
        verdicts = balancer.decide(packets)
        steps = {
            "decode": lambda: [nfqueue.decode_packets(d, []) for d in data],
            "parse": lambda: [parse(p.payload) for p in packets],
            "decide (parse included)": lambda: balancer.decide(packets),
            "encode verdicts": lambda: nfqueue.encode_verdicts(verdicts),
        }
        loops = max(1, repeat // batch) * 10
        row = {}
        for name, step in steps.items():
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(loops):
                    step()
                best = min(best, (time.perf_counter() - started) / loops / batch)
            row[name] = round(best * 1e6, 2)
        row["total"] = round(row["decode"] + row["decide (parse included)"] + row["encode verdicts"], 2)
        row.update(_loops_over_a_socketpair(data, balancer, loops, batch))
        out[f"batch of {batch}"] = row
    return out


def measure_capacity(rates: list[int], seconds: float, progress) -> dict:
    """The capacity floods alone, userspace then kernel mode, in a lab of their own (python -m bench's full run)."""
    global FLOOD_BINARY
    FLOOD_BINARY = compile_flood()
    with Lab.build() as lab:
        lab.start_echo(tcp=[80], udp=[80])
        manifests = ManifestDir(Path(f"/tmp/bench-capacity-{os.getpid()}"))
        manifests.write("web.yaml", [
            service("web", CLUSTER_IP, [port("flood", FLOOD_PORT, FLOOD_PORT, "UDP")]),
            endpoint_slice("web", [p.ip for p in lab.pods], [("flood", FLOOD_PORT, "UDP")]),
        ])
        log = Path(tempfile.mkdtemp(prefix="bench-capacity-")) / "daemon.log"
        found = {"generator": "bench/flood.c (sendmmsg)" if FLOOD_BINARY else "Python raw socket"}
        try:
            with Daemon.for_source(lab.node, manifests.path, log, extra=["--proxy-mode", "userspace"]):
                time.sleep(0.3)
                found["queues_used"] = status(lab)["queues"]
                found["capacity"] = capacity(lab, rates, seconds, progress)
            with Daemon.for_source(lab.node, manifests.path, log, extra=["--proxy-mode", "kernel"]):
                time.sleep(0.3)
                found["kernel_capacity"] = capacity(lab, rates, seconds, progress, mode="kernel")
        finally:
            manifests.remove("web.yaml")
    held = [r["achieved_rate"] for r in found["capacity"] if r["held"]]
    kernel_held = [r["achieved_rate"] for r in found["kernel_capacity"] if r["held"]]
    found["max_rate_held"] = max(held) if held else 0
    found["kernel_max_rate_held"] = max(kernel_held) if kernel_held else 0
    # What the flood itself reached: the bound when kernel mode holds no more either.
    found["max_rate_sent"] = max(r["achieved_rate"] for r in found["capacity"] + found["kernel_capacity"])
    return found


def _loops_over_a_socketpair(data: list[bytes], balancer, loops: int, batch: int) -> dict:
    """Per packet, µs (best of 5): the whole read-decide-answer loop, Python and compiled, syscalls included.

    An AF_UNIX socketpair stands in for netlink: the same datagrams in, the
    verdicts out and read back; no wake-up (the datagrams wait already).
    """
    from dataplane.marks import KEEP_MASK
    from dataplane.queue import nfqueue, picks
    from dataplane.netlink import codec

    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for seq in range(1, 5):
        kernel.send(struct.pack("=IHHIIi", 36, codec.NLMSG_ERROR, 0, seq, 0, 0) + bytes(16))
    queue = nfqueue.QueueSocket([0], sock=ours, rcvbuf=1 << 20)
    for _ in range(4):
        kernel.recv(4096)
    kernel.setblocking(False)

    def drain() -> None:
        try:
            while True:
                kernel.recv(65536)
        except BlockingIOError:
            pass

    def python_loop() -> None:
        packets: list = []
        queue.read(packets, batch)
        queue.send(balancer.decide(packets))

    holder = [picks.build(balancer)]
    loops_ = {"loop, Python (read, decide, send)": python_loop}
    if nfqueue.compiled is not None:
        loops_["loop, compiled (read, decide, send)"] = lambda: queue.serve(holder, KEEP_MASK, batch)
    row = {}
    for name, step in loops_.items():
        best = float("inf")
        for _ in range(5):
            spent = 0.0
            for _ in range(max(1, loops // 10)):
                for d in data:
                    kernel.send(d)
                started = time.perf_counter()
                step()
                spent += time.perf_counter() - started
                drain()
            best = min(best, spent / max(1, loops // 10) / batch)
        row[name] = round(best * 1e6, 2)
    queue.sock.close()
    kernel.close()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.userspace")
    parser.add_argument("--quick", action="store_true", help="fewer samples: a smoke test")
    parser.add_argument("--rounds", type=int, default=None, help="alternating kernel/userspace rounds")
    parser.add_argument("--rates", default=None, help="flood rates to try, new flows/s, comma-separated")
    parser.add_argument("--queues", type=int, default=0, help="dataplane run --queues (default: its own default)")
    parser.add_argument("--busy-poll", type=int, default=0, help="dataplane run --busy-poll, microseconds")
    parser.add_argument("--only", choices=("latency", "capacity", "stages"), default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.userspace: needs root (it builds network namespaces)", file=sys.stderr)
        return 3
    rounds = args.rounds or (2 if args.quick else 6)
    per_round = {"connect": 300 if args.quick else 1000, "udp_first": 300 if args.quick else 1000,
                 "tcp_rr": 1000 if args.quick else 5000, "udp_rr": 1000 if args.quick else 5000}
    rates = [int(r) for r in (args.rates or ("20000,50000" if args.quick else
                                             "50000,100000,150000,200000,250000,300000")).split(",")]
    queue_flags = (["--queues", str(args.queues)] if args.queues else []) + (
        ["--busy-poll", str(args.busy_poll)] if args.busy_poll else [])
    started = time.monotonic()
    global FLOOD_BINARY
    FLOOD_BINARY = compile_flood()
    results_generator = "bench/flood.c (sendmmsg)" if FLOOD_BINARY else "Python raw socket"

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    if args.only == "stages":
        found = stages()
        print(json.dumps(found, indent=1))
        return 0
    samples = {mode: {k: [] for k in per_round} for mode in ("kernel", "userspace")}
    results: dict = {"command": " ".join(["python -m bench.userspace", *(sys.argv[1:] if argv is None else argv)]),
                     "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "queues": args.queues or "default",
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
                extra = ["--proxy-mode", mode, *queue_flags]
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
        seconds = 2.0 if args.quick else 3.0
        results["capacity"], results["kernel_capacity"] = [], []
        if args.only != "latency":
            with Daemon.for_source(lab.node, manifests.path, log, extra=["--proxy-mode", "userspace", *queue_flags]):
                time.sleep(0.3)
                progress("forwarder capacity")
                results["queues_used"] = status(lab)["queues"]
                results["capacity"] = capacity(lab, rates, seconds, progress)
            with Daemon.for_source(lab.node, manifests.path, log, extra=["--proxy-mode", "kernel"]):
                time.sleep(0.3)
                progress("kernel mode, the same floods")
                results["kernel_capacity"] = capacity(lab, rates, seconds, progress, mode="kernel")
        held = [r["achieved_rate"] for r in results["capacity"] if r["held"]]
        results["max_rate_held"] = max(held) if held else 0
        kernel_held = [r["achieved_rate"] for r in results["kernel_capacity"] if r["held"]]
        results["kernel_max_rate_held"] = max(kernel_held) if kernel_held else 0
        manifests.remove("web.yaml")
    names = [f"10.{i // 250}.{i % 250}.1:80" for i in range(1000)]
    builds = []
    for _ in range(5):
        t = time.perf_counter()
        maglev.build(names)
        builds.append(time.perf_counter() - t)
    results["maglev_1000_build_ms"] = round(statistics.median(builds) * 1000, 1)
    results["stages_us"] = stages()
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
    lines += ["", f"Flood generator: {r['generator']}, one sender pinned to each CPU in the client namespace "
              f"(the forwarders share those CPUs); queues {r.get('queues_used')}; load average at start "
              f"{' '.join(r['loadavg_start'])}.", "",
              "| new flows/s (target) | achieved | decided | fail-open | forwarder CPU µs/flow (user) | held | "
              "kernel mode: achieved | reached the Pods | held |", "|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    kernel = {c["target_rate"]: c for c in r.get("kernel_capacity", [])}
    for c in r["capacity"]:
        k = kernel.get(c["target_rate"], {})
        lines.append(f"| {c['target_rate']} | {c['achieved_rate']} | {c['decided']} | {c['fail_open']} | "
                     f"{c.get('forwarder_cpu_us_per_flow')} ({c.get('forwarder_user_us_per_flow')}) | "
                     f"{'yes' if c['held'] else 'no'} | "
                     f"{k.get('achieved_rate', '–')} | {k.get('forwarded', '–')} | "
                     f"{('yes' if k['held'] else 'no') if k else '–'} |")
    lines += ["", f"Highest rate held (every flow decided, no fail-open): {r['max_rate_held']} new flows/s; "
              f"kernel mode, the same floods: {r.get('kernel_max_rate_held')} new flows/s reached the Pods",
              f"Maglev table (65,537 slots, 1,000 endpoints): {r['maglev_1000_build_ms']} ms", "",
              "Python per packet, µs (no syscalls, no wake-up):", "",
              "| batch | decode | parse | decide (parse included) | encode verdicts | total | "
              "whole loop, Python (socketpair) | whole loop, compiled |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for batch, row in r.get("stages_us", {}).items():
        lines.append(f"| {batch} | {row['decode']} | {row['parse']} | {row['decide (parse included)']} | "
                     f"{row['encode verdicts']} | {row['total']} | {row.get('loop, Python (read, decide, send)', '–')} | "
                     f"{row.get('loop, compiled (read, decide, send)', '–')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
