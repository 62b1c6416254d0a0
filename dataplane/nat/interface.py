"""What the daemon needs from nftables: one Protocol, implemented by the kernel's and the fake's.

`nftables.Nftables` talks to the kernel; `fake.FakeNftables` holds the same
tables in memory for tests and `dataplane render`. Both are checked against
this Protocol by the type checker (tests/unit/test_interface.py runs mypy),
not by duck typing at run time: a method missing from either, or taking
other arguments, fails that test.
"""

from __future__ import annotations

from typing import Protocol

from .ruleset import Transaction


class Interface(Protocol):
    @property
    def backend_name(self) -> str:
        """What runs the transactions (libnftables, nft, fake): for the start-up log."""
        ...

    def run(self, text: str, check_only: bool = False) -> str:
        """Runs an nft script as one batch and returns what it printed; raises NftError, with
        nothing changed, when any of it fails. For scripts the planner does not build (probes, listings)."""
        ...

    def apply(self, tx: Transaction) -> None:
        """Applies the transaction atomically; raises NftError, with nothing changed, on failure."""
        ...

    def check(self, tx: Transaction) -> None:
        """Raises NftError if the kernel would refuse the transaction; changes nothing."""
        ...

    def list_objects(self, family: str, table: str) -> list[tuple[str, str]] | None:
        """(kind, name) of every chain, map and set in the table; [] when it does not exist;
        None when they cannot be listed (the caller then replaces the table whole)."""
        ...

    def generation(self) -> int | None:
        """The ruleset's generation, moved on by one by every committed transaction (anyone's);
        None when it cannot be read. The same number later: nothing was changed in between."""
        ...

    def delete_table(self, family: str, table: str) -> None:
        """Deletes the table; a missing one is already deleted."""
        ...

    def counters(self, family: str, table: str) -> dict[str, tuple[int, int]]:
        """Named counters of the table, name -> (packets, bytes); NftError when the table is missing."""
        ...
