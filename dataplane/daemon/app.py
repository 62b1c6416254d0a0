"""The daemon: sources feed the store, the sync loop programs the kernel.

Everything runs on one asyncio (uvloop) event loop; the blocking nftables
and conntrack calls run in a worker thread so probes stay answered while a
large sync is in flight. On SIGTERM/SIGINT the daemon exits and leaves its
rules in place: traffic keeps flowing until the next start adopts them.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config import NodeSettings, select_nodeport_ips
from ..dns import DnsServer, parse_list
from ..nat.nftables import NftError, Nftables
from ..nat.tables import balancing_paths
from ..netlink import addresses, conntrack
from ..sync.manifests import ManifestSource
from ..sync.store import Store
from . import http
from .healthcheck import HealthCheckServers
from .metrics import Metrics
from .proxier import Proxier
from .userspace import UserspaceMode, remove_queue_rules
from .schedule import Schedule, SyncLoop

if TYPE_CHECKING:  # kubernetes_asyncio costs ~40 MB: imported only with --source kube
    from ..sync.kube import ApiSettings, NodeInfo

log = logging.getLogger("dataplane")


@dataclass
class Options:
    source: Path
    settings: NodeSettings
    healthz_bind: str = "0.0.0.0:10256"
    metrics_bind: str = "127.0.0.1:10249"
    min_sync_period: float = 1.0
    sync_period: float = 300.0
    dns_bind: str = ""  # HOST:PORT of the cluster DNS server; empty: no DNS server
    cluster_domain: str = "cluster.local"
    dns_upstream: str = ""  # comma-separated; empty: the nameservers of /etc/resolv.conf
    dns_ttl: int = 5
    proxy_mode: str = "kernel"  # or "userspace": new flows are balanced by the forwarder (issue 3)
    queues: int = 1  # userspace: NFQUEUE queues, the kernel spreads flows over them by hash
    lb_algorithm: str = "random"  # userspace: for Services without a dataplane.io/lb-algorithm annotation
    kube: ApiSettings | None = None  # set: the Kubernetes API is the source (`--source kube`), not `source`


class Health:
    """kube-proxy's healthz, stricter at start: not healthy before the first sync is live."""

    def __init__(self, stale_after: float = 30.0, clock=time.time):
        self.clock = clock
        self.stale_after = stale_after
        self.last_updated: float | None = None
        self.failing = False
        self.pending_since: float | None = None
        self.last_queued = float("-inf")

    def queued(self) -> None:
        self.last_queued = self.clock()
        if self.pending_since is None:
            self.pending_since = self.last_queued

    def synced(self, ok: bool, started: float | None) -> None:
        """A sync that took its snapshot at `started` ended; a change queued later is still owed."""
        self.failing = not ok
        if ok:
            self.last_updated = self.clock()
            owed = started is not None and self.last_queued > started
            self.pending_since = self.last_queued if owed else None

    def report(self) -> tuple[int, str, bytes]:
        now = self.clock()
        overdue = self.pending_since is not None and now - self.pending_since > self.stale_after
        healthy = self.last_updated is not None and not self.failing and not overdue
        body = {
            "lastUpdated": _iso(self.last_updated),
            "currentTime": _iso(now),
            "nodeEligible": healthy,
            "pendingSince": _iso(self.pending_since),
        }
        return (200 if healthy else 503), "application/json", (json.dumps(body) + "\n").encode()


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


