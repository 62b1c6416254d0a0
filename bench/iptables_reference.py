"""The yardstick: a cluster laid out as kube-proxy's iptables mode lays it out.

`render(specs)` is a pure function from the harness's `ServiceSpec`s to the
text `iptables-restore` reads; `load(ns, text)` feeds it to
`iptables-nft-restore` inside a namespace the harness made and returns how
long that took. Written from kube-proxy's documented and observable layout
(its `iptables-save` output), not from its code:

    nat PREROUTING, OUTPUT --> KUBE-SERVICES       one rule per Service port, in order:
                                 -d ClusterIP -p proto --dport port -j KUBE-SVC-<hash>
                                 ... (the measured Service last: the worst case of the walk)
                                 addrtype LOCAL -j KUBE-NODEPORTS
    KUBE-SVC-<hash>:  ! -s cluster CIDR ... -j KUBE-MARK-MASQ
                      -m statistic --mode random --probability 1/n     -j KUBE-SEP-<hash>
                      -m statistic --mode random --probability 1/(n-1) -j KUBE-SEP-<hash>
                      ...                                              -j KUBE-SEP-<hash>  (last: no statistic)
    KUBE-SEP-<hash>:  -s endpoint -j KUBE-MARK-MASQ;  -p proto -j DNAT --to-destination endpoint:port
    nat POSTROUTING --> KUBE-POSTROUTING: masquerade what KUBE-MARK-MASQ marked (0x4000)
    filter FORWARD  --> KUBE-FORWARD (INVALID drop, marked accept, RELATED/ESTABLISHED accept),
                        ctstate NEW -> KUBE-SERVICES, KUBE-EXTERNAL-SERVICES (empty: every Service has endpoints)

A new connection therefore walks KUBE-SERVICES rule by rule until its Service
matches: the cost kube-proxy's nftables mode and this project's verdict maps
avoid.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable

from .manifests import ServiceSpec

MASQ_MARK = "0x4000"
RESTORE = "iptables-nft-restore"


def _chain(prefix: str, *parts: str) -> str:
    """A chain name as kube-proxy forms them: prefix + 16 base32 characters of a SHA-256."""
    digest = hashlib.sha256("".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def render(specs: Iterable[ServiceSpec], cluster_cidr: str | None = None) -> str:
    """The iptables-restore text (filter and nat tables) for `specs`, in their order."""
    nat_chains = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    services, svc_rules, sep_rules = [], [], []
    for spec in specs:
        for port in spec.ports:
            name = f"{spec.namespace}/{spec.name}:{port.name}"
            proto = port.protocol.lower()
            svc = _chain("KUBE-SVC-", name, proto)
            nat_chains.append(svc)
            match = f"-p {proto} -m {proto} -d {spec.cluster_ip} --dport {port.port}"
            services.append(f'-A KUBE-SERVICES -m comment --comment "{name} cluster IP" {match} -j {svc}')
            if cluster_cidr:
                svc_rules.append(f'-A {svc} -m comment --comment "{name} cluster IP" {match} ! -s {cluster_cidr} '
                                 "-j KUBE-MARK-MASQ")
            count = len(spec.endpoints)
            for k, (ip, _) in enumerate(spec.endpoints):
                target = f"{ip}:{port.target_port}"
                sep = _chain("KUBE-SEP-", name, proto, target)
                nat_chains.append(sep)
                statistic = (f" -m statistic --mode random --probability {1.0 / (count - k):0.10f}"
                             if k < count - 1 else "")
                svc_rules.append(f'-A {svc} -m comment --comment "{name} -> {target}"{statistic} -j {sep}')
                sep_rules.append(f"-A {sep} -m comment --comment {name} -s {ip} -j KUBE-MARK-MASQ")
                sep_rules.append(f"-A {sep} -m comment --comment {name} -p {proto} -m {proto} "
                                 f"-j DNAT --to-destination {target}")
    lines = [
        "*filter",
        ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]", ":KUBE-EXTERNAL-SERVICES - [0:0]", ":KUBE-FORWARD - [0:0]",
        ":KUBE-NODEPORTS - [0:0]", ":KUBE-PROXY-FIREWALL - [0:0]",
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" '
        "-j KUBE-EXTERNAL-SERVICES",
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" '
        "-j KUBE-EXTERNAL-SERVICES",
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK}/{MASQ_MARK} '
        "-j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
        "*nat",
        ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]",
        *(f":{chain} - [0:0]" for chain in nat_chains),
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
        *services,
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in '
        'this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        *svc_rules,
        *sep_rules,
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def rule_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


def load(ns, text: str, timeout: float = 1800.0) -> float:
    """Loads `text` with iptables-nft-restore inside `ns` (a Netns); returns the seconds it took.

    Raises NetnsError (with iptables' stderr) when the restore fails.
    """
    started = time.monotonic()
    ns.run(RESTORE, input=text, timeout=timeout)
    return time.monotonic() - started
