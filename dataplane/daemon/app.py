"""The daemon: sources feed the store, the sync loop programs the kernel.

Everything runs on one asyncio (uvloop) event loop; the blocking nftables
and conntrack calls run in a worker thread so probes stay answered while a
large sync is in flight (a partial sync of a few Services, about a
millisecond, runs on the loop: the hand-offs would cost more). On SIGTERM/SIGINT the daemon exits and leaves its
rules in place: traffic keeps flowing until the next start adopts them.
"""

from __future__ import annotations

import asyncio
import ctypes
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
from ..model import Snapshot
from ..nat.nftables import NftError, Nftables
from ..nat.xtables import XtablesError
from ..nat.tables import balancing_paths
from ..netlink import addresses, conntrack
from ..sync.manifests import ManifestSource
from ..sync.reader import Limits
from ..sync.store import Store
from . import http, status
from .healthcheck import HealthCheckServers, ProxyHealth
from .metrics import DnsMetrics, Metrics
from .proxier import Proxier, SyncResult
from .userspace import UserspaceMode, remove_queue_rules
from .userspace_metrics import UserspaceCollector
from .schedule import Schedule, SyncLoop

if TYPE_CHECKING:  # kubernetes_asyncio costs ~40 MB: imported only with --source kube
    from ..sync.kube import ApiSettings, NodeInfo

log = logging.getLogger("dataplane")

# A partial sync of at most this many changed Services, holding at most this many backends before
# and after, runs on the event loop itself (about 1 ms for one Service of 10 endpoints, 9 ms for
# 1,000 backends, 130 ms for 10,000); larger ones, and every full sync, run in a worker thread so
# probes and DNS stay answered.
INLINE_SYNC_CHANGES = 20
INLINE_SYNC_BACKENDS = 500
# While the manifests first load, the Services read so far are rendered whenever the parser process
# is behind (the daemon would only wait for it), at most once per this many files: each pass copies
# the store's and the builders' maps whole.
RENDER_AHEAD_FILES = 1000


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
    queues: int | None = None  # userspace: NFQUEUE queues; None: one per CPU, fanned out by CPU
    forwarder_cpus: tuple[int, ...] | None = None  # userspace: CPUs of the forwarders by hand; None: their queue's
    busy_poll: float = 0.0  # userspace: seconds a forwarder spins after a batch
    forwarder_loop: str = "blocking"  # userspace workers: packets read by a blocking thread, or "event": the loop
    lb_algorithm: str = "random"  # userspace: for Services without a dataplane.io/lb-algorithm annotation
    kube: ApiSettings | None = None  # set: the Kubernetes API is the source (`--source kube`), not `source`
    allow_links: bool = False  # follow symlinks out of the manifest folder (`--allow-links`)
    # kube-proxy's (issue 12): --bind-address as the primary node IP; a bind failure fatal or not; gates
    primary_ip: str = ""
    bind_hard_fail: bool = False
    feature_gates: dict | None = None


def _small_change(previous: Snapshot, snapshot: Snapshot) -> bool:
    """True when `snapshot` differs from `previous` in few Services of few backends (see INLINE_SYNC_*)."""
    if not snapshot.follows(previous) or len(snapshot.changed) > INLINE_SYNC_CHANGES:
        return False
    backends = sum(len(port_backends) for key in snapshot.changed
                   for state in (previous.services.get(key), snapshot.services.get(key)) if state is not None
                   for port_backends in state.backends)
    return backends <= INLINE_SYNC_BACKENDS