class Daemon:
    def __init__(self, options: Options, nft: Nftables):
        self.options = options
        self.store = Store()
        self.metrics = Metrics()
        if options.kube is not None:
            from ..sync.kube import KubeSource

            self.source = KubeSource(options.kube, self.store, options.settings.node_name,
                                     registry=self.metrics.registry, on_node=self._node_changed)
        else:
            self.source = ManifestSource(options.source, self.store)
        self.health = Health()
        self.proxier = Proxier(options.settings, nft)
        self.userspace = None
        if options.proxy_mode == "userspace":
            self.userspace = UserspaceMode(options.settings, nft, options.queues, options.lb_algorithm)
            self.proxier.extend = self.userspace.extend
            self.metrics.registry.register(self.userspace.collector())
        self.node_ips: tuple[str, ...] = ()
        self.health_checks = HealthCheckServers(options.settings.node_name)
        self.dns = None if not options.dns_bind else DnsServer(
            options.dns_bind, options.cluster_domain, options.dns_ttl, parse_list(options.dns_upstream) or None
        )
        self.loop = SyncLoop(
            Schedule(min_interval=options.min_sync_period, full_interval=options.sync_period), self._sync
        )

    async def refresh_node_ips(self) -> bool:
        # pyroute2 runs an event loop of its own: keep it off ours.
        found, primary = await asyncio.to_thread(addresses.node_addresses)
        node = getattr(self.source, "node", None)
        if node is not None and node.primary_ip in found:
            primary = node.primary_ip  # the Node object's InternalIP, as kube-proxy takes it
        ips = select_nodeport_ips(self.options.settings, found, primary)
        if ips == self.node_ips:
            return False
        log.info("NodePort addresses: %s", ", ".join(ips) or "none")
        self.node_ips = ips
        if self.userspace is not None:
            self.userspace.node_addresses(ips)
        return True

    def changed(self, what: str) -> None:
        log.debug("change queued: %s", what)
        self.metrics.last_queued.set_to_current_time()
        self.health.queued()
        self.loop.request()

    async def _sync(self, full: bool) -> bool:
        snapshot = self.store.snapshot()
        started_wall, pending_mono = self.health.clock(), self.loop.schedule.pending_since
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(self.proxier.sync, snapshot, self.node_ips, full)
        except NftError as error:
            self.metrics.sync_failures.inc()
            log.error("sync failed, rules left as they were: %s", error)
            self.health.synced(False, started_wall)
            return False
        elapsed = time.perf_counter() - started
        self.metrics.sync_duration.observe(elapsed)
        (self.metrics.full_sync_duration if full else self.metrics.partial_sync_duration).observe(elapsed)
        if pending_mono is not None:
            self.metrics.programming_latency.observe(time.monotonic() - pending_mono)
        self.metrics.last_sync.set_to_current_time()
        self.metrics.services.set(result.services)
        self.metrics.endpoints.set(result.endpoints)
        self.metrics.invalid_objects.set(sum(len(p) for p in self.source.errors.values()))
        first = self.health.last_updated is None
        self.health.synced(True, started_wall)
        if first:
            # Everything loaded so far lives as long as the daemon: keep the collector from
            # walking it again and again (it stalled the loop 150 ms per pass at 10k Services).
            gc.collect()
            gc.freeze()
        if self.userspace is not None:
            self.userspace.synced(snapshot)  # only now: the endpoint ids it names are in the kernel
        if self.dns is not None:
            # After the rules are live, so that a name never resolves to a ClusterIP that does not work yet.
            self.dns.publish(snapshot)
        await self.health_checks.update(snapshot)
        render, plan, apply = (round(s * 1000, 1) for s in result.seconds)
        log.info(
            "%s sync: %d commands in %.1f ms (render %s, plan %s, apply %s; %d services, %d endpoint entries)",
            "full" if full else "partial", result.commands, elapsed * 1000, render, plan, apply,
            result.services, result.endpoints,
        )
        if result.stale:
            try:
                deleted = await asyncio.to_thread(conntrack.clear, list(result.stale))
                self.metrics.conntrack_deleted.inc(deleted)
                log.info("deleted %d stale conntrack entries for %d endpoints", deleted, len(result.stale))
            except Exception as error:  # the rules are live; a cleanup failure must not fail the sync
                log.warning("conntrack cleanup failed: %s", error)
        return True

    async def _watch_files(self) -> None:
        async for changed in self.source.watch():
            self.metrics.service_changes.inc(len(changed))
            self.changed(f"{len(changed)} services")

    def _node_changed(self, node: NodeInfo | None) -> None:
        asyncio.get_running_loop().create_task(self._refresh_after_node())

    async def _refresh_after_node(self) -> None:
        if await self.refresh_node_ips():
            self.changed("node object")

    async def _watch_addresses(self) -> None:
        async for _ in addresses.address_changes():
            if await self.refresh_node_ips():
                self.changed("node addresses")

    async def run(self) -> None:
        if self.options.kube is not None:
            await self.source.connect()  # a configuration that does not load is a usage error
        await self.refresh_node_ips()
        # Watch before the first read: an edit made while we read then has an event.
        watcher = asyncio.create_task(self._watch_files())
        await asyncio.sleep(0)  # the watcher task sets its inotify watches up to its first await
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if self.userspace is not None:
            await self.userspace.start()
        else:
            await asyncio.to_thread(remove_queue_rules)  # left by a userspace run before this one
        servers = [
            await http.serve(self.options.healthz_bind, {"/healthz": self.health.report, "/livez": self.health.report}),
            await http.serve(self.options.metrics_bind, {"/metrics": self._metrics, "/status": self._status}),
        ]
        ready = True
        if self.options.kube is not None:
            # No sync before the first lists are in: an empty store would wipe the rules a
            # previous run left, and /healthz must not pass before the cluster is programmed.
            ready = await self._wait_synced(watcher, stop)
        else:
            self.source.load_all()
        if ready:
            self.changed("start")
        if self.dns is not None:
            await self.dns.start()
        runners = (self.loop.run(), self._watch_addresses()) if ready else ()
        tasks = [watcher, *(asyncio.create_task(c) for c in runners)]
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks + [stopper]:
            task.cancel()
        for server in servers:
            server.close()
        if self.userspace is not None:
            self.userspace.close()  # the queues unbind: new flows take the kernel's pick until the next start
        self.health_checks.close()
        if self.dns is not None:
            await self.dns.close()
        for task in done:
            if task is not stopper and task.exception():
                raise task.exception()
        log.info("stopping; rules stay in place")

    async def _wait_synced(self, watcher: asyncio.Task, stop: asyncio.Event) -> bool:
        """Waits for the source's first lists; False when stopped (or the watcher died) first."""
        synced = asyncio.create_task(self.source.synced.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([synced, stopped, watcher], return_when=asyncio.FIRST_COMPLETED)
        synced.cancel()
        stopped.cancel()
        return self.source.synced.is_set() and not stop.is_set()

    def _metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)

    def _status(self) -> tuple[int, str, bytes]:
        """`dataplane status` reads this: the mode, each Service port's path (a kernel balancing table,
        the forwarder, the kernel's random pick: nat/tables.balancing_paths), and in userspace mode
        each Service port's balancing."""
        paths = [p for state in self.proxier.programmed for p in balancing_paths(state.ruleset)]
        if self.userspace is not None:
            code, kind, body = self.userspace.status()
            merged = {**json.loads(body), "paths": paths}
            return code, kind, (json.dumps(merged, indent=1) + "\n").encode()
        return 200, "application/json", (json.dumps({"mode": "kernel", "services": [], "paths": paths}) + "\n").encode()
