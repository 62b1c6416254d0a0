"""Balancing tables: what a change costs with many Maglev Services, what a slot costs, and how many
flows move when an endpoint leaves.

    sudo .venv/bin/python -m bench.tables [--services 1000] [--endpoints 10] [--size 1021] [--changes 20]
    sudo .venv/bin/python -m bench.tables --moved 2,5,10,30 [--sources 128] [--ports 128] [--leaving 3]
    sudo .venv/bin/python -m bench.tables --pick-cost [--flows 1000] [--rounds 20]

Runs itself again inside a fresh network namespace (`ip netns exec`, so this process never
changes namespace). By default: loads `--services` Maglev Services of `--endpoints` endpoints and
`--size`-slot tables, an explicit size (in batches, as a daemon start would in several syncs), then
times `--changes` single changes, each one endpoint leaving one Service (and coming back next
time): render, plan and apply in-process through the daemon's applier (nat/nftables.Nftables:
netlink, or libnftables), as its incremental syncs do, until the kernel has it ("to live"). Also reports the kernel slab grown per 1,000
slots while loading (/proc/meminfo `Slab:`, machine-wide: noisy on a shared machine) and the
daemon-side memory per slot (tracemalloc over the rendered rulesets).

`--moved N,...`: for each N, one Maglev Service of N endpoints at the default table size for N
(lb/tables.default_table_size), and real UDP flows from `--sources` addresses x `--ports` source
ports, sent from the namespace itself (the output hook meets the same dispatch as prerouting);
where each went is read from conntrack's reply tuple, so no endpoint need exist: the kernel's own
choice. Then `--leaving` of the N endpoints leave, one at a time (each alone, then back): conntrack
is flushed and the same flows sent again; the fraction that reached another endpoint is the
flows moved (the issue's goal: at most 1/N + 1%), beside the share of the hash space whose
endpoint changed, computed from the two tables (whose sizes differ at a step of the default size).

`--pick-cost`: what the kernel spends picking, per new flow, on each path: UDP datagrams of new
flows (a fresh source port each) timed around `sendto`, which carries the packet through conntrack,
the nat hook and the pick to the veth. Paths, interleaved round by round: `none` (an address no
Service has: conntrack and a dispatch miss), `numgen` (kernel mode's pick, 10 endpoints), `table`
(a Maglev table: the id lookup, jhash, the slot lookup) and `numgen-deep` (the table chain with
`numgen` in place of `jhash`: the same rules and lookups, so it isolates the hash).
"""
from __future__ import annotations

import argparse
import gc
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
        gc.disable()  # as the daemon's sync does (daemon/proxier._collector_paused)
        try:
            return _sync()
        finally:
            gc.enable()

    def _sync() -> float:
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
        "load_average": os.getloadavg(),
    }


MOVED_SERVICE, MOVED_PORT = "10.96.7.1", 53


def _moved_documents(endpoints: list[str], size: int | None) -> list[dict]:
    from dataplane.lab.manifests import endpoint_slice, port, service

    svc = service("maglev", MOVED_SERVICE, [port("dns", MOVED_PORT, 8080, "UDP")])
    svc["metadata"]["annotations"] = {"dataplane.io/lb-algorithm": "maglev",  # without a size: the default for N
                                      **({"dataplane.io/lb-table-size": str(size)} if size else {})}
    return [svc, endpoint_slice("maglev", endpoints, [("dns", 8080, "UDP")], name="maglev-1")]


def _flow_sources(count: int) -> list[str]:
    return [f"172.16.{i // 250}.{i % 250 + 1}" for i in range(count)]


def _link(sources: list[str]) -> None:
    """This namespace's node: 192.168.50.1 and `sources` on d0, a veth pair with both ends here (what
    leaves d0 dies at d1, conntrack has seen it by then), Service and Pod ranges routed out of d0."""
    lines = ["link add d0 type veth peer name d1", "link set d0 up", "link set d1 up",
             "address add 192.168.50.1/24 dev d0", *(f"address add {s}/32 dev d0" for s in sources),
             "route add 10.96.0.0/12 dev d0", "route add 10.244.0.0/16 dev d0"]
    subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)


