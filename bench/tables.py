"""Balancing tables: what a change costs with many Maglev Services, and what a slot costs.

    sudo .venv/bin/python -m bench.tables [--services 1000] [--endpoints 10] [--size 1021] [--changes 20]

Runs itself again inside a fresh network namespace (`ip netns exec`, so this process never
changes namespace): loads `--services` Maglev Services of `--endpoints` endpoints and
`--size`-slot tables (in batches, as a daemon start would in several syncs), then times
`--changes` single changes, each one endpoint leaving one Service (and coming back next
time): render, plan and apply through libnftables in-process, as the daemon's incremental
syncs do, until the kernel has it ("to live"). Also reports the kernel slab grown per 1,000
slots while loading (/proc/meminfo `Slab:`, machine-wide: noisy on a shared machine) and the
daemon-side memory per slot (tracemalloc over the rendered rulesets).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import tracemalloc

NAMESPACE = f"dplab-{os.getpid()}-9999-tables-bench"


def _slab_kb() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    return 0


def _documents(index: int, endpoints: int, size: int, drop: int | None = None) -> list[dict]:
    from dataplane.lab.manifests import endpoint_slice, port, service

    name = f"svc-{index}"
    ip = f"10.96.{index // 250}.{index % 250 + 1}"
    svc = service(name, ip, [port("tcp", 80, 8080, "TCP")])
    svc["metadata"]["annotations"] = {"dataplane.io/lb-algorithm": "maglev", "dataplane.io/lb-table-size": str(size)}
    addresses = [f"10.{100 + index // 250}.{index % 250}.{e + 1}" for e in range(endpoints) if e != drop]
    return [svc, endpoint_slice(name, addresses, [("tcp", 8080, "TCP")], name=f"{name}-1")]


def inner(args: argparse.Namespace) -> dict:
    from dataplane.config import NodeSettings
    from dataplane.model import parse_objects
    from dataplane.nat import plan
    from dataplane.nat.nftables import Nftables
    from dataplane.nat.render import RulesetBuilder
    from dataplane.sync.store import Store

    settings = NodeSettings(cluster_cidrs=("10.244.0.0/16",), table_slots=1 << 24)
    nft = Nftables()
    store, builder, state = Store(), RulesetBuilder(settings), plan.Programmed()

    def publish(index: int, drop: int | None = None) -> None:
        objects, errors = parse_objects(_documents(index, args.endpoints, args.size, drop), f"svc-{index}.yaml")
        assert not errors, errors
        store.replace(f"svc-{index}.yaml", objects)

    phases: list[tuple[float, float, float]] = []

    held = []  # the last snapshot, alive as in the daemon (the builder renders only what changed since it)

    def sync() -> float:
        nonlocal state
        started = time.perf_counter()
        current = store.snapshot()
        ruleset = builder.build(current, ["192.168.50.1"])
        held[:] = [current]
        rendered = time.perf_counter()
        tx, change = state.plan(ruleset)
        planned = time.perf_counter()
        nft.apply(tx)
        state = state.commit(change)
        done = time.perf_counter()
        phases.append((rendered - started, planned - rendered, done - planned))
        return done - started

    tracemalloc.start()
    slab_before = _slab_kb()
    load_started = time.perf_counter()
    batch = 20
    for first in range(0, args.services, batch):
        for index in range(first, min(first + batch, args.services)):
            publish(index)
        sync()
    load_seconds = time.perf_counter() - load_started
    slots = args.services * args.size
    slab_grown = _slab_kb() - slab_before
    python_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()

    rng = random.Random(7)
    timings, dropped = [], {}
    phases.clear()
    for _ in range(args.changes):
        index = rng.randrange(args.services)
        if index in dropped:
            publish(index)
            del dropped[index]
        else:
            dropped[index] = rng.randrange(args.endpoints)
            publish(index, dropped[index])
        timings.append(sync() * 1000)
    timings.sort()
    return {
        "services": args.services, "endpoints": args.endpoints, "table_size": args.size, "slots": slots,
        "load_seconds": round(load_seconds, 2),
        "change_ms_median": round(statistics.median(timings), 2),
        "change_ms_p90": round(timings[int(0.9 * (len(timings) - 1))], 2),
        "change_ms_max": round(timings[-1], 2),
        "kernel_slab_kb_per_1000_slots": round(slab_grown * 1000 / slots, 1),
        "daemon_bytes_per_slot": round(python_bytes / slots),
        "nft_backend": nft.backend_name,
        "median_ms_render_plan_apply": [round(statistics.median(p[i] for p in phases) * 1000, 2) for i in range(3)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--size", type=int, default=1021)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        print(json.dumps(inner(args)))
        return 0
    subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
    try:
        subprocess.run(["ip", "-n", NAMESPACE, "link", "set", "lo", "up"], check=True)
        done = subprocess.run(["ip", "netns", "exec", NAMESPACE, sys.executable, "-m", "bench.tables", "--inner",
                               *(argv if argv is not None else sys.argv[1:])], capture_output=True, text=True)
        sys.stderr.write(done.stderr)
        if done.returncode:
            return done.returncode
        print(json.dumps(json.loads(done.stdout), indent=1))
        return 0
    finally:
        subprocess.run(["ip", "netns", "del", NAMESPACE], check=False)


if __name__ == "__main__":
    sys.exit(main())
