"""Every failed sync, whatever raised, reaches /healthz and the failure metric, and forces a full sync.

The daemon is real (store, manifests, proxier, userspace mode, schedule,
health, metrics) over the in-memory nftables; each case injects one kind of
failure where it really arises, runs one sync, and checks what a probe and
a scrape would see, then removes the fault and checks the next sync heals.

Address plan
    ClusterIP   10.96.0.10:80/TCP (web)
    endpoints   10.244.1.11-13:80, one more (10.244.1.14) when a case needs a change
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from dataplane.config import NodeSettings
from dataplane.daemon.app import Daemon, Options
from dataplane.daemon.userspace import UserspaceMode
from dataplane.lab.manifests import ManifestDir, endpoint_slice, port, service
from dataplane.nat.fake import FakeNftables
from dataplane.nat.nftables import NftError
from dataplane.nat.xtables import Xtables

FAILURES = "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"
IPTABLES_OK = Xtables(4, wrap=("true",))  # stands in for iptables: the root namespace's is never touched
IPTABLES_REFUSES = Xtables(4, wrap=("sh", "-c", "echo 'iptables-restore: line 4 failed' >&2; exit 1", "sh"))


def web(*ips: str) -> list[dict]:
    return [service("web", "10.96.0.10", [port("http", 80)]), endpoint_slice("web", ips, [("http", 80, "TCP")])]


class RefusingNftables(FakeNftables):
    """The fake, refusing every transaction while `refuse` is set (as a kernel out of memory would)."""

    refuse = False

    def apply(self, tx) -> None:
        if self.refuse and tx:
            raise NftError("Error: Could not process rule: Cannot allocate memory", str(tx))
        super().apply(tx)


def build(tmp_path, userspace: bool = False, in_nft: bool = True) -> tuple[Daemon, ManifestDir]:
    manifests = ManifestDir(tmp_path / "manifests")
    manifests.write("web.yaml", web("10.244.1.11", "10.244.1.12", "10.244.1.13"))
    nft = RefusingNftables()
    settings = NodeSettings(node_name="node1")
    mode = UserspaceMode(settings, nft, queue_in_nft=in_nft, xtables=(IPTABLES_OK,)) if userspace else None
    daemon = Daemon(Options(source=manifests.path, settings=settings), nft, userspace=mode)
    daemon.source.load_all()
    daemon.changed("start")
    return daemon, manifests


def change(daemon: Daemon, manifests: ManifestDir) -> None:
    manifests.write("web.yaml", web("10.244.1.11", "10.244.1.12", "10.244.1.13", "10.244.1.14"))
    daemon.source.load_all()
    daemon.changed("web")


def failures(daemon: Daemon) -> float:
    """Failures counted, as kube-proxy counts them: once per sync in each IP family's series."""
    counts = {daemon.metrics.registry.get_sample_value(FAILURES, {"ip_family": f}) or 0.0 for f in ("IPv4", "IPv6")}
    assert len(counts) == 1, "both families count every failed sync"
    return counts.pop()


async def sync(daemon: Daemon, full: bool | None = None) -> bool:
    """One sync, full or not as the schedule says unless `full` is given."""
    if full is None:
        full = daemon.loop.schedule.next_sync(daemon.loop.clock())[1]
    return await daemon.loop.step(full)


# Each kind: (inject, heal, whether the failing sync is a full one). Inject makes the next sync fail
# where that failure really comes from; heal takes the cause away.

def nft_refuses(daemon, manifests):
    daemon.proxier.nft.refuse = True
    change(daemon, manifests)


def nft_accepts(daemon, manifests):
    daemon.proxier.nft.refuse = False


def ids_run_out(daemon, manifests):
    daemon.userspace.rules["ip"].ids.limit = 3  # three endpoints hold ids 1-3: a fourth has none
    change(daemon, manifests)


def ids_enough(daemon, manifests):
    daemon.userspace.rules["ip"].ids.limit = 1 << 20


def iptables_refuses(daemon, manifests):
    daemon.userspace.xtables = (IPTABLES_REFUSES,)
    change(daemon, manifests)


def iptables_accepts(daemon, manifests):
    daemon.userspace.xtables = (IPTABLES_OK,)


def render_bug(daemon, manifests):
    def build(snapshot, node_ips):
        raise KeyError("a bug in render")

    daemon.proxier.builders[0].build = build
    change(daemon, manifests)


def plan_bug(daemon, manifests):
    def plan(ruleset):
        raise AttributeError("a bug in plan")

    daemon.proxier.programmed[0].plan = plan
    change(daemon, manifests)


def render_fixed(daemon, manifests):
    del daemon.proxier.builders[0].build


def plan_fixed(daemon, manifests):
    daemon.proxier.programmed[0].__dict__.pop("plan", None)


CASES = [
    pytest.param(False, True, nft_refuses, nft_accepts, False, id="NftError-from-the-kernel"),
    pytest.param(True, True, ids_run_out, ids_enough, False, id="OverflowError-from-the-id-allocator"),
    pytest.param(True, False, iptables_refuses, iptables_accepts, True, id="XtablesError-from-iptables"),
    pytest.param(False, True, render_bug, render_fixed, False, id="a-bug-in-render"),
    pytest.param(False, True, plan_bug, plan_fixed, False, id="a-bug-in-plan"),
]


@pytest.mark.parametrize("userspace, in_nft, inject, heal, full", CASES)
def test_a_failed_sync_turns_healthz_503_counts_and_forces_a_full_sync(tmp_path, userspace, in_nft, inject, heal,
                                                                       full):
    if not in_nft and shutil.which("iptables-restore") is None:
        pytest.skip("Xtables.available() needs the iptables commands installed")

    async def scenario() -> None:
        daemon, manifests = build(tmp_path, userspace, in_nft)
        assert await sync(daemon) is True
        assert daemon.health.report()[0] == 200 and failures(daemon) == 0

        inject(daemon, manifests)
        assert await sync(daemon, full) is False
        status, _, body = daemon.health.report()
        assert status == 503 and json.loads(body)["nodeEligible"] is False
        assert failures(daemon) == 1
        assert daemon.loop.schedule.next_sync(daemon.loop.clock())[1] is True  # the retry is a full sync

        heal(daemon, manifests)
        assert await sync(daemon) is True
        assert daemon.health.report()[0] == 200 and failures(daemon) == 1
        assert "10.244.1.14" in daemon.proxier.nft.dump()  # the change the failed sync owed is programmed

    asyncio.run(scenario())


def test_the_loop_outlives_failures_and_heals_with_a_full_sync(tmp_path):
    async def scenario() -> None:
        daemon, manifests = build(tmp_path)
        daemon.loop.schedule.retry_interval = 0.01
        fulls: list[bool] = []
        real = daemon._sync

        async def recorded(full: bool) -> None:
            fulls.append(full)
            await real(full)

        daemon.loop._sync = recorded
        runner = asyncio.create_task(daemon.loop.run())
        try:
            await _until(lambda: daemon.health.report()[0] == 200)
            nft_refuses(daemon, manifests)
            await _until(lambda: failures(daemon) >= 2)  # it keeps retrying
            assert daemon.health.report()[0] == 503 and not runner.done()
            nft_accepts(daemon, manifests)
            await _until(lambda: daemon.health.report()[0] == 200)
            assert fulls[0] is True and fulls[1] is False  # the start, then the change's partial sync: refused
            assert all(fulls[2:]) and len(fulls) >= 4  # every retry, the healing one too, was a full sync
        finally:
            runner.cancel()

    asyncio.run(scenario())


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)
