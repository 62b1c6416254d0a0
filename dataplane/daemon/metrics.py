"""Prometheus metrics: kube-proxy's nftables-mode families with its names, labels and buckets, then ours.

The `kubeproxy_*` list, labels and buckets follow kube-proxy v1.34
(pkg/proxy/metrics/metrics.go and the v1.34 metrics reference), so
dashboards and alerts written for kube-proxy read them unchanged; the unit
test `tests/unit/test_metrics.py` holds that list. Both address families are
programmed in one nftables transaction here, so a sync's duration is
observed once for each `ip_family` with the same value.

`network_programming_duration_seconds` is measured as kube-proxy measures
it: from an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`
annotation (set by the EndpointSlice controller when the Pod or Service
changed) to the end of the sync that made the change live; trigger times
older than this process are not observed (kube-proxy skips those too, or a
restart would report the cluster's age).
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ..model import ServiceType, TrafficPolicy
from ..model.endpoints import TRIGGER_TIME_ANNOTATION

if TYPE_CHECKING:
    from ..model import ServiceKey, ServiceState, Snapshot

disable_created_metrics()  # kube-proxy exposes no *_created series

KUBE_PROXY_VERSION = "v1.34"  # the kube-proxy release whose metric names, labels and buckets these are
IP_FAMILIES = ("IPv4", "IPv6")

# kube-proxy's: ExponentialBuckets(0.001, 2, 15) for sync durations.
SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))
# kube-proxy's network programming buckets: 0.25, 0.5, then 1..59 s, 60..115 s by 5, 120..300 s by 30.
PROGRAMMING_BUCKETS = (0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30))
_OUR_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self, build_version: str = "", feature_gates: dict[str, bool] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # the standard process_* and python_* families, on our own registry
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        family = ["ip_family"]
        # ---- kube-proxy's families
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", family,
            registry=r, buckets=SYNC_BUCKETS)
        self.full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs",
            family, registry=r, buckets=SYNC_BUCKETS)
        self.partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs", family, registry=r, buckets=SYNC_BUCKETS)
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced",
            family, registry=r)
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", family, registry=r)
        self.programming_duration = Histogram(
            "kubeproxy_network_programming_duration_seconds", "In Cluster Network Programming Latency in seconds",
            family, registry=r, buckets=PROGRAMMING_BUCKETS)
        self.endpoint_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes", registry=r)
        self.endpoint_changes = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes", registry=r)
        self.service_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes", registry=r)
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes", registry=r)
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints", ["ip_family", "traffic_policy"],
            registry=r)
        self.sync_failures = Counter(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures", "Cumulative proxy nftables sync failures", family,
            registry=r)
        self.cleanup_failures = Counter(
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures", "Cumulative proxy nftables cleanup failures",
            family, registry=r)
        self.conntrack_reconciler_deleted = Counter(
            "kubeproxy_conntrack_reconciler_deleted_entries", "Cumulative conntrack flows deleted by conntrack "
            "reconciler", family, registry=r)
        self.conntrack_reconciler_duration = Histogram(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds", "ReconcileConntrackFlowsLatency latency in seconds",
            family, registry=r, buckets=SYNC_BUCKETS)
        self.healthz = Counter("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], registry=r)
        self.livez = Counter("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=r)
        build = Gauge(
            "kubernetes_build_info", "A metric with a constant '1' value labeled by major, minor, git version, "
            "git commit, git tree state, build date, Go version, and compiler from which Kubernetes was built, "
            "and platform on which it is running.",
            ["major", "minor", "git_version", "git_commit", "git_tree_state", "build_date", "go_version", "compiler",
             "platform"], registry=r)
        build_version = build_version or _version()
        major, minor = (build_version.split(".") + ["0", "0"])[:2]
        build.labels(major, minor, f"dataplane-{build_version}", "", "", "", f"python{platform.python_version()}",
                     sys.implementation.name, f"{sys.platform}/{platform.machine()}").set(1)
        features = Gauge("kubernetes_feature_enabled", "This metric records the data about the stage and enablement "
                         "of a k8s feature.", ["name", "stage"], registry=r)
        for name, enabled in sorted((feature_gates or {}).items()):
            features.labels(name, "").set(1 if enabled else 0)
        for ip_family in IP_FAMILIES:  # every family's series exists from the start, as a dashboard expects
            for metric in (self.sync_duration, self.full_sync_duration, self.partial_sync_duration, self.last_sync,
                           self.last_queued, self.programming_duration, self.sync_failures, self.cleanup_failures,
                           self.conntrack_reconciler_deleted, self.conntrack_reconciler_duration):
                metric.labels(ip_family)
            for policy in ("internal", "external"):
                self.no_local_endpoints.labels(ip_family, policy).set(0)
        for code in ("200", "503"):
            self.healthz.labels(code)
            self.livez.labels(code)
        # ---- ours
        self.services = Gauge("dataplane_services_programmed", "Service ports with rules", registry=r)
        self.endpoints = Gauge("dataplane_endpoints_programmed", "Endpoint entries in the kernel", registry=r)
        self.conntrack_deleted = Counter(
            "dataplane_conntrack_entries_deleted_total", "Stale UDP/SCTP flows deleted", registry=r)
        self.resyncs_verified = Counter(
            "dataplane_resyncs_unchanged_total", "Full resyncs that sent nothing: no change here, and no "
            "transaction committed in the kernel since ours (its ruleset generation)", registry=r)
        self.invalid_objects = Gauge(
            "dataplane_invalid_objects", "Objects skipped because they are invalid", registry=r)
        self.change_latency = Histogram(
            "dataplane_change_to_rules_seconds", "From a change seen by the daemon to its rules live", registry=r,
            buckets=_OUR_BUCKETS)
        self.triggers = TriggerTimes()
        self.changes = ChangeTracker(self)
        self._no_local = NoLocalEndpoints()

    # Observations of one sync, for every family the transaction programmed.

    def queued(self) -> None:
        for ip_family in IP_FAMILIES:
            self.last_queued.labels(ip_family).set_to_current_time()

    def synced(self, seconds: float, full: bool, snapshot: "Snapshot", node_name: str,
               verified: bool = False) -> None:
        """`verified`: a full resync that sent nothing; counted apart, not as the duration of a full sync."""
        if verified:
            self.resyncs_verified.inc()
        for ip_family in IP_FAMILIES:
            self.sync_duration.labels(ip_family).observe(seconds)
            if not verified:
                (self.full_sync_duration if full else self.partial_sync_duration).labels(ip_family).observe(seconds)
            self.last_sync.labels(ip_family).set_to_current_time()
        for (ip_family, policy), count in self._no_local.update(snapshot, node_name).items():
            self.no_local_endpoints.labels(ip_family, policy).set(count)

    def sync_failed(self) -> None:
        for ip_family in IP_FAMILIES:
            self.sync_failures.labels(ip_family).inc()

    def conntrack_cleared(self, deleted: int, seconds: float, stale) -> None:
        """Stale flows deleted after a sync: kube-proxy's conntrack reconciler figures, by the flows' family."""
        families = {"IPv6" if ":" in flow.ip else "IPv4" for flow in stale if flow.ip} or {"IPv4"}
        for ip_family in families:
            self.conntrack_reconciler_duration.labels(ip_family).observe(seconds)
        self.conntrack_reconciler_deleted.labels(sorted(families)[0]).inc(deleted)

    def figures(self) -> dict[str, int]:
        """The daemon-wide counts `dataplane status` shows in kernel mode."""
        sample = self.registry.get_sample_value
        ipv4 = {"ip_family": "IPv4"}
        return {
            "services_programmed": int(sample("dataplane_services_programmed") or 0),
            "endpoint_entries": int(sample("dataplane_endpoints_programmed") or 0),
            "syncs": int(sample("kubeproxy_sync_proxy_rules_duration_seconds_count", ipv4) or 0),
            "sync_failures": int(sample("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", ipv4) or 0),
            "conntrack_entries_deleted": int(sample("dataplane_conntrack_entries_deleted_total") or 0),
        }

    def programmed(self, batch: list[tuple[str, float]], now: float | None = None) -> None:
        """The EndpointSlice changes of `batch` ((ip_family, trigger time)) are live now."""
        now = time.time() if now is None else now
        for ip_family, trigger in batch:
            self.programming_duration.labels(ip_family).observe(max(0.0, now - trigger))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dataplane")
    except PackageNotFoundError:
        return "0.0.0"


def no_local_endpoints(snapshot: "Snapshot", node_name: str) -> dict[tuple[str, str], int]:
    """Service ports with a Local policy, endpoints, and none of them here, by (ip_family, policy). Pure.

    As kube-proxy counts them: internal for internalTrafficPolicy Local, external for an
    externalTrafficPolicy Local Service that has external addresses or NodePorts.
    """
    counts = _zero_counts()
    for state in snapshot.services.values():
        for key in _no_local_keys(state, node_name):
            counts[key] += 1
    return counts


def _zero_counts() -> dict[tuple[str, str], int]:
    return {(f, p): 0 for f in IP_FAMILIES for p in ("internal", "external")}


def _no_local_keys(state: "ServiceState", node_name: str) -> list[tuple[str, str]]:
    """One (ip_family, policy) per count the Service adds to no_local_endpoints."""
    service = state.service
    local = TrafficPolicy.LOCAL
    if service.internal_traffic_policy is not local and service.external_traffic_policy is not local:
        return []  # most Services
    found = []
    external = (service.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER)
                or bool(service.external_ips_all))
    for ip in service.cluster_ips:
        ip_family = "IPv6" if ":" in ip else "IPv4"
        version = 6 if ip_family == "IPv6" else 4
        for _, backends in state.port_backends():
            usable = [b for b in backends if b.family == version and b.serving]
            if not usable or any(b.node_name == node_name for b in usable):
                continue
            if service.internal_traffic_policy == TrafficPolicy.LOCAL:
                found.append((ip_family, "internal"))
            if external and service.external_traffic_policy == TrafficPolicy.LOCAL:
                found.append((ip_family, "external"))
    return found


class NoLocalEndpoints:
    """`no_local_endpoints`, kept up to date from the Services that changed since the snapshot it
    last saw (a walk of all 10,000 Services after every one-endpoint sync cost a millisecond)."""

    def __init__(self) -> None:
        self._last: "Snapshot | None" = None
        self._node_name = ""
        self._by_service: dict["ServiceKey", list[tuple[str, str]]] = {}  # only Services that count
        self._counts = _zero_counts()

    def update(self, snapshot: "Snapshot", node_name: str) -> dict[tuple[str, str], int]:
        if self._last is not None and node_name == self._node_name and snapshot.follows(self._last):
            keys: Iterable["ServiceKey"] = snapshot.changed
        else:
            self._by_service, self._counts = {}, _zero_counts()
            keys = snapshot.services.keys()
        for key in keys:
            for counted in self._by_service.pop(key, ()):
                self._counts[counted] -= 1
            state = snapshot.services.get(key)
            found = _no_local_keys(state, node_name) if state is not None else []
            if found:
                self._by_service[key] = found
                for counted in found:
                    self._counts[counted] += 1
        self._last, self._node_name = snapshot, node_name
        return dict(self._counts)


class TriggerTimes:
    """EndpointSlice trigger times waiting for the sync that makes their change live."""

    def __init__(self, started: float | None = None):
        self.started = time.time() if started is None else started
        self._pending: list[tuple[str, float]] = []

    def record(self, endpoint_slice: dict) -> None:
        """From an EndpointSlice object as the API sends it; malformed or old annotations are skipped."""
        meta = endpoint_slice.get("metadata") if isinstance(endpoint_slice.get("metadata"), dict) else {}
        annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
        stamp = parse_time(annotations.get(TRIGGER_TIME_ANNOTATION))
        if stamp is None or stamp < self.started:
            return
        ip_family = "IPv6" if endpoint_slice.get("addressType") == "IPv6" else "IPv4"
        self._pending.append((ip_family, stamp))

    def checkout(self) -> list[tuple[str, float]]:
        """What the sync about to take its snapshot will program."""
        batch, self._pending = self._pending, []
        return batch

    def restore(self, batch: list[tuple[str, float]]) -> None:
        """The sync failed: the changes are still owed."""
        self._pending = batch + self._pending


def parse_time(text) -> float | None:
    """An RFC 3339 time ("2026-12-02T07:00:00Z", fractions allowed) as a Unix time, else None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class _Pending:
    service: set
    endpoints: set


