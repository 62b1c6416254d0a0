"""`dataplane cleanup --kube-proxy`: remove what kube-proxy left on this node, in any of its modes.

- nftables mode: the `kube-proxy` tables of the `ip` and `ip6` families (through `Nftables`).
- iptables and ipvs modes: kube-proxy's chains and the jumps to them in the nat, filter and mangle
  tables, for each backend present (iptables-legacy, iptables-nft; IPv4 and IPv6), through
  `nat/kube_proxy_xtables.py`. A table that does not exist is not created just to look.
- ipvs mode: IPVS is probed (/proc/net/ip_vs); its virtual servers and the kube-ipvs0 interface are
  reported, not removed (see the README: no kernel here has IPVS to test it on).

Nothing else is touched. Each step is independent: one failing is reported and the others run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..nat.kube_proxy_xtables import TABLES, Backend, XtablesCleanupError
from ..nat.nftables import NftError, Nftables

log = logging.getLogger(__name__)

KUBE_PROXY_TABLE = "kube-proxy"  # kube-proxy's nftables mode: `table ip kube-proxy`, `table ip6 kube-proxy`
IPTABLES_BACKENDS = (
    # (tool, family, where the legacy backend lists its tables; None: ask nftables)
    ("iptables-legacy", "ip", "net/ip_tables_names"),
    ("ip6tables-legacy", "ip6", "net/ip6_tables_names"),
    ("iptables-nft", "ip", None),
    ("ip6tables-nft", "ip6", None),
)


@dataclass
class Report:
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return ([f"removed {what}" for what in self.removed] or ["nothing of kube-proxy's was found"]) + \
            self.notes + [f"FAILED: {what}" for what in self.failures]


def nft_tables(nft: Nftables) -> set[tuple[str, str]]:
    """(family, name) of every nftables table."""
    found = set()
    for line in nft.run("list tables").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table":
            found.add((parts[1], parts[2]))
    return found


def remove_kube_proxy(nft: Nftables, proc: Path = Path("/proc")) -> Report:
    report = Report()
    try:
        tables = nft_tables(nft)
    except NftError as error:
        report.failures.append(f"listing nftables tables: {error}")
        tables = set()
    for family in ("ip", "ip6"):
        if (family, KUBE_PROXY_TABLE) in tables:
            try:
                nft.delete_table(family, KUBE_PROXY_TABLE)
                report.removed.append(f"nftables table {family} {KUBE_PROXY_TABLE}")
            except NftError as error:
                report.failures.append(f"nftables table {family} {KUBE_PROXY_TABLE}: {error}")
    for tool, family, legacy_names in IPTABLES_BACKENDS:
        backend = Backend(tool)
        if not backend.available():
            report.notes.append(f"{tool}: not installed, skipped")
            continue
        if legacy_names is not None:
            try:
                present = set((proc / legacy_names).read_text().split())
            except OSError:
                present = set()  # the x_tables module is not loaded: no legacy table exists
        else:
            present = {name for fam, name in tables if fam == family}
        existing = tuple(t for t in TABLES if t in present)
        try:
            for removed in backend.remove(existing):
                report.removed.append(f"{tool} {removed.table}: {len(removed.chains)} chains "
                                      f"({', '.join(removed.chains[:4])}{', ...' if len(removed.chains) > 4 else ''})"
                                      f" and {len(removed.jumps)} jumps to them")
        except XtablesCleanupError as error:
            report.failures.append(f"{tool}: {error}")
    report.notes.append(ipvs_probe(proc))
    return report


def ipvs_probe(proc: Path = Path("/proc")) -> str:
    ip_vs = proc / "net" / "ip_vs"
    if not ip_vs.exists():
        return "IPVS: not in this kernel (no /proc/net/ip_vs): no IPVS leftovers possible"
    try:
        services = [line for line in ip_vs.read_text().splitlines() if line.startswith(("TCP", "UDP", "SCTP"))]
    except OSError as error:
        return f"IPVS: present, unreadable ({error.strerror}); check with `ipvsadm -Ln`"
    return (f"IPVS: present with {len(services)} virtual servers; not removed automatically: check them with "
            "`ipvsadm -Ln`, then `ipvsadm --clear` and `ip link delete kube-ipvs0` if they are all kube-proxy's")
