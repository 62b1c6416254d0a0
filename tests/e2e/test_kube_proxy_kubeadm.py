"""kubeadm's config.conf, byte for byte, starts `dataplane --config` (kube-proxy's command line) and serves.

The file names its kubeconfig at kubeadm's path, /var/lib/kube-proxy/kubeconfig.conf.
The daemon runs in a mount namespace of its own where a tmpfs covers /var/lib and
holds that kubeconfig (pointing at the stand-in API server): the host's /var/lib is
neither read nor changed.

Address plan: node1 192.168.50.1 (API server 127.0.0.1:6443 inside it); pods 10.244.1.11-13;
ClusterIP 10.96.7.10.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from dataplane.lab import Daemon, Lab, environment_problem, wait_until
from dataplane.lab.daemon import dataplane_executable
from dataplane.lab.kubeapi import kubeconfig
from dataplane.lab.manifests import endpoint_slice, port, service
from kube_lab import ALL, POD_IPS, answering, stand_in_api

PROBLEM = environment_problem() or (None if shutil.which("unshare") else "unshare is not installed")
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]

KUBEADM = Path(__file__).resolve().parents[1] / "kubeproxy" / "kubeadm-config.conf"


def test_kubeadms_config_conf_unchanged(tmp_path):
    (tmp_path / "kubeconfig.conf").write_text(kubeconfig("http://127.0.0.1:6443"))
    script = (
        "mount -t tmpfs dataplane-test /var/lib && mkdir /var/lib/kube-proxy && "
        f"cp {shlex.quote(str(tmp_path / 'kubeconfig.conf'))} /var/lib/kube-proxy/kubeconfig.conf && "
        # kube-proxy's DaemonSet command line, with the program's name changed
        f"exec {shlex.quote(dataplane_executable())} --config={shlex.quote(str(KUBEADM))} "
        "--hostname-override=node1"
    )
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    with Lab.build() as lab, stand_in_api(lab) as api:
        lab.start_echo(tcp=[80])
        api.apply(service("web", "10.96.7.10", [port("http", 80)]))
        api.apply(endpoint_slice("web", sorted(POD_IPS.values()), [("http", 80, "TCP")]))
        with Daemon(lab.node, tmp_path / "dataplane.log", argv) as daemon:
            wait_until(lambda: answering(lab, "10.96.7.10") == ALL, timeout=10,
                       what="the Service answers from all three Pods")
            log = daemon.log_text()
            assert "mode '': kernel mode" in log
            assert "is ignored" not in log  # kubeadm's zero values are not "set"
