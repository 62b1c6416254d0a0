"""Both nftables implementations are the Interface: checked by mypy (tests/unit/test_interface.py), never run."""

from __future__ import annotations

from dataplane.nat.fake import FakeNftables
from dataplane.nat.interface import Interface
from dataplane.nat.nftables import Nftables


def kernel(nft: Nftables) -> Interface:
    return nft


def in_memory(nft: FakeNftables) -> Interface:
    return nft