def _send_flows(sources: list[str], ports: range) -> dict[tuple[str, int], str]:
    """One datagram per (source, port) to the Service; (source, port) -> the endpoint conntrack shows."""
    import re
    import socket

    for source in sources:
        for source_port in ports:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((source, source_port))
                sock.sendto(b"x", (MOVED_SERVICE, MOVED_PORT))
    listing = subprocess.run(["conntrack", "-L", "-p", "udp", "--orig-dst", MOVED_SERVICE], capture_output=True,
                             text=True, check=True).stdout
    found = {}
    for line in listing.splitlines():
        m = re.search(r"src=(\S+) dst=\S+ sport=(\d+) dport=\d+ .*?src=(\S+) dst=\S+ sport=(\d+)", line)
        if m:
            found[(m.group(1), int(m.group(2)))] = m.group(3)
    want = len(sources) * len(ports)
    if len(found) != want:
        raise RuntimeError(f"{len(found)} of {want} flows in conntrack")
    return found


def hash_space_moved(before: list[int], names: list[str], after: list[int], rest: list[str]) -> float:
    """The fraction of the 32-bit hash space whose endpoint differs between two tables (of any sizes):
    what new flows would see moved, computed rather than sampled."""
    edges = sorted({-(-(i << 32) // len(before)) for i in range(len(before))}  # slot i's first hash: ceil
                   | {-(-(i << 32) // len(after)) for i in range(len(after))} | {1 << 32})
    moved = 0
    for start, end in zip(edges, edges[1:]):
        # reciprocal_scale: the hash h falls in slot (h * M) >> 32
        if names[before[(start * len(before)) >> 32]] != rest[after[(start * len(after)) >> 32]]:
            moved += end - start
    return moved / (1 << 32)


def moved(args: argparse.Namespace) -> list[dict]:
    """Inside the namespace: flows moved when one of N endpoints leaves, for each N of `args.moved`."""
    from dataplane.config import NodeSettings
    from dataplane.lb import maglev
    from dataplane.lb.tables import default_table_size, slot_of
    from dataplane.model import parse_objects
    from dataplane.nat import plan
    from dataplane.nat.nftables import Nftables
    from dataplane.nat.render import RulesetBuilder
    from dataplane.sync.store import Store

    sources = _flow_sources(args.sources)
    ports = range(40000, 40000 + args.ports)
    _link(sources)
    nft = Nftables()
    results = []
    for n in args.moved:
        endpoints = [f"10.244.{e // 250}.{e % 250 + 1}" for e in range(n)]
        store, builder = Store(), RulesetBuilder(NodeSettings(cluster_cidrs=("10.244.0.0/16",)))
        state = plan.Programmed()

        def publish(listed: list[str]) -> int:
            """Programs the Service with `listed`; returns the slot elements the transaction rewrote."""
            nonlocal state
            objects, errors = parse_objects(_moved_documents(listed, args.moved_size), "maglev.yaml")
            assert not errors, errors
            store.replace("maglev.yaml", objects)
            tx, change = state.plan(builder.build(store.snapshot(), ["192.168.50.1"]))
            nft.apply(tx)
            state = state.commit(change)
            return sum(len(c.subject.elements) for c in tx if c.verb == "add"
                       and getattr(c.subject, "container", "").startswith("slots-"))

        size = args.moved_size or default_table_size(n)
        # The default size follows the endpoints listed: one leaving at a step (5 -> 4, 17 -> 16, ...)
        # changes it, which rehashes every flow.
        size_after = args.moved_size or default_table_size(n - 1)
        subprocess.run(["conntrack", "-F"], capture_output=True)
        publish(endpoints)
        started = time.perf_counter()
        before = _send_flows(sources, ports)
        send_seconds = time.perf_counter() - started
        names = [f"{ip}:8080" for ip in sorted(endpoints)]  # as lb/tables.fill orders them: by address text
        table = maglev.build(names, None, size)
        # The kernel's jhash and lb/tables.slot_of agree flow by flow (else the measure is of something else).
        predicted = sum(1 for (source, sport), endpoint in before.items()
                        if names[table[slot_of(source, sport, size)]].split(":")[0] == endpoint) / len(before)
        step = max(1, n // args.leaving)
        for gone in endpoints[::step][:args.leaving]:
            rest = [e for e in endpoints if e != gone]
            rewritten = publish(rest)
            subprocess.run(["conntrack", "-F"], capture_output=True)
            after = _send_flows(sources, ports)
            publish(endpoints)
            subprocess.run(["conntrack", "-F"], capture_output=True)
            rest_names = [f"{ip}:8080" for ip in sorted(rest)]
            after_table = maglev.build(rest_names, None, size_after)
            # Slots compared by the flows' positions (slot_of scales the hash to the size): the fraction
            # of hash space whose endpoint changed, whether or not the size did.
            space_moved = hash_space_moved(table, names, after_table, rest_names)
            flows = len(before)
            moved_flows = sum(1 for flow, endpoint in before.items() if after[flow] != endpoint)
            fraction = moved_flows / flows
            results.append({
                "endpoints": n, "table_size": size, "table_size_after": size_after, "leaving": gone, "flows": flows,
                "flows_moved": round(fraction, 4),
                # sampling error of the flows' fraction (95%): the flows sample the slots
                "flows_moved_95": round(1.96 * (fraction * (1 - fraction) / flows) ** 0.5, 4),
                "flows_of_the_leaver": round(sum(1 for e in before.values() if e == gone) / flows, 4),
                "flows_to_the_leaver_after": sum(1 for e in after.values() if e == gone),
                "hash_space_moved": round(space_moved, 4), "slots_rewritten": rewritten,
                "goal": round(1 / n + 0.01, 4), "met": fraction <= 1 / n + 0.01,
                "flows_where_slot_of_predicts": round(predicted, 4), "send_seconds": round(send_seconds, 2),
            })
    return results


PICK_PATHS = {"none": "10.244.9.9", "numgen": "10.96.7.1", "table": "10.96.7.2", "numgen-deep": "10.96.7.3"}
DEEP_CHAIN = "bench-numgen-deep"


def pick_cost(args: argparse.Namespace) -> dict:
    """Inside the namespace: the median sendto of a new flow's datagram on each path (PICK_PATHS)."""
    import dataclasses
    import socket

    from dataplane.config import NodeSettings
    from dataplane.lab.manifests import endpoint_slice, port, service
    from dataplane.lb.tables import default_table_size
    from dataplane.model import parse_objects
    from dataplane.nat import layout, plan
    from dataplane.nat.expr import Jhash, Nat, numgen
    from dataplane.nat.nftables import Nftables
    from dataplane.nat.render import RulesetBuilder
    from dataplane.nat.ruleset import Chain
    from dataplane.sync.store import Store

    _link(["172.16.0.1"])
    endpoints = [f"10.244.1.{e + 1}" for e in range(args.endpoints)]
    documents = []
    for name, algorithm in (("numgen", ""), ("table", "maglev"), ("numgen-deep", "maglev")):
        svc = service(name, PICK_PATHS[name], [port("dns", 53, 8080, "UDP")])
        svc["metadata"]["annotations"] = {"dataplane.io/lb-algorithm": algorithm} if algorithm else {}
        documents += [svc, endpoint_slice(name, endpoints, [("dns", 8080, "UDP")])]
    objects, errors = parse_objects(documents, "pick.yaml")
    assert not errors, errors
    store = Store()
    store.replace("pick.yaml", objects)
    ruleset = RulesetBuilder(NodeSettings(cluster_cidrs=("10.244.0.0/16",))).build(store.snapshot(), ["192.168.50.1"])
    size = default_table_size(args.endpoints)
    table_chain = ruleset.declarations[layout.hash_chain("cluster", size)]
    assert isinstance(table_chain, Chain)

    def without_hash(rule):
        statements = tuple(dataclasses.replace(s, expr=tuple(numgen(size) if isinstance(p, Jhash) else p
                                                             for p in s.expr))
                           if isinstance(s, Nat) and s.expr else s for s in rule.statements)
        return dataclasses.replace(rule, statements=statements)

    deep_key = f"{PICK_PATHS['numgen-deep']} . udp . 53"
    extra = [f"add chain ip {layout.TABLE} {DEEP_CHAIN}",
             *(f"add rule ip {layout.TABLE} {DEEP_CHAIN} {without_hash(rule)}" for rule in table_chain.rules),
             f"delete element ip {layout.TABLE} {layout.SERVICE_IPS} {{ {deep_key} }}",
             f"add element ip {layout.TABLE} {layout.SERVICE_IPS} {{ {deep_key} : goto {DEEP_CHAIN} }}"]
    nft = Nftables()
    nft.run(str(plan.full(ruleset)[0]) + "\n".join(extra) + "\n")  # one transaction
    rules = {name: str(rule) for name, rule in (("table", table_chain.rules[-1]),
                                                 ("numgen-deep", without_hash(table_chain.rules[-1])))}

    def one_round(destination: str, first_port: int) -> list[int]:
        took = []
        for source_port in range(first_port, first_port + args.flows):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("172.16.0.1", source_port))
                started = time.perf_counter_ns()
                sock.sendto(b"x", (destination, 53))
                took.append(time.perf_counter_ns() - started)
        return took

    rng = random.Random(11)
    medians: dict[str, list[float]] = {name: [] for name in PICK_PATHS}
    for _ in range(args.rounds):
        order = list(PICK_PATHS)
        rng.shuffle(order)
        for index, name in enumerate(order):
            medians[name].append(statistics.median(one_round(PICK_PATHS[name], 20000 + index * args.flows)))
        subprocess.run(["conntrack", "-F"], capture_output=True)
    ratios = {f"{name}/numgen": round(statistics.median(a / b for a, b in zip(medians[name], medians["numgen"])), 4)
              for name in ("table", "numgen-deep", "none")}
    return {
        "endpoints": args.endpoints, "table_size": size, "flows_per_round": args.flows, "rounds": args.rounds,
        "sendto_ns_median": {name: round(statistics.median(m)) for name, m in medians.items()},
        "ratio_median_of_rounds": ratios,
        "table_minus_numgen_ns": round(statistics.median(a - b for a, b in zip(medians["table"], medians["numgen"]))),
        "table_minus_numgen_deep_ns": round(statistics.median(
            a - b for a, b in zip(medians["table"], medians["numgen-deep"]))),
        "numgen_deep_minus_numgen_ns": round(statistics.median(
            a - b for a, b in zip(medians["numgen-deep"], medians["numgen"]))),
        "pick_rules": rules,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--size", type=int, default=1021)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--moved", type=lambda text: [int(n) for n in text.split(",")], default=None,
                        help="endpoint counts N: measure the flows moved when one of N leaves, instead")
    parser.add_argument("--sources", type=int, default=128, help="--moved: client source addresses")
    parser.add_argument("--ports", type=int, default=128, help="--moved: source ports per address")
    parser.add_argument("--leaving", type=int, default=3, help="--moved: endpoints that leave, one at a time")
    parser.add_argument("--moved-size", type=int, default=None,
                        help="--moved: an explicit table size (dataplane.io/lb-table-size); default: the default for N")
    parser.add_argument("--pick-cost", action="store_true",
                        help="measure the kernel's cost of each pick path per new flow, instead")
    parser.add_argument("--flows", type=int, default=1000, help="--pick-cost: new flows per path and round")
    parser.add_argument("--rounds", type=int, default=20, help="--pick-cost: rounds, the paths interleaved")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        print(json.dumps(moved(args) if args.moved else pick_cost(args) if args.pick_cost else inner(args)))
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