class ChangeTracker:
    """kube-proxy's change counters over our store: each Service change, split into its Service part
    and its endpoints part; pending = Services whose part differs from what the last sync programmed."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.seen: dict["ServiceKey", "ServiceState"] = {}
        self.pending = _Pending(set(), set())

    def changed(self, keys: Iterable["ServiceKey"], current, synced: "Snapshot") -> None:
        """`current(key)` is the store's state now (None: gone); `synced` what is in the kernel."""
        for key in keys:
            state = current(key)
            before = self.seen.pop(key, None)
            if state is not None:
                self.seen[key] = state
            if _service(before) != _service(state):
                self.metrics.service_changes.inc()
            if _endpoints(before) != _endpoints(state):
                self.metrics.endpoint_changes.inc()
            self._classify(key, state, synced.services.get(key))
        self._publish()

    def synced(self, current, synced: "Snapshot") -> None:
        for key in list(self.pending.service | self.pending.endpoints):
            self._classify(key, current(key), synced.services.get(key))
        self._publish()

    def _classify(self, key, state, programmed) -> None:
        for part, pending in ((_service, self.pending.service), (_endpoints, self.pending.endpoints)):
            if part(state) != part(programmed):
                pending.add(key)
            else:
                pending.discard(key)

    def _publish(self) -> None:
        self.metrics.service_changes_pending.set(len(self.pending.service))
        self.metrics.endpoint_changes_pending.set(len(self.pending.endpoints))


