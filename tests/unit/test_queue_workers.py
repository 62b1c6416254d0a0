"""Worker processes for --queues N: message framing and merging their reports (the pure parts)."""

from __future__ import annotations

import random

import pytest

from dataplane.queue.workers import Frames, forwarder_cpus, frame, merge_snapshots


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
            "latency": {"buckets": [0.001, 0.01], "counts": [packets, 0, 0], "total": 0.5, "count": packets},
            "per_queue": {queue: packets},
            "services": [{"service": "default/web:http", "algorithm": "least-conn", "affinity_timeout": None,
                          "affinity_entries": 3, "maglev_table": None,
                          "endpoints": [{"endpoint": "10.244.1.11:80", "id": 1, "weight": 1, "active": active,
                                         "decided": decided}]}]}


def test_merged_counts_add_up_and_active_flows_are_not_double_counted():
    merged = merge_snapshots([snapshot(10, 4, 7, "0"), snapshot(5, 6, 8, "1")])
    assert (merged["packets"], merged["undecided"], merged["affinity_entries"]) == (15, 2, 6)
    assert merged["per_queue"] == {"0": 10, "1": 5}
    assert merged["latency"]["counts"] == [15, 0, 0] and merged["latency"]["count"] == 15
    (endpoint,) = merged["services"][0]["endpoints"]
    assert endpoint["decided"] == 10
    assert endpoint["active"] == 8  # each worker follows all of conntrack: the same flows, seen twice


def test_no_report_yet_merges_to_zeros():
    # WorkerPool.snapshot() relies on this before any worker has reported.
    assert merge_snapshots([]) == {"packets": 0, "undecided": 0, "table_builds": 0, "affinity_entries": 0,
                                   "cpu_seconds": 0.0, "cpu_user_seconds": 0.0, "latency": None, "services": [], "per_queue": {}}


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
