"""Counter totals across table re-creations, and the fake's `counters` (no root)."""

from __future__ import annotations

import pytest

from dataplane.daemon.counters import CounterTotal
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
