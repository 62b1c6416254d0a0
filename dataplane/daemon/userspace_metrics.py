"""`dataplane_userspace_*` on /metrics: a Prometheus collector over what the forwarder reports.

`collect` runs on the event loop at each scrape, so it does no I/O beyond
reading /proc: the fail-open counter is the value the daemon read from nft
off the loop just before (`UserspaceMode.refresh_counters`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..queue.nfqueue import queue_stats

if TYPE_CHECKING:
    from .userspace import UserspaceMode


class UserspaceCollector:
    def __init__(self, mode: UserspaceMode):
        self.mode = mode

    def collect(self):
        snapshot = self.mode.forwarder.snapshot()
        decided = CounterMetricFamily("dataplane_userspace_flows_decided", "New flows the forwarder decided",
                                      labels=["service", "endpoint"])
        active = GaugeMetricFamily("dataplane_userspace_flows_active",
                                   "Flows live in conntrack per endpoint (least-conn Services)",
                                   labels=["service", "endpoint"])
        for port in snapshot["services"]:
            for endpoint in port["endpoints"]:
                decided.add_metric([port["service"], endpoint["endpoint"]], endpoint["decided"])
                if port["algorithm"] == "least-conn":
                    active.add_metric([port["service"], endpoint["endpoint"]], endpoint["active"])
        yield decided
        yield active
        latency = snapshot["latency"]
        if latency is not None:
            buckets, running = [], 0
            for bound, count in zip(latency["buckets"], latency["counts"]):
                running += count
                buckets.append((repr(bound), running))
            buckets.append(("+Inf", latency["count"]))
            yield HistogramMetricFamily("dataplane_userspace_decision_latency_seconds",
                                        "From reading a batch of queued packets to their verdicts sent",
                                        buckets=buckets, sum_value=latency["total"])
        yield CounterMetricFamily("dataplane_userspace_packets_queued", "Packets the forwarder read",
                                  value=snapshot["packets"])
        yield CounterMetricFamily("dataplane_userspace_undecided",
                                  "Queued packets let through without a decision (unreadable, no Service)",
                                  value=snapshot["undecided"])
        yield CounterMetricFamily("dataplane_userspace_fail_open",
                                  "New flows that reached the kernel's pick without a decision",
                                  value=self.mode.fail_open.value)
        drops = CounterMetricFamily("dataplane_userspace_queue_drops", "Packets the kernel dropped from a queue",
                                    labels=["queue"])
        for queue, stats in queue_stats().items():
            if queue in self.mode.forwarder.queues:
                drops.add_metric([str(queue)], stats["queue_dropped"] + stats["user_dropped"])
        yield drops
        yield GaugeMetricFamily("dataplane_userspace_affinity_entries", "ClientIP affinity entries held",
                                value=snapshot["affinity_entries"])
        yield CounterMetricFamily("dataplane_userspace_maglev_builds", "Maglev tables built",
                                  value=snapshot["table_builds"])
        yield CounterMetricFamily("dataplane_userspace_conntrack_events_lost",
                                  "Times the conntrack event socket overflowed (ENOBUFS): events were lost",
                                  value=snapshot.get("conntrack_overflows", 0))
        yield CounterMetricFamily("dataplane_userspace_conntrack_resyncs",
                                  "least-conn counts rebuilt from a conntrack dump (at start and after a loss)",
                                  value=snapshot.get("conntrack_resyncs", 0))