def _release_free_heap() -> None:
    """Hands the C heap's free pages back to the kernel (glibc's malloc_trim). Loading leaves holes
    where each file's decoded documents were; left resident, they add to the first sync's peak
    (VmHWM 3.5 MB lower with this at 10,000 Services; it takes 9 ms)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to hand back this way


class Health:
    """kube-proxy's healthz, stricter: not healthy before the first sync is live, nor after a failed one.

    Everything it reports comes from the sync schedule (monotonic clock):
    whether the last sync failed, when one last succeeded, and the oldest
    change not yet programmed, unhealthy once older than `stale_after`.
    """

    def __init__(self, schedule: Schedule, stale_after: float = 30.0, clock=time.monotonic, wall=time.time):
        self.schedule = schedule
        self.stale_after = stale_after
        self.clock = clock  # the schedule's clock
        self.wall = wall

    def healthy(self) -> bool:
        schedule, now = self.schedule, self.clock()
        overdue = schedule.pending_since is not None and now - schedule.pending_since > self.stale_after
        return schedule.last_ok is not None and not schedule.failed and not overdue

    def last_updated(self) -> float | None:
        """Wall time of the last sync that succeeded, or None."""
        last = self.schedule.last_ok
        return None if last is None else self.wall() - (self.clock() - last)

    def report(self) -> tuple[int, str, bytes]:
        now, wall = self.clock(), self.wall()
        healthy = self.healthy()

        def as_wall(stamp: float | None) -> float | None:  # the schedule's stamps are monotonic
            return None if stamp is None else wall - (now - stamp)

        body = {
            "lastUpdated": _iso(as_wall(self.schedule.last_ok)),
            "currentTime": _iso(wall),
            "nodeEligible": healthy,
            "pendingSince": _iso(as_wall(self.schedule.pending_since)),
        }
        return (200 if healthy else 503), "application/json", (json.dumps(body) + "\n").encode()


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


class Daemon:
    """`userspace`: the userspace mode to use (tests build their own); None builds one for --proxy-mode userspace."""

    def __init__(self, options: Options, nft: Nftables, userspace: UserspaceMode | None = None):
        self.options = options
        self.store = Store()
        self.metrics = Metrics(feature_gates=options.feature_gates)
        if options.kube is not None:
            from ..sync.kube import KubeSource

            self.source = KubeSource(options.kube, self.store, options.settings.node_name,
                                     registry=self.metrics.registry, on_node=self._node_changed)
        else:
            self.source = ManifestSource(options.source, self.store, Limits(allow_links=options.allow_links))
        if options.kube is not None:
            self.source.on_endpoint_slice = self.metrics.triggers.record
        self.proxier = Proxier(options.settings, nft)
        if userspace is None and options.proxy_mode == "userspace":
            userspace = UserspaceMode(options.settings, nft, options.queues, options.lb_algorithm,
                                      pinned=options.forwarder_cpus, busy_poll=options.busy_poll,
                                      loop=options.forwarder_loop)
        self.userspace = userspace
        if userspace is not None:
            self.proxier.extend = userspace.extend
            self.metrics.registry.register(UserspaceCollector(userspace))
        self.node_ips: tuple[str, ...] = ()
        self._probed_ips: tuple[str, ...] | None = None  # the node addresses health_checks were last given
        self._collector_off = False  # load_manifests() turned the cyclic collector off until the first sync ends
        self._rendered_ahead: Snapshot | None = None  # what load_manifests() rendered; the first sync follows it
        self._rendered_at: float = 0  # files read when it was taken
        self.health_checks = HealthCheckServers(options.settings.node_name, healthy=lambda: self.health.healthy())
        self.dns = None
        if options.dns_bind:
            from ..dns import DnsServer, parse_list  # dnspython: 50 ms of the start, for a daemon that serves DNS

            self.dns = DnsServer(options.dns_bind, options.cluster_domain, options.dns_ttl,
                                 parse_list(options.dns_upstream) or None)
        if self.dns is not None:
            DnsMetrics(self.metrics.registry).attach(self.dns)
        self.loop = SyncLoop(
            Schedule(min_interval=options.min_sync_period, full_interval=options.sync_period), self._sync,
            failed=self._sync_failed,
        )
        self.health = Health(self.loop.schedule, clock=self.loop.clock)
        # kube-proxy's /healthz and /livez around Health's verdict (issue 12).
        self.proxy_health = ProxyHealth(lambda: (self.health.healthy(), self.health.last_updated()),
                                        self.metrics.healthz, self.metrics.livez)

    async def refresh_node_ips(self) -> bool:
        # pyroute2 runs an event loop of its own: keep it off ours.
        found, primary = await asyncio.to_thread(addresses.node_addresses)
        node = getattr(self.source, "node", None)
        if node is not None and node.primary_ip in found:
            primary = node.primary_ip  # the Node object's InternalIP, as kube-proxy takes it
        if self.options.primary_ip:
            primary = self.options.primary_ip  # --bind-address overrides it, as in kube-proxy
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
        self.metrics.queued()
        self.loop.request()

    async def _sync(self, full: bool) -> None:
        """Programs the store's snapshot; raises whatever failed (the SyncLoop then calls `_sync_failed`)."""
        try:
            await self._sync_snapshot(full)
        finally:
            self._rendered_ahead = None
            if self._collector_off:  # the first sync, done or failed: see load_manifests()
                self._collector_off = False
                gc.enable()

    async def _sync_snapshot(self, full: bool) -> None:
        snapshot = self.store.snapshot()
        previous = self.proxier.synced
        pending_mono = self.loop.schedule.pending_since
        started = time.perf_counter()
        triggers = self.metrics.triggers.checkout()
        try:
            if not full and _small_change(previous, snapshot):
                result = self._program(snapshot, full)  # a millisecond: the thread hand-offs cost half as much again
            else:
                result = await asyncio.to_thread(self._program, snapshot, full)
        except BaseException:
            self.metrics.triggers.restore(triggers)  # still owed: measured when a later sync programs them
            raise
        elapsed = time.perf_counter() - started
        # The rules are live: said first, and everything after is kept to the Services that changed.
        render, plan, apply = (round(s * 1000, 1) for s in result.seconds)
        log.info(
            "%s sync: %d commands in %.1f ms (%s; %d services, %d endpoint entries)",
            "full" if full else "partial", result.commands, elapsed * 1000,
            "nothing changed here or in the kernel since the last sync: nothing sent" if result.verified
            else f"render {render}, plan {plan}, apply {apply}", result.services, result.endpoints,
            extra={"verified": result.verified, "full": full, "commands": result.commands, "ms": round(elapsed * 1000, 1), "render_ms": render,
                   "plan_ms": plan, "apply_ms": apply, "services": result.services,
                   "endpoints": result.endpoints},
        )
        self.metrics.synced(elapsed, full, snapshot, self.options.settings.node_name, result.verified)
        self.metrics.programmed(triggers)
        self.metrics.changes.synced(self.store.state, snapshot)
        if pending_mono is not None:
            self.metrics.change_latency.observe(self.loop.clock() - pending_mono)
        self.metrics.services.set(result.services)
        self.metrics.endpoints.set(result.endpoints)
        self.metrics.invalid_objects.set(self.store.problem_count())  # what source.errors sums, without the walk
        if self.loop.schedule.last_ok is None:  # the first sync to succeed
            # Everything loaded so far lives as long as the daemon: keep the collector from
            # walking it again and again (it stalled the loop 150 ms per pass at 10k Services).
            # No collection first: a pass over the whole heap held /healthz back by a second at
            # 10k Services, and loading and syncing leave next to no cyclic garbage to free.
            gc.freeze()
        if self.userspace is not None:
            self.userspace.synced(snapshot)  # only now: the endpoint ids it names are in the kernel
        if self.dns is not None:
            # After the rules are live, so that a name never resolves to a ClusterIP that does not work yet.
            self.dns.publish(snapshot)
        if self._probes_may_change(previous, snapshot):
            await self.health_checks.update(snapshot, self.node_ips)
            self._probed_ips = self.node_ips
        if result.stale:
            try:
                cleared = time.perf_counter()
                deleted = await asyncio.to_thread(conntrack.clear, list(result.stale))
                self.metrics.conntrack_deleted.inc(deleted)
                self.metrics.conntrack_cleared(deleted, time.perf_counter() - cleared, result.stale)
                log.info("deleted %d stale conntrack entries for %d endpoints", deleted, len(result.stale))
            except Exception as error:  # the rules are live; a cleanup failure must not fail the sync
                log.warning("conntrack cleanup failed: %s", error)

    def load_manifests(self) -> None:
        """The first load of the manifest folder, before the first sync. What the daemon would spend
        waiting for the parser process goes to rendering the Services read so far (`_render_ahead`)."""
        # The cyclic collector stays off until the first sync is over (`_sync`; it freezes what
        # loaded first). Loading and the sync pause it anyway; enabled in between, its first pass
        # walked every object just loaded (0.14 s at 10,000 Services), and the next every object
        # the sync allocated, all of it before /healthz could pass.
        self._collector_off = gc.isenabled()
        gc.disable()
        self.source.load_all(idle=self._render_ahead)
        _release_free_heap()

    def _render_ahead(self, files: int) -> None:
        """Renders the store as loaded so far. The builders keep each Service's fragment and render
        again only the Services a later snapshot names as changed, so the first sync, whose snapshot
        follows this one, renders only what loaded after it: the same ruleset, sooner."""
        if files - self._rendered_at < RENDER_AHEAD_FILES:
            return
        self._rendered_at = files
        snapshot = self.store.snapshot()
        try:
            for builder in self.proxier.builders:
                builder.build(snapshot, self.node_ips)
        except Exception as error:  # a bug: the first sync, rendering everything again, meets it and says so
            log.warning("rendering ahead of the first sync failed (%s); it renders everything", error)
            self._rendered_at, self._rendered_ahead = float("inf"), None
            return
        self._rendered_ahead = snapshot  # the builders hold it weakly; the first sync's must follow it

    def _probes_may_change(self, previous: Snapshot, snapshot: Snapshot) -> bool:
        """False when no Service that has or had a healthCheckNodePort changed, nor the node addresses,
        and every port is bound: building the probes walks (and sorts) every Service."""
        if not snapshot.follows(previous) or self.node_ips != self._probed_ips or self.health_checks.unbound:
            return True
        return any(state is not None and state.service.health_check_node_port is not None
                   for key in snapshot.changed for state in (previous.services.get(key), snapshot.services.get(key)))

    def _program(self, snapshot: Snapshot, full: bool) -> SyncResult:
        """The sync thread's part: the kernel's rules, then, on full syncs, userspace mode's queue rules
        (repaired if someone flushed iptables' mangle table). The rules go first: should iptables
        refuse, Services still work, on the kernel's own pick, while the sync counts as failed."""
        result = self.proxier.sync(snapshot, self.node_ips, full)
        if full and self.userspace is not None:
            self.userspace.ensure_queue_rules()
        return result

    def _sync_failed(self, error: Exception) -> None:
        """Every failed sync, whatever raised: counted, logged; health is 503 from the schedule until one succeeds."""
        self.metrics.sync_failed()
        if isinstance(error, (NftError, XtablesError, OverflowError)):
            log.error("sync failed, a full sync follows: %s", error)
        else:  # a bug: its traceback is what it takes to fix it
            log.error("sync failed, a full sync follows", exc_info=error)

    async def _watch_files(self) -> None:
        async for changed in self.source.watch():
            self.metrics.changes.changed(changed, self.store.state, self.proxier.synced)
            self.changed(f"{len(changed)} services")

    def _node_changed(self, node: NodeInfo | None) -> None:
        self.proxy_health.sync_node(node)
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
        servers = [server for server in (
            await self._serve(self.options.healthz_bind, {"/healthz": self.proxy_health.healthz,
                                                          "/livez": self.proxy_health.livez}),
            await self._serve(self.options.metrics_bind, {"/metrics": self._metrics, "/status": self._status}),
        ) if server is not None]
        ready = True
        if self.options.kube is not None:
            # No sync before the first lists are in: an empty store would wipe the rules a
            # previous run left, and /healthz must not pass before the cluster is programmed.
            ready = await self._wait_synced(watcher, stop)
        else:
            self.load_manifests()
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

    async def _serve(self, bind: str, routes) -> asyncio.AbstractServer | None:
        """A server on `bind` ("" : off). A bind failure is fatal only with --bind-address-hard-fail (kube-proxy)."""
        if not bind:
            return None
        try:
            return await http.serve(bind, routes)
        except OSError as error:
            if self.options.bind_hard_fail:
                raise
            log.error("cannot serve %s on %s: %s (going on without it; --bind-address-hard-fail makes this fatal)",
                      ", ".join(routes), bind, error)
            return None

    async def _wait_synced(self, watcher: asyncio.Task, stop: asyncio.Event) -> bool:
        """Waits for the source's first lists; False when stopped (or the watcher died) first."""
        synced = asyncio.create_task(self.source.synced.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([synced, stopped, watcher], return_when=asyncio.FIRST_COMPLETED)
        synced.cancel()
        stopped.cancel()
        return self.source.synced.is_set() and not stop.is_set()

    async def _metrics(self) -> tuple[int, str, bytes]:
        if self.userspace is not None:
            await self.userspace.refresh_counters()  # nft runs in a thread, never on this loop
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)

    async def _status(self) -> tuple[int, str, bytes]:
        """`dataplane status` reads this: the mode, each Service port's path (a kernel balancing table,
        the forwarder, the kernel's random pick: nat/tables.balancing_paths), and in userspace mode
        each Service port's balancing."""
        paths = [p for state in self.proxier.programmed for p in balancing_paths(state.ruleset)]
        if self.userspace is not None:
            await self.userspace.refresh_counters()
            body = {**status.body(self.userspace), "paths": paths}
            return 200, "application/json", (json.dumps(body, indent=1) + "\n").encode()
        body = status.kernel_status(self.proxier.synced, self.options.settings.node_name, self.metrics.figures())
        return status.answer({**body, "paths": paths})
