"""`python -m bench --quick` as CI runs it: a smoke test that the harness works, not a verdict on speed.

It builds its own namespaces (so it needs root), measures every available
path at 1 and 1,000 Services and the control plane at 1,000, and must leave
results.json, results.md and the PNG plots, well formed, and no namespace
behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.lab import environment_problem
from dataplane.lab.netns import list_netns

PROBLEM = environment_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(PROBLEM is not None, reason=f"namespace tests: {PROBLEM}")]
ROOT = Path(__file__).resolve().parents[2]


def test_quick_preset_writes_json_markdown_and_plots(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.terminate()  # the harness removes its namespaces on SIGTERM
            child.communicate(timeout=60)
    assert child.returncode == 0, stderr[-3000:]
    assert "round 3/3" in stderr  # progress is shown while it runs

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["command"].startswith("python -m bench --quick") and results["machine"]["cpus"]
    records = results["latency"]["records"]
    measured = {(r["path"], r["services"]) for r in records if r["mode"] == "tcp-crr" and r["latency_us"]}
    assert {("direct", None), ("kernel", 1), ("kernel", 1000), ("iptables-reference", 1),
            ("iptables-reference", 1000)} <= measured
    if "userspace" not in results["latency"]["unavailable"]:
        assert {("userspace", 1), ("userspace", 1000)} <= measured
    for record in records:
        assert record["failed"] == 0, record
        latency = record["latency_us"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"]
        if record["path"] != "direct":
            assert record["vs_direct"]["p50"] > 0
    control = results["control_plane"][0]
    assert control["services"] == 1000 and control["full_sync_s"] > 0 and control["iptables_restore_s"] > 0

    markdown = (tmp_path / "results.md").read_text()
    for heading in ("## New connections (headline)", "## Goals", "## Control plane", "## Plots"):
        assert heading in markdown
    assert results["plots"]
    for name in results["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in markdown

    # Others may be running labs on this machine: look only for this run's names.
    assert [n for n in list_netns() if f"-{child.pid}-" in n or n.endswith(f"-{child.pid}")] == []
