"""Prometheus metrics, named as kube-proxy names them where it has one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # kube-proxy exposes no *_created series

_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds", "Time to render and apply one sync", registry=r,
            buckets=_BUCKETS)
        self.full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds", "Time of full syncs", registry=r, buckets=_BUCKETS)
        self.partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds", "Time of partial syncs", registry=r,
            buckets=_BUCKETS)
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "When the last successful sync ended", registry=r)
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "When a change was last queued", registry=r)
        self.sync_failures = Counter(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total", "nftables transactions that failed",
            registry=r)
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes_total", "Service changes seen", registry=r)
        self.programming_latency = Histogram(
            "kubeproxy_network_programming_duration_seconds", "From a change seen to its rules live", registry=r,
            buckets=_BUCKETS)
        self.services = Gauge("dataplane_services_programmed", "Service ports with rules", registry=r)
        self.endpoints = Gauge("dataplane_endpoints_programmed", "Endpoint entries in the kernel", registry=r)
        self.conntrack_deleted = Counter(
            "dataplane_conntrack_entries_deleted_total", "Stale UDP/SCTP flows deleted", registry=r)
        self.invalid_objects = Gauge(
            "dataplane_invalid_objects", "Objects skipped because they are invalid", registry=r)
