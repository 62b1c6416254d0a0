"""The layout's typed predicates: what the daemon learns about declarations from their fields, not their names."""

from __future__ import annotations

from dataplane.config import NodeSettings
from dataplane.nat import layout

SETTINGS = NodeSettings(node_name="node-a", cluster_cidrs=("10.244.0.0/16",))


def test_holds_endpoints_names_the_address_keyed_slot_maps_only():
    family = layout.Family(4)
    declarations = [*layout.skeleton(SETTINGS, family), *layout.declare(layout.Pick(3), SETTINGS, family),
                    *layout.declare(layout.LocalPick(2), SETTINGS, family),
                    *layout.declare(layout.LocalChain(2, 3, nodeport=True), SETTINGS, family)]
    found = sorted(d.name for d in declarations if layout.holds_endpoints(d))
    assert found == [layout.endpoints_map(3), layout.local_endpoints_map(2)]
    assert not layout.holds_endpoints(None)
