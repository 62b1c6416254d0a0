"""`--proxy-mode userspace` in the daemon: the wiring of probe, rules, queue rules and forwarder.

Order of a sync, so that the forwarder never names an endpoint the kernel
cannot DNAT to: the sync thread extends the rendered ruleset (`extend`:
endpoint ids, Service addresses to queue) and applies it; only once the
kernel accepted it does `synced()` hand the new tables to the balancer.
What it shows lives elsewhere: /status in `status.py`, /metrics in
`userspace_metrics.py`, the fail-open counter's totals in `counters.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ..config import NodeSettings
from ..lb.balancer import Balancer
from ..lb.policy import PROTOCOL_NUMBERS, PortTable, packed, port_tables
from ..lb.tables import table_balanced
from ..model import Snapshot
from ..nat import layout
from ..nat.nftables import Nftables
from ..nat.ruleset import Ruleset
from ..nat.userspace import FAIL_OPEN, QueueSpec, UserspaceRules, probe_nft_queue
from ..nat.xtables import Xtables, XtablesError
from ..queue.forwarder import Forwarder
from ..queue.workers import WorkerPool, default_queue_count, forwarder_cpus
from .counters import CounterTotal

log = logging.getLogger(__name__)

FAMILIES = {"ip": 4, "ip6": 6}
PROTOCOL_NAMES = {number: protocol.value for protocol, number in PROTOCOL_NUMBERS.items()}


def remove_queue_rules() -> None:
    """What kernel mode and `dataplane cleanup` do about userspace mode's iptables rules: remove them."""
    for family in (4, 6):
        Xtables(family).remove()


class UserspaceMode:
    """`queues` None: one per CPU, fanned out by CPU; `pinned`: forwarder CPUs by hand (workers.forwarder_cpus);
    `queue_in_nft`: None probes the kernel; `xtables`: where the queue rule goes when nft has no `queue`."""

    def __init__(self, settings: NodeSettings, nft: Nftables, queues: int | None = None, algorithm: str = "random",
                 maglev_size: int = 65537, pinned: tuple[int, ...] | None = None, busy_poll: float = 0.0,
                 loop: str = "blocking", queue_in_nft: bool | None = None,
                 xtables: tuple[Xtables, ...] = (Xtables(4), Xtables(6))):
        self.nft = nft
        count = queues or default_queue_count()
        in_nft = probe_nft_queue(nft) if queue_in_nft is None else queue_in_nft
        self.queue = QueueSpec(count=count, in_nft=in_nft, fanout=count > 1)
        self.xtables = xtables
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
        # Service -> its ports balanced by kernel tables, not the forwarder's: for /status only.
        self.tabled: dict[object, tuple[PortTable, ...]] = {}
        self.fail_open = CounterTotal(FAIL_OPEN, tuple((family, layout.TABLE) for family in FAMILIES))
        log.info("userspace mode: %d queue(s) via %s, default algorithm %s", count,
                 "nft queue" if self.queue.in_nft else "iptables NFQUEUE (this kernel has no nft queue)", algorithm)

    # the sync thread

    def extend(self, ruleset: Ruleset, snapshot: Snapshot) -> Ruleset:
        return self.rules[ruleset.family].extend(ruleset, snapshot)

    def ensure_queue_rules(self) -> None:
        """Installs or repairs the iptables queue rule where nft has no `queue` (each full sync does).

        Raises XtablesError when iptables refuses, or is not there to ask: the
        sync fails, and so does /healthz, rather than new flows silently never
        reaching the forwarder.
        """
        if self.queue.in_nft:
            return
        for xt in self.xtables:
            if not xt.available():
                tool = "iptables" if xt.family == 4 else "ip6tables"
                raise XtablesError(f"this kernel has no nft queue and {tool} is not installed")
            xt.install(self.queue)

    # the event loop

    async def start(self) -> None:
        """Settles how packets reach the queues, places the forwarders, binds the queues.

        Where nft has no `queue`, iptables is asked for `--queue-cpu-fanout`
        first; a kernel that refuses it gets the queues by address hash and
        unpinned forwarders. The queue rule itself is (re)installed by every
        full sync (`ensure_queue_rules`), so an iptables failure fails a sync.
        With one queue the packet path runs in this process: it takes nice -10,
        as the worker processes do (workers.py), so that new flows do not wait
        behind batch work on a busy node.
        """
        if not isinstance(self.forwarder, WorkerPool):
            try:
                os.setpriority(os.PRIO_PROCESS, 0, -10)
            except OSError:
                pass
        if not self.queue.in_nft and self.queue.fanout:
            for xt in self.xtables:
                if not xt.available():
                    continue
                try:
                    installed = xt.install_probing(self.queue)
                except XtablesError as error:  # the first full sync reports it, and fails
                    log.warning("iptables queue rule: %s", error)
                    continue
                if installed != self.queue:
                    log.warning("iptables refuses --queue-cpu-fanout here: the %d queues take new flows by "
                                "address hash, and their forwarders are not pinned", self.queue.count)
                    self.queue = installed
        if isinstance(self.forwarder, WorkerPool):
            self.forwarder.place(forwarder_cpus(self.queue.count, self.queue.fanout,
                                                frozenset(os.sched_getaffinity(0)), self._pinned), self.queue.fanout)
        await self.forwarder.start()

    def synced(self, snapshot: Snapshot) -> None:
        """The kernel holds `snapshot`'s rules: tell the balancer about the Services that changed.

        Only the ports the kernel queues (nat/userspace.queued_ports): a port balanced by its kernel
        table (Maglev, weights) never reaches the forwarder, which so builds no table for it; a
        Maglev port without one (over the node's slot bound) is queued and decided here."""
        seen = self._seen
        keys = snapshot.changed_since(seen) if seen is not None else snapshot.services.keys()
        if seen is not None:
            keys = set(keys) | (seen.services.keys() - snapshot.services.keys())
        requeued = set().union(*(rules.take_requeued() for rules in self.rules.values()))
        if requeued:
            keys = set(keys) | requeued
        tables = {}
        for key in keys:
            state = snapshot.services.get(key)
            ports, tabled = [], []
            for family, version in FAMILIES.items():
                rules = self.rules[family]
                queued = rules.queued.get(key, frozenset())
                if state is not None:
                    found, problems = port_tables(state, rules.ids.get, self.algorithm, version,
                                                  self.settings.node_name, self.settings.node_zone)
                    for port in found:
                        if (PROTOCOL_NAMES[port.protocol], port.port) in queued:
                            ports.append(port)
                        elif table_balanced(state.service, self.algorithm):
                            tabled.append(port)
                    for problem in problems if version == 4 else ():
                        log.warning("%s", problem)
            tables[key] = tuple(ports)
            if tabled:
                self.tabled[key] = tuple(tabled)
            else:
                self.tabled.pop(key, None)
        self._seen = snapshot
        if tables:
            self.forwarder.services_changed(tables)

    def node_addresses(self, ips: tuple[str, ...]) -> None:
        self.forwarder.node_addresses(tuple(packed(ip) for ip in ips))

    def close(self) -> None:
        self.forwarder.close()

    # observation

    async def refresh_counters(self) -> None:
        """Reads the fail-open counter from nft in a thread: the forwarder may share this loop."""
        await asyncio.to_thread(self.fail_open.read, self.nft)

