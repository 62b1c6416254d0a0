"""`--proxy-mode userspace` in the daemon: probe, rules, forwarder, metrics and /status.

Order of a sync, so that the forwarder never names an endpoint the kernel
cannot DNAT to: the sync thread extends the rendered ruleset (`extend`:
endpoint ids, Service addresses to queue) and applies it; only once the
kernel accepted it does `synced()` hand the new tables to the balancer.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..config import NodeSettings
from ..lb.balancer import Balancer
from ..lb.policy import packed, port_tables
from ..model import Snapshot
from ..nat import layout
from ..nat.nftables import NftError, Nftables
from ..nat.ruleset import Ruleset
from ..nat.userspace import FAIL_OPEN, QueueSpec, UserspaceRules, probe_nft_queue
from ..nat.xtables import Xtables
from ..queue.forwarder import Forwarder
from ..queue.workers import WorkerPool, default_queue_count, forwarder_cpus
from ..queue.nfqueue import queue_stats

log = logging.getLogger(__name__)

FAMILIES = {"ip": 4, "ip6": 6}


def remove_queue_rules() -> None:
    """What kernel mode and `dataplane cleanup` do about userspace mode's iptables rules: remove them."""
    for family in (4, 6):
        Xtables(family).remove()


class UserspaceMode:
    def __init__(self, settings: NodeSettings, nft: Nftables, queues: int | None = None, algorithm: str = "random",
                 maglev_size: int = 65537, pinned: tuple[int, ...] | None = None, busy_poll: float = 0.0,
                 loop: str = "blocking"):
        """`queues` None: one per CPU, fanned out by CPU; `pinned`: forwarder CPUs by hand (workers.forwarder_cpus)."""
        self.nft = nft
        count = queues or default_queue_count()
        self.queue = QueueSpec(count=count, in_nft=probe_nft_queue(nft), fanout=count > 1)
        self._pinned = pinned
        self.rules = {family: UserspaceRules(settings, layout.Family(version), self.queue)
                      for family, version in FAMILIES.items()}
        self.algorithm = algorithm
        self.settings = settings
        numbers = tuple(range(self.queue.first, self.queue.last + 1))
        # --queues 1 by hand: decided on the daemon's own loop. Otherwise a process per queue, on its queue's CPU.
        self.forwarder = (Forwarder(numbers, Balancer(maglev_size), busy_poll=busy_poll) if queues == 1
                          else WorkerPool(numbers, maglev_size, busy_poll=busy_poll, loop=loop))
        self._seen: Snapshot | None = None
        self._fail_open = _CounterReader(nft)
        log.info("userspace mode: %d queue(s) via %s, default algorithm %s", count,
                 "nft queue" if self.queue.in_nft else "iptables NFQUEUE (this kernel has no nft queue)", algorithm)

    # the sync thread

    def extend(self, ruleset: Ruleset, snapshot: Snapshot) -> Ruleset:
        return self.rules[ruleset.family].extend(ruleset, snapshot)

    # the event loop

    async def start(self) -> None:
        """Installs the queue rule where nft has no `queue`, then binds the queues.

        With one queue the packet path runs in this process: it takes nice -10,
        as the worker processes of --queues N do (workers.py), so that new flows
        do not wait behind batch work on a busy node.
        """
        if not isinstance(self.forwarder, WorkerPool):
            try:
                os.setpriority(os.PRIO_PROCESS, 0, -10)
            except OSError:
                pass
        if not self.queue.in_nft:
            for family in (4, 6):
                xt = Xtables(family)
                if xt.available():
                    installed = xt.install_probing(self.queue)
                    if installed != self.queue:
                        log.warning("iptables refuses --queue-cpu-fanout here: the %d queues take new flows by "
                                    "address hash, and their forwarders are not pinned", self.queue.count)
                        self.queue = installed
        if isinstance(self.forwarder, WorkerPool):
            self.forwarder.place(forwarder_cpus(self.queue.count, self.queue.fanout,
                                                frozenset(os.sched_getaffinity(0)), self._pinned), self.queue.fanout)
        await self.forwarder.start()

    def synced(self, snapshot: Snapshot) -> None:
        """The kernel holds `snapshot`'s rules: tell the balancer about the Services that changed."""
        seen = self._seen
        keys = snapshot.changed_since(seen) if seen is not None else snapshot.services.keys()
        if seen is not None:
            keys = set(keys) | (seen.services.keys() - snapshot.services.keys())
        tables = {}
        for key in keys:
            state = snapshot.services.get(key)
            ports = []
            for family, version in FAMILIES.items():
                if state is not None:
                    found, problems = port_tables(state, self.rules[family].ids.get, self.algorithm, version,
                                                  self.settings.node_name, self.settings.node_zone)
                    ports += [p for p in found if p.addresses]
                    for problem in problems if version == 4 else ():
                        log.warning("%s", problem)
            tables[key] = tuple(ports)
        self._seen = snapshot
        if tables:
            self.forwarder.services_changed(tables)

    def node_addresses(self, ips: tuple[str, ...]) -> None:
        self.forwarder.node_addresses(tuple(packed(ip) for ip in ips))

    def close(self) -> None:
        self.forwarder.close()

    # observation

    def status(self) -> tuple[int, str, bytes]:
        snapshot = self.forwarder.snapshot()
        body = {
            "mode": "userspace",
            "queues": list(self.forwarder.queues),
            "queue_mechanism": "nft" if self.queue.in_nft else "iptables",
            "default_algorithm": self.algorithm,
            "packets_queued": snapshot["packets"],
            "packets_per_queue": snapshot["per_queue"],
            "undecided": snapshot["undecided"],
            "queue_fanout": self.queue.fanout,
            "forwarder_cpu_seconds": snapshot.get("cpu_seconds"),
            "forwarder_cpu_user_seconds": snapshot.get("cpu_user_seconds"),
            "fail_open": self._fail_open.read(),
            "services": snapshot["services"],
        }
        return 200, "application/json", (json.dumps(body, indent=1) + "\n").encode()

    def collector(self) -> "_Collector":
        return _Collector(self)


