"""Worker processes for --queues N: message framing and merging their reports (the pure parts)."""

from __future__ import annotations

import random

from dataplane.queue.workers import Frames, frame, merge_snapshots


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
                                   "conntrack_overflows": 0, "conntrack_resyncs": 0, "latency": None, "services": [], "per_queue": {}}
