"""Node tuning as kube-proxy does it at start: conntrack sysctls and the process's oom_score_adj.

`plan()` is pure: from kube-proxy's conntrack settings and the CPU count it
returns the writes kube-proxy would make, in its order and with its rules
(nf_conntrack_max = maxPerCore x CPUs, at least `min`, only when maxPerCore
> 0; a timeout only when > 0; tcp_be_liberal only when asked). `apply()`
writes each one whose current value differs, logging it; a read-only or
missing /proc/sys entry (a container without the right, a network namespace
where nf_conntrack_max is the host's) is a warning and the rest go on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NETFILTER = "net/netfilter"


@dataclass(frozen=True, slots=True)
class Conntrack:
    max_per_core: int = 32768  # kube-proxy's defaults
    min: int = 131072
    tcp_established_timeout: float = 86400.0
    tcp_close_wait_timeout: float = 3600.0
    tcp_be_liberal: bool = False
    udp_timeout: float = 0.0
    udp_stream_timeout: float = 0.0


HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"


@dataclass(frozen=True, slots=True)
class Write:
    path: str  # under /proc/sys, or absolute (the conntrack hash size, in /sys)
    value: int
    only_raise: bool = False  # written only when the current value is smaller


def plan(conntrack: Conntrack, cpus: int) -> list[Write]:
    writes = []
    if conntrack.max_per_core > 0:
        limit = max(conntrack.max_per_core * cpus, conntrack.min)
        writes.append(Write(f"{NETFILTER}/nf_conntrack_max", limit))
        writes.append(Write(HASHSIZE, limit // 4, only_raise=True))  # as kube-proxy: buckets for max/4
    for name, seconds in (("nf_conntrack_tcp_timeout_established", conntrack.tcp_established_timeout),
                          ("nf_conntrack_tcp_timeout_close_wait", conntrack.tcp_close_wait_timeout),
                          ("nf_conntrack_udp_timeout", conntrack.udp_timeout),
                          ("nf_conntrack_udp_timeout_stream", conntrack.udp_stream_timeout)):
        if seconds > 0:
            writes.append(Write(f"{NETFILTER}/{name}", int(seconds)))
    if conntrack.tcp_be_liberal:
        writes.append(Write(f"{NETFILTER}/nf_conntrack_tcp_be_liberal", 1))
    return writes


def apply(writes: list[Write], root: Path = Path("/proc/sys"), sys_root: Path = Path("/")) -> list[str]:
    """Makes the writes that change something; returns the warnings (never raises for a sysctl)."""
    warnings = []
    for write in writes:
        absolute = write.path.startswith("/")
        entry = sys_root / write.path.lstrip("/") if absolute else root / write.path
        name = write.path if absolute else write.path.replace("/", ".")
        try:
            current = entry.read_text().strip()
            if current == str(write.value) or (write.only_raise and current.isdigit()
                                               and int(current) >= write.value):
                continue
            entry.write_text(f"{write.value}\n")
            log.info("set sysctl %s to %d (was %s)", name, write.value, current,
                     extra={"sysctl": name, "value": write.value, "previous": current})
        except OSError as error:
            warning = f"cannot set sysctl {name} to {write.value}: {error.strerror or error}"
            log.warning("%s (a read-only /proc/sys: set it on the host, see deploy/README.md)", warning)
            warnings.append(warning)
    return warnings


def set_oom_score_adj(value: int, path: Path = Path("/proc/self/oom_score_adj")) -> str | None:
    """As kube-proxy: the process's oom_score_adj; returns a warning instead of raising."""
    try:
        if path.read_text().strip() != str(value):
            path.write_text(f"{value}\n")
            log.info("set oom_score_adj to %d", value, extra={"oom_score_adj": value})
    except OSError as error:
        warning = f"cannot set oom_score_adj to {value}: {error.strerror or error}"
        log.warning("%s", warning)
        return warning
    return None


def cpu_count() -> int:
    """CPUs this process may run on: kube-proxy counts the machine's, which is the same outside cgroups."""
    return os.cpu_count() or 1