class _CounterReader:
    """The fail-open counter, summed over table re-creations (a full sync starts it at 0 again)."""

    def __init__(self, nft: Nftables):
        self.nft = nft
        self.base = {family: 0 for family in FAMILIES}
        self.last = {family: 0 for family in FAMILIES}

    def read(self) -> int:
        for family in FAMILIES:
            try:
                text = self.nft.run(f"list counter {family} {layout.TABLE} {FAIL_OPEN}")
            except NftError:
                continue
            match = re.search(r"packets (\d+)", text)
            value = int(match.group(1)) if match else 0
            if value < self.last[family]:
                self.base[family] += self.last[family]
            self.last[family] = value
        return sum(self.base.values()) + sum(self.last.values())


class _Collector:
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
                                  value=self.mode._fail_open.read())
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


def format_status(body: dict, out: Callable[[str], None] = print) -> None:
    """`dataplane status` as text: per Service port, its algorithm and endpoints with their flows."""
    per_queue = body.get("packets_per_queue") or {}
    per_queue = f" ({', '.join(f'queue {q}: {n}' for q, n in sorted(per_queue.items()))})" if len(per_queue) > 1 else ""
    out(f"mode {body.get('mode')}: queues {body.get('queues')} via {body.get('queue_mechanism')}, "
        f"default algorithm {body.get('default_algorithm')}; packets queued {body.get('packets_queued')}{per_queue}, "
        f"undecided {body.get('undecided')}, fail-open {body.get('fail_open')}")
    for service in body.get("services", []):
        affinity = service.get("affinity_timeout")
        extra = f", ClientIP affinity {affinity} s ({service['affinity_entries']} entries)" if affinity else ""
        out(f"{service['service']}  {service['algorithm']}{extra}")
        for endpoint in service["endpoints"]:
            out(f"    {endpoint['endpoint']:<24} weight {endpoint['weight']:<4} active {endpoint['active']:<6} "
                f"decided {endpoint['decided']}")