def _service(state):
    return None if state is None else state.service


def _endpoints(state):
    return None if state is None else (state.backends, state.endpoints)


# ---- the built-in DNS server's figures

_QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
           41: "OPT", 65: "HTTPS", 255: "ANY"}
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_DNS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def query_type(wire: bytes) -> str:
    """The first question's type from a DNS message ("other" when it cannot be read)."""
    position = 12
    try:
        while wire[position]:
            if wire[position] & 0xC0:
                return "other"  # a query's question name is never compressed
            position += wire[position] + 1
        code = int.from_bytes(wire[position + 1:position + 3], "big")
    except IndexError:
        return "other"
    return _QTYPES.get(code, "other") if len(wire) >= position + 3 else "other"


def response_code(wire: bytes) -> str:
    return _RCODES.get(wire[3] & 0x0F, "other") if len(wire) >= 4 else "other"


class DnsMetrics:
    """Queries by type and rcode, forwarded queries, answer latency, and the server's own event counts.

    `attach(server)` wraps its responder's `handle` and `relay`, the two calls
    every answer goes through, so the DNS package stays free of Prometheus.
    """

    def __init__(self, registry: CollectorRegistry):
        self.queries = Counter("dataplane_dns_queries", "DNS queries answered, by query type and response code",
                               ["type", "rcode"], registry=registry)
        self.forwarded = Counter("dataplane_dns_forwarded_queries", "DNS queries forwarded to an upstream resolver",
                                 registry=registry)
        self.latency = Histogram("dataplane_dns_answer_duration_seconds",
                                 "From a DNS query read to its answer built (forwarded ones included)",
                                 ["forwarded"], registry=registry, buckets=_DNS_BUCKETS)
        self.events = Gauge("dataplane_dns_server_events", "The DNS server's own counts: udp, tcp, dropped, "
                            "forward_dropped, tcp_refused, upstream_errors, internal_errors, icmp_errors",
                            ["event"], registry=registry)
        self._server = None
        self._forwards: dict[int, tuple[float, str]] = {}
        for rcode in ("NOERROR", "NXDOMAIN"):
            for qtype in ("A", "AAAA", "SRV"):
                self.queries.labels(qtype, rcode)
        for forwarded in ("false", "true"):
            self.latency.labels(forwarded)

    def attach(self, server) -> None:
        self._server = server
        responder = server.responder
        handle, relay = responder.handle, responder.relay

        def timed_handle(wire: bytes, tcp: bool):
            started = time.perf_counter()
            command = handle(wire, tcp)
            reply = getattr(command, "wire", None)
            if isinstance(reply, bytes):
                self.queries.labels(query_type(wire), response_code(reply)).inc()
                self.latency.labels("false").observe(time.perf_counter() - started)
            elif command is not None:
                if len(self._forwards) > 10_000:  # forwards dropped before relay never come back
                    self._forwards.clear()
                self._forwards[id(command)] = (started, query_type(wire))
            return command

        def timed_relay(forward, upstream):
            wire = relay(forward, upstream)
            started, qtype = self._forwards.pop(id(forward), (None, "other"))
            self.forwarded.inc()
            self.queries.labels(qtype, response_code(wire)).inc()
            if started is not None:
                self.latency.labels("true").observe(time.perf_counter() - started)
            return wire

        responder.handle, responder.relay = timed_handle, timed_relay
        self.events.labels("udp").set_function(lambda: server.stats["udp"])
        for event in ("tcp", "dropped", "forward_dropped", "tcp_refused", "upstream_errors", "internal_errors",
                      "icmp_errors"):
            self.events.labels(event).set_function(lambda event=event: server.stats[event])
