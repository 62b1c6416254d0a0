"""What the executor takes: ruleset.Operation, plus the two things only a script can say.

A script (`run`) and a Transaction (`apply`) reach the executor as the same
values: the parser turns text into Operations equal to the ones the planner
builds. Only listing commands and per-element timeouts, which the planner
never emits, have types of their own here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..ruleset import Operation, Table, safe_comment


@dataclass(frozen=True, slots=True)
class Listing:
    """`list ruleset`, `list tables` or `list table T`: read-only, answered with dump() text."""

    what: str  # ruleset, tables, table
    table: Table | None = None

    def __str__(self) -> str:
        return f"list {self.what} {self.table}" if self.table else f"list {self.what}"


class TimedElement(NamedTuple):
    """An element with a timeout of its own (`KEY timeout 10s`): a ruleset.Element plus the timeout."""

    container: str
    key: str
    value: str = ""
    comment: str = ""
    timeout: int | None = None

    def text(self) -> str:
        timeout = f" timeout {self.timeout}s" if self.timeout is not None else ""
        comment = f' comment "{safe_comment(self.comment)}"' if self.comment else ""
        value = f" : {self.value}" if self.value else ""
        return f"{self.key}{timeout}{comment}{value}"


Command = Operation | Listing
