"""`dataplane cleanup --kube-proxy` in a network namespace: kube-proxy's leftovers go, nothing else does.

The namespace gets what kube-proxy's three modes leave (nftables `kube-proxy`
tables in ip and ip6; iptables chains and jumps through both the legacy and
the nft backends, each in IPv4 and IPv6), plus a foreign nftables table and foreign
iptables chains and rules, and kubelet's KUBE-FIREWALL, which must survive.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataplane.lab import environment_problem
from dataplane.lab.daemon import dataplane_executable
from dataplane.lab.netns import Netns

PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]

NFT_LEFTOVERS = """
table ip kube-proxy { chain services { }; }
table ip6 kube-proxy { chain services { }; }
table ip foreign { chain keep { type filter hook input priority 0; policy accept; counter; }; }
"""
IPTABLES_LEFTOVERS = {
    "iptables-legacy": """*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABCDEF - [0:0]
:KUBE-SEP-123456 - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:FOREIGN-NAT - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-ABCDEF
-A KUBE-SVC-ABCDEF -j KUBE-SEP-123456
-A KUBE-SEP-123456 -p tcp -m tcp -j DNAT --to-destination 10.244.1.11:6443
-A FOREIGN-NAT -j RETURN
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -s 10.0.0.0/8 -j ACCEPT
COMMIT
""",
    "iptables-nft": """*mangle
:KUBE-PROXY-CANARY - [0:0]
:FOREIGN-MANGLE - [0:0]
-A PREROUTING -j FOREIGN-MANGLE
COMMIT
*filter
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -p tcp --dport 22 -j ACCEPT
COMMIT
""",
    "ip6tables-legacy": """*mangle
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:FOREIGN6 - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -j FOREIGN6
COMMIT
""",
    "ip6tables-nft": """*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XYZ - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A KUBE-SERVICES -j KUBE-SVC-XYZ
COMMIT
""",
}


@pytest.fixture
def ns():
    namespace = Netns.create(f"dpkpclean-{os.getpid()}")
    try:
        yield namespace
    finally:
        namespace.delete()


def saved(ns: Netns, tool: str) -> str:
    return ns.run(f"{tool}-save").stdout


KUBEADM = Path(__file__).resolve().parents[1] / "kubeproxy" / "kubeadm-config.conf"


@pytest.mark.parametrize("spelling", [
    ["cleanup", "--kube-proxy"], ["cleanup", "--cleanup"], ["--cleanup"], ["run", "--cleanup"],
    # as a kube-proxy init container runs it: its other flags are taken, and clean nothing else
    ["--cleanup=true", "--config", str(KUBEADM), "--hostname-override=node1", "--v=2", "--proxy-mode=iptables"],
], ids=["cleanup --kube-proxy", "cleanup --cleanup", "--cleanup", "run --cleanup", "kube-proxy's argv"])
def test_cleanup_removes_kube_proxys_leftovers_and_nothing_else(ns, spelling):
    ns.nft(NFT_LEFTOVERS)
    for tool, script in IPTABLES_LEFTOVERS.items():
        ns.run(f"{tool}-restore", "--noflush", input=script)
    done = ns.run(dataplane_executable(), *spelling, check=False)
    assert done.returncode == 0, done.stderr
    ruleset = ns.ruleset()
    assert "kube-proxy" not in ruleset
    assert "table ip foreign" in ruleset and "chain keep" in ruleset
    legacy, legacy6, nft4, nft6 = (saved(ns, t) for t in ("iptables-legacy", "ip6tables-legacy", "iptables-nft",
                                                          "ip6tables-nft"))
    for text in (legacy, legacy6, nft4, nft6):
        for gone in ("KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "KUBE-MARK-MASQ", "KUBE-POSTROUTING", "KUBE-FORWARD",
                     "KUBE-PROXY-CANARY", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS"):
            assert gone not in text, f"{gone} left:\n{text}"
    assert ":FOREIGN-NAT" in legacy and "-A FOREIGN-NAT -j RETURN" in legacy
    assert "-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE" in legacy
    assert "-A FORWARD -s 10.0.0.0/8 -j ACCEPT" in legacy
    assert ":KUBE-FIREWALL" in legacy and "-A INPUT -j KUBE-FIREWALL" in legacy  # kubelet's chain stays
    assert ":FOREIGN-MANGLE" in nft4 and "-A PREROUTING -j FOREIGN-MANGLE" in nft4
    assert "--dport 22 -j ACCEPT" in nft4
    assert ":FOREIGN6" in legacy6 and "-A FORWARD -j FOREIGN6" in legacy6
    assert "IPVS" in done.stderr  # probed, and said so
    again = ns.run(dataplane_executable(), *spelling, check=False)  # idempotent
    assert again.returncode == 0 and "nothing of kube-proxy's was found" in again.stderr


def test_cleanup_creates_no_table_where_there_was_none(ns):
    done = ns.run(dataplane_executable(), "cleanup", "--kube-proxy", check=False)
    assert done.returncode == 0, done.stderr
    assert ns.run("cat", "/proc/net/ip_tables_names").stdout.strip() == ""
    assert ns.ruleset().strip() == ""
