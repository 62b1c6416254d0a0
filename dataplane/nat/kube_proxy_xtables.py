"""The one module that removes kube-proxy's iptables leftovers (its iptables and ipvs modes).

kube-proxy's chains are known by name (`owned()`): its fixed chains
(KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-MARK-MASQ, ...) and
its per-Service ones (KUBE-SVC-*, KUBE-SEP-*, KUBE-EXT-*, ...). Nothing else
is touched: kubelet's chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY,
KUBE-MARK-DROP) stay, as kube-proxy's own `--cleanup` leaves them, and so does
every other chain and rule.

`plan(saved)` is pure: from `iptables-save -t TABLE` text it returns the
`iptables-restore --noflush` script that deletes each rule jumping to a
kube-proxy chain from a chain that is not kube-proxy's, then flushes and
deletes kube-proxy's chains, in one atomic batch per table. `Backend` runs
the save and restore of one binary family (iptables-legacy, iptables-nft,
and their ip6tables twins).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

TABLES = ("nat", "filter", "mangle")
FIXED_CHAINS = frozenset({
    "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ",
    "KUBE-FORWARD", "KUBE-PROXY-FIREWALL", "KUBE-PROXY-CANARY",
    # ipvs mode's
    "KUBE-LOAD-BALANCER", "KUBE-NODE-PORT", "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER",
    "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-LOAD-BALANCER-LOCAL", "KUBE-LOAD-BALANCER-FW",
})
CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-", "KUBE-XLB-")
KUBELET_CHAINS = frozenset({"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-DROP"})  # kept


def owned(chain: str) -> bool:
    return chain in FIXED_CHAINS or chain.startswith(CHAIN_PREFIXES)


class XtablesCleanupError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class TablePlan:
    table: str
    jumps: tuple[str, ...]  # rules (as saved, "-A CHAIN ...") to delete
    chains: tuple[str, ...]  # kube-proxy's chains to flush and delete

    def script(self) -> str:
        lines = [f"*{self.table}"]
        lines += ["-D" + rule[2:] for rule in self.jumps]
        lines += [f"-F {chain}" for chain in self.chains]
        lines += [f"-X {chain}" for chain in self.chains]
        return "\n".join([*lines, "COMMIT"]) + "\n"

    def __bool__(self) -> bool:
        return bool(self.jumps or self.chains)


_TARGET = re.compile(r"(?:^|\s)-[jg]\s+(\S+)")


def plan(table: str, saved: str) -> TablePlan:
    """What to remove from one table, from its `iptables-save -t TABLE` text. Pure."""
    chains, jumps = [], []
    in_table = False
    for line in saved.splitlines():
        if line.startswith("*"):
            in_table = line[1:].strip() == table
        elif not in_table:
            continue
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if owned(name):
                chains.append(name)
        elif line.startswith("-A "):
            chain = line.split()[1]
            target = _TARGET.search(line)
            if not owned(chain) and target and owned(target.group(1)):
                jumps.append(line)
    return TablePlan(table, tuple(jumps), tuple(chains))


@dataclass(frozen=True, slots=True)
class Backend:
    """One binary family: `tool` is "iptables-legacy", "iptables-nft", "ip6tables-legacy" or "ip6tables-nft"."""

    tool: str
    wrap: tuple[str, ...] = ()  # prefixes the argv (e.g. `ip netns exec NS` in tests)

    def available(self) -> bool:
        return all(shutil.which(f"{self.tool}{suffix}") for suffix in ("-save", "-restore"))

    def save(self, table: str) -> str:
        return self._run([f"{self.tool}-save", "-t", table])

    def restore(self, script: str) -> None:
        self._run([f"{self.tool}-restore", "--noflush", "-w"], script)

    def _run(self, argv: list[str], text: str | None = None) -> str:
        done = subprocess.run([*self.wrap, *argv], input=text, capture_output=True, text=True)
        if done.returncode != 0:
            raise XtablesCleanupError(f"{shlex.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
        return done.stdout

    def remove(self, tables: tuple[str, ...]) -> list[TablePlan]:
        """Removes kube-proxy's chains and jumps from `tables` (those that exist: never creates one);
        returns what was removed. Raises XtablesCleanupError with the tool's message."""
        removed = []
        for table in tables:
            found = plan(table, self.save(table))
            if found:
                self.restore(found.script())
                removed.append(found)
        return removed
