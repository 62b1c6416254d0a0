"""nft named counters as totals that only grow, across table re-creations.

A full sync that replaces a table whole starts its counters at 0 again; the
total keeps what the old table had counted. Reading runs `nft`, so callers
keep it off any event loop that carries packets (`await asyncio.to_thread`).
"""

from __future__ import annotations

import logging
import threading

from ..nat.nftables import NftError, Nftables

log = logging.getLogger(__name__)


class CounterTotal:
    """One named counter, present in several tables (one per family), summed."""

    def __init__(self, name: str, tables: tuple[tuple[str, str], ...]):
        self.name = name
        self.tables = tables  # (family, table)
        self.base = dict.fromkeys(tables, 0)  # counted by tables since replaced
        self.last = dict.fromkeys(tables, 0)  # the live table's count when last read
        self._lock = threading.Lock()  # two scrapes at once must not both add one reset

    @property
    def value(self) -> int:
        """The total as of the last `read` (no I/O)."""
        return sum(self.base.values()) + sum(self.last.values())

    def add(self, table: tuple[str, str], packets: int) -> None:
        """Takes one reading of `table`'s counter; a value below the last one means the table was replaced."""
        if packets < self.last[table]:
            self.base[table] += self.last[table]
        self.last[table] = packets

    def read(self, nft: Nftables) -> int:
        """Reads every table's counter (blocking: runs nft) and returns the total.

        A table or counter that is not there (yet) keeps its last reading; a failure
        to list is logged and changes nothing."""
        with self._lock:
            for family, table in self.tables:
                try:
                    counts = nft.counters(family, table)
                except NftError as error:
                    if not error.is_not_found():
                        log.warning("cannot read counter %s in %s %s: %s", self.name, family, table, error)
                    continue
                if self.name in counts:
                    self.add((family, table), counts[self.name][0])
            return self.value
