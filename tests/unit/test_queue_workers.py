"""Worker processes: message framing, merging their reports, placement, Maglev tables from the daemon (no processes)."""

from __future__ import annotations

import random
import socket

import pytest

from dataplane.lb.balancer import Balancer
from dataplane.lb.policy import PortTable, Target
from dataplane.queue.forwarder import Forwarder
from dataplane.queue.workers import Frames, WorkerPool, forwarder_cpus, frame, merge_snapshots


def test_frames_survive_any_split():
    messages = [("services", {"k": tuple(range(i))}) for i in range(30)]
    stream = b"".join(frame(m) for m in messages)
    rng = random.Random(5)
    frames, got, at = Frames(), [], 0
    while at < len(stream):
        step = rng.randrange(1, 40)
        got += frames.feed(stream[at : at + step])
        at += step
    assert got == messages


def snapshot(packets, decided, active, queue):
    return {"packets": packets, "undecided": 1, "table_builds": 2, "affinity_entries": 3,
            "conntrack_overflows": 1, "conntrack_resyncs": 2,
            "latency": {"buckets": [0.001, 0.01], "counts": [packets, 0, 0], "total": 0.5, "count": packets},
            "per_queue": {queue: packets},
            "services": [{"service": "default/web:http", "algorithm": "least-conn", "affinity_timeout": None,
                          "affinity_entries": 3, "maglev_table": None,
                          "endpoints": [{"endpoint": "10.244.1.11:80", "id": 1, "weight": 1, "active": active,
                                         "decided": decided}]}]}


def test_merged_counts_add_up_and_active_flows_are_not_double_counted():
    merged = merge_snapshots([snapshot(10, 4, 7, "0"), snapshot(5, 6, 8, "1")])
    assert (merged["packets"], merged["undecided"], merged["affinity_entries"]) == (15, 2, 6)
    assert (merged["conntrack_overflows"], merged["conntrack_resyncs"]) == (2, 4)  # each worker has its own socket
    assert merged["per_queue"] == {"0": 10, "1": 5}
    assert merged["latency"]["counts"] == [15, 0, 0] and merged["latency"]["count"] == 15
    (endpoint,) = merged["services"][0]["endpoints"]
    assert endpoint["decided"] == 10
    assert endpoint["active"] == 8  # each worker follows all of conntrack: the same flows, seen twice


def test_no_report_yet_merges_to_zeros():
    # WorkerPool.snapshot() relies on this before any worker has reported.
    assert merge_snapshots([]) == {"packets": 0, "undecided": 0, "table_builds": 0, "affinity_entries": 0,
                                   "conntrack_overflows": 0, "conntrack_resyncs": 0, "cpu_seconds": 0.0, "cpu_user_seconds": 0.0,
                                   "latency": None, "services": [], "per_queue": {}}


@pytest.mark.parametrize("count, fanout, allowed, pinned, expected", [
    # one queue per CPU, fanned out: each forwarder on the CPU whose packets its queue gets
    (2, True, {0, 1}, None, {0: {0}, 1: {1}}),
    (2, True, {0, 1, 2, 3}, None, {0: {0, 2}, 1: {1, 3}}),
    # the daemon may not use CPU 1: queue 1's forwarder runs where it can
    (2, True, {0, 2}, None, {0: {0, 2}, 1: {0, 2}}),
    # the kernel's hash: a packet may come from any CPU, so pinning cannot help
    (2, False, {0, 1}, None, {}),
    # by hand
    (3, True, {0, 1}, (1,), {0: {1}, 1: {1}, 2: {1}}),
    (2, True, {0, 1}, (), {}),
])
def test_forwarder_placement(count, fanout, allowed, pinned, expected):
    got = forwarder_cpus(count, fanout, frozenset(allowed), pinned)
    assert got == {i: frozenset(c) for i, c in expected.items()}


# -- Maglev tables: built by the daemon, sent to the workers -----------------------------------------

def maglev_table(n: int) -> PortTable:
    targets = tuple(Target(i + 1, f"10.244.1.{11 + i}", 80) for i in range(n))
    return PortTable("default/web:http", 6, (socket.inet_aton("10.96.0.10"),), 80, None, targets, "maglev", None)


def sent(worker) -> list:
    found = []
    while not worker.outbox.empty():
        found.append(worker.outbox.get_nowait())
    return found


def test_the_pool_builds_each_maglev_table_once_and_sends_it_to_every_worker():
    pool = WorkerPool((0, 1), maglev_size=251)
    pool.services_changed({"web": (maglev_table(3),)})
    for worker in pool.workers:
        kinds = [m[0] for m in sent(worker)]
        assert kinds == ["services", "table"]
    pool.services_changed({"web": (maglev_table(3),)})  # the same endpoints: nothing to build
    assert [m[0] for m in sent(pool.workers[0])] == ["services"]
    pool.services_changed({"web": ()})
    assert pool.maglev == {}


@pytest.mark.parametrize("table_first", [False, True])
def test_a_worker_uses_the_daemons_table_whichever_arrives_first(table_first):
    pool = WorkerPool((0,), maglev_size=251)
    pool.services_changed({"web": (maglev_table(3),)})
    (_, (port, names, weights, size, table)), = [m for m in sent(pool.workers[0]) if m[0] == "table"]
    forwarder = Forwarder((0,), Balancer(251), tables_from_daemon=True)
    if table_first:
        forwarder.table_ready(port, names, weights, size, table)
    forwarder.services_changed({"web": (maglev_table(3),)})
    if not table_first:
        assert forwarder.balancer.ports[port].maglev == []  # waiting: nothing built in the worker
        forwarder.table_ready(port, names, weights, size, table)
    assert forwarder.balancer.ports[port].maglev == table
    assert forwarder.table_builds == 1
