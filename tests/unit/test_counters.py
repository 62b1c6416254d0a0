"""Counter totals across table re-creations, the fake's `counters`, and who reads them (no root)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from dataplane.config import NodeSettings
from dataplane.daemon import http
from dataplane.daemon.app import Daemon, Options
from dataplane.daemon.counters import CounterTotal
from dataplane.daemon.userspace import UserspaceMode
from dataplane.nat.fake import FakeNftables
from dataplane.nat.nftables import NftError

TABLES = (("ip", "dataplane"), ("ip6", "dataplane"))


@pytest.mark.parametrize(
    "readings, total",
    [
        ([("ip", 5), ("ip", 9)], 9),  # a counter that grows
        ([("ip", 5), ("ip", 2)], 7),  # the table was replaced: its 5 are kept
        ([("ip", 5), ("ip6", 3), ("ip", 1), ("ip6", 4)], 10),  # per family: ip 5 + 1, ip6 4
        ([("ip", 5), ("ip", 0), ("ip", 0)], 5),  # read twice after a reset: counted once
    ],
)
def test_total(readings, total):
    counter = CounterTotal("fail-open", TABLES)
    for family, packets in readings:
        counter.add((family, "dataplane"), packets)
    assert counter.value == total


def test_read_through_the_fake_counts_zero_and_skips_a_missing_table():
    nft = FakeNftables()
    nft.run("add table ip dataplane\nadd counter ip dataplane fail-open\n")
    assert nft.counters("ip", "dataplane") == {"fail-open": (0, 0)}
    with pytest.raises(NftError) as raised:
        nft.counters("ip6", "dataplane")
    assert raised.value.is_not_found()
    assert CounterTotal("fail-open", TABLES).read(nft) == 0


class RecordingNftables(FakeNftables):
    """The fake, noting which thread lists counters."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def counters(self, family: str, table: str) -> dict[str, tuple[int, int]]:
        self.threads.add(threading.get_ident())
        return super().counters(family, table)


def test_metrics_and_status_read_nft_in_a_thread_never_on_the_event_loop(tmp_path):
    nft = RecordingNftables()
    settings = NodeSettings(node_name="node1")
    daemon = Daemon(Options(source=tmp_path, settings=settings), nft,
                    userspace=UserspaceMode(settings, nft, queue_in_nft=True))

    async def get(port: int, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        response = await reader.read()
        writer.close()
        return response

    async def scenario() -> tuple[bytes, bytes]:
        assert await daemon.loop.step(True)  # the tables, with their fail-open counters, exist
        server = await http.serve("127.0.0.1:0", {"/metrics": daemon._metrics, "/status": daemon._status})
        port = server.sockets[0].getsockname()[1]
        try:
            return await get(port, "/metrics"), await get(port, "/status")
        finally:
            server.close()

    metrics, status = asyncio.run(scenario())
    assert metrics.startswith(b"HTTP/1.1 200 OK") and b"\ndataplane_userspace_fail_open_total 0.0\n" in metrics
    assert b"dataplane_userspace_conntrack_events_lost_total 0.0" in metrics
    assert json.loads(status.split(b"\r\n\r\n", 1)[1])["fail_open"] == 0
    assert nft.threads and threading.main_thread().ident not in nft.threads  # the loop ran on the main thread
