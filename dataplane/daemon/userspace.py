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
from ..lb.policy import packed, port_tables
from ..model import Snapshot
from ..nat import layout
from ..nat.nftables import Nftables
from ..nat.ruleset import Ruleset
from ..nat.userspace import FAIL_OPEN, QueueSpec, UserspaceRules, probe_nft_queue
from ..nat.xtables import Xtables, XtablesError
from ..queue.forwarder import Forwarder
from ..queue.workers import WorkerPool
from .counters import CounterTotal

log = logging.getLogger(__name__)

FAMILIES = {"ip": 4, "ip6": 6}


def remove_queue_rules() -> None:
    """What kernel mode and `dataplane cleanup` do about userspace mode's iptables rules: remove them."""
    for family in (4, 6):
        Xtables(family).remove()


class UserspaceMode:
    """`queue_in_nft`: None probes the kernel; `xtables`: where the queue rule goes when nft has no `queue`."""

    def __init__(self, settings: NodeSettings, nft: Nftables, queues: int = 1, algorithm: str = "random",
                 maglev_size: int = 65537, queue_in_nft: bool | None = None,
                 xtables: tuple[Xtables, ...] = (Xtables(4), Xtables(6))):
        self.nft = nft
        in_nft = probe_nft_queue(nft) if queue_in_nft is None else queue_in_nft
        self.queue = QueueSpec(count=queues, in_nft=in_nft)
        self.xtables = xtables
        self.rules = {family: UserspaceRules(settings, layout.Family(version), self.queue)
                      for family, version in FAMILIES.items()}
        self.algorithm = algorithm
        self.settings = settings
        numbers = tuple(range(self.queue.first, self.queue.last + 1))
        # One queue: decided on the daemon's own loop. More: a process per queue, to use every core.
        self.forwarder = Forwarder(numbers, Balancer(maglev_size)) if queues == 1 else WorkerPool(numbers, maglev_size)
        self._seen: Snapshot | None = None
        self.fail_open = CounterTotal(FAIL_OPEN, tuple((family, layout.TABLE) for family in FAMILIES))
        log.info("userspace mode: %d queue(s) via %s, default algorithm %s", queues,
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
        """Binds the queues (the first sync, a full one, installs the queue rules).

        With one queue the packet path runs in this process: it takes nice -10,
        as the worker processes of --queues N do (workers.py), so that new flows
        do not wait behind batch work on a busy node.
        """
        if self.queue.count == 1:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, -10)
            except OSError:
                pass
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

    async def refresh_counters(self) -> None:
        """Reads the fail-open counter from nft in a thread: the forwarder may share this loop."""
        await asyncio.to_thread(self.fail_open.read, self.nft)

