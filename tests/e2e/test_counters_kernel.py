"""Named counters read through `Nftables.counters` from the real kernel, in a throwaway namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from dataplane.daemon.counters import CounterTotal
from dataplane.nat.fake import FakeNftables
from dataplane.nat.nftables import NftCommand, NftError, Nftables

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed"),
]

TABLE = """add table ip t
add counter ip t fail-open {{ packets {packets} bytes {bytes} ; }}
add counter ip t other
"""


@pytest.fixture
def nft():
    name = f"dp-ctr-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield Nftables(NftCommand(["ip", "netns", "exec", name, "nft"]))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_counters_are_read_from_the_kernel_and_the_fake_lists_the_same_names(nft):
    script = TABLE.format(packets=7, bytes=420)
    nft.run(script)
    assert nft.counters("ip", "t") == {"fail-open": (7, 420), "other": (0, 0)}
    fake = FakeNftables()
    fake.run(script)
    assert fake.counters("ip", "t").keys() == nft.counters("ip", "t").keys()


def test_a_missing_table_is_not_found(nft):
    with pytest.raises(NftError) as raised:
        nft.counters("ip", "absent")
    assert raised.value.is_not_found()


def test_the_total_survives_the_table_being_replaced(nft):
    total = CounterTotal("fail-open", (("ip", "t"), ("ip6", "t")))  # no ip6 table: that part stays 0
    nft.run(TABLE.format(packets=7, bytes=420))
    assert total.read(nft) == 7
    nft.delete_table("ip", "t")
    assert total.read(nft) == 7  # while it is gone: what it had counted
    nft.run(TABLE.format(packets=2, bytes=120))
    assert total.read(nft) == 9


def test_netlink_and_nft_read_the_same_counters_over_a_dump_of_many_parts(nft):
    """The netlink read (the default applier's: one dump, no nft process) against `nft -j`: 600 counters
    fill several dump parts; a table with no counter is {} either way, a missing one not found either way."""
    assert nft.applier == "netlink"
    wrapped = nft._bulk  # the same `ip netns exec` nft command
    text = Nftables(wrapped, applier="nft")
    nft.run("add table ip t\nadd table ip empty\n" + "".join(
        f"add counter ip t c{n} {{ packets {n * 3} bytes {n * 1000 + 7} ; }}\n" for n in range(600)))
    read = nft.counters("ip", "t")
    assert len(read) == 600 and read["c599"] == (1797, 599007)
    assert read == text.counters("ip", "t")
    assert nft.counters("ip", "empty") == text.counters("ip", "empty") == {}
    for reader in (nft, text):
        with pytest.raises(NftError) as raised:
            reader.counters("ip6", "t")
        assert raised.value.is_not_found()
