"""Golden rulesets: the rendered nft script for each manifest in tests/golden.

Regenerate after an intended change, then review the diff:
    UPDATE_GOLDEN=1 python3 -m pytest tests/unit/test_render_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataplane.config import NodeSettings
from dataplane.nat.plan import full
from dataplane.nat.render import render
from dataplane.sync.manifests import ManifestSource
from dataplane.sync.store import Store

GOLDEN = Path(__file__).parent.parent / "golden"

# Address plan: Pods 10.244.0.0/16, ClusterIPs 10.96.0.0/12, node 192.168.50.1.
CASES = {
    "basic": NodeSettings(node_name="node-a", cluster_cidrs=("10.244.0.0/16",)),
    "terminating": NodeSettings(node_name="node-a", masquerade_all=True),
}
NODE_IPS = ("192.168.50.1",)


def rendered(case: str) -> str:
    store = Store()
    ManifestSource(GOLDEN / f"{case}.yaml", store).load_all()
    transaction, _ = full(render(store.snapshot(), CASES[case], NODE_IPS))
    return str(transaction)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ruleset_matches_golden(case: str) -> None:
    expected_file = GOLDEN / f"{case}.nft"
    text = rendered(case)
    if os.environ.get("UPDATE_GOLDEN"):
        expected_file.write_text(text)
    assert text == expected_file.read_text(), f"regenerate with UPDATE_GOLDEN=1 and review {expected_file}"
