"""A resync that sends nothing is counted apart: it is not a full sync's duration (kube-proxy's histogram)."""

from __future__ import annotations

import asyncio

from dataplane.config import NodeSettings
from dataplane.daemon.app import Daemon, Options
from dataplane.lab.manifests import ManifestDir, endpoint_slice, port, service
from dataplane.nat.fake import FakeNftables


def test_a_verified_resync_is_counted_and_not_observed_as_a_full_sync(tmp_path) -> None:
    manifests = ManifestDir(tmp_path / "manifests")
    manifests.write("web.yaml", [service("web", "10.96.0.10", [port("http", 80)]),
                                 endpoint_slice("web", ["10.244.0.1"], [("http", 80, "TCP")])])
    nft = FakeNftables()
    daemon = Daemon(Options(source=manifests.path, settings=NodeSettings(node_name="node1")), nft)
    sample = daemon.metrics.registry.get_sample_value
    family = {"ip_family": "IPv4"}

    def full_syncs() -> float:
        return sample("kubeproxy_sync_full_proxy_rules_duration_seconds_count", family) or 0.0

    async def scenario() -> None:
        daemon.source.load_all()
        daemon.changed("start")
        assert await daemon.loop.step(True)
        assert (full_syncs(), sample("dataplane_resyncs_unchanged_total")) == (1.0, 0.0)
        commits = len(nft.applied)
        assert await daemon.loop.step(True)  # nothing changed: nothing sent
        assert len(nft.applied) == commits
        assert (full_syncs(), sample("dataplane_resyncs_unchanged_total")) == (1.0, 1.0)
        assert sample("kubeproxy_sync_proxy_rules_duration_seconds_count", family) == 2.0
        nft.run("add table inet other\n")  # someone else's commit
        assert await daemon.loop.step(True)
        assert len(nft.applied) == commits + 2
        assert (full_syncs(), sample("dataplane_resyncs_unchanged_total")) == (2.0, 1.0)

    asyncio.run(scenario())
