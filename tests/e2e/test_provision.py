"""vagrant/provision.sh as CI runs it: --netns PREFIX, twice, on this Debian machine.

The script installs the project into /opt/dataplane, the unit and the demo
manifests, then (systemd is not PID 1 here) starts the unit's ExecStart
inside the node namespace it made. Everything network-related lives in the
namespaces PREFIXnode, PREFIXclient, PREFIXpod1..3; `--remove` deletes them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dataplane.lab import environment_problem
from dataplane.lab.netns import delete_netns, list_netns

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "vagrant" / "provision.sh"
PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]


def provision(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def test_provisioning_is_idempotent_and_leaves_a_healthy_dataplane_answering_the_demo():
    prefix = f"dpprov-{os.getpid()}-"
    try:
        first = provision("--netns", prefix)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "systemd is not PID 1 here: starting the unit's ExecStart myself" in first.stdout
        exec_start = next(line.split("=", 1)[1] for line in Path("/etc/systemd/system/dataplane.service")
                          .read_text().splitlines() if line.startswith("ExecStart="))
        assert exec_start in first.stdout
        answered = re.findall(r"answered by (pod\d)", first.stdout)
        assert len(answered) >= 3 and set(answered) <= {"pod1", "pod2", "pod3"}, first.stdout

        pid = int(Path(f"/run/dataplane-{prefix}node.pid").read_text())
        assert Path(f"/proc/{pid}").exists()
        cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        assert cmdline.endswith(exec_start)

        second = provision("--netns", prefix)
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"already running (pid {pid}), nothing changed" in second.stdout
        assert "installing" not in second.stdout
        assert re.search(r"answered by pod\d", second.stdout)

        health = subprocess.run(["ip", "netns", "exec", f"{prefix}node", "curl", "-sf",
                                 "http://127.0.0.1:10256/healthz"], capture_output=True, text=True)
        assert health.returncode == 0 and '"nodeEligible": true' in health.stdout

        if shutil.which("systemd-analyze"):
            verify = subprocess.run(["systemd-analyze", "verify", "/etc/systemd/system/dataplane.service"],
                                    capture_output=True, text=True)
            assert verify.returncode == 0, verify.stderr
            assert "dataplane.service" not in verify.stderr, verify.stderr
    finally:
        removed = provision("--netns", prefix, "--remove")
        for name in list_netns():
            if name.startswith(prefix):
                delete_netns(name)
    assert removed.returncode == 0, removed.stderr
    assert not [name for name in list_netns() if name.startswith(prefix)]


def test_the_script_refuses_to_guess_where_the_node_is():
    done = provision()
    assert done.returncode == 2
    assert "--host" in done.stderr and "--netns" in done.stderr
