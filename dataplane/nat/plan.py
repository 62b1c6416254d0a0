"""Transactions that bring the kernel from one Ruleset to the next.

`full()` replaces the whole table in one transaction: used at start (which
adopts whatever a previous run left), after a failure and on resync.
`Programmed.plan()` touches only the elements of owners whose fragment
changed, plus declarations that became needed or unneeded.

Elements are reference-counted by (container, key): two owners may share one
(a Pod behind two Services shares its hairpin entry), and a key already held
with another value is a conflict (two Services claiming one ClusterIP:port):
the first holder keeps it and the newcomer's element is left out, so one bad
Service cannot make a transaction fail for everyone.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Hashable, Iterable

from .ruleset import EMPTY, Chain, Element, Fragment, Ruleset, Transaction

log = logging.getLogger(__name__)

ElementKey = tuple[str, str]  # (container, key)


@dataclass
class Programmed:
    """What the kernel holds after the last successful transaction."""

    ruleset: Ruleset | None = None
    held: dict[ElementKey, tuple[Element, int]] = field(default_factory=dict)  # -> (element, refcount)
    needed: dict[str, int] = field(default_factory=dict)  # declaration name -> refcount
    conflicts: dict[Hashable, frozenset[Element]] = field(default_factory=dict)

    def plan(self, new: Ruleset) -> tuple[Transaction, "Programmed"]:
        """The transaction from this state to `new`, and the state after it.

        Pure: self is left untouched, so a failed apply loses nothing.
        """
        if self.ruleset is None or (new.family, new.table) != (self.ruleset.family, self.ruleset.table):
            return full(new)
        old = self.ruleset
        changed = [k for k in old.fragments.keys() | new.fragments.keys() if old.fragments.get(k) is not new.fragments.get(k)]
        changed = [k for k in changed if old.fragments.get(k, EMPTY) != new.fragments.get(k, EMPTY)]
        state = Programmed(new, dict(self.held), dict(self.needed), dict(self.conflicts))
        added: list[Element] = []
        removed: list[Element] = []
        for key in sorted(changed, key=repr):
            state._retract(key, old.fragments.get(key, EMPTY), removed)
        for key in sorted(changed, key=repr):
            state._contribute(key, new.fragments.get(key, EMPTY), added)
        # An element both removed and re-added (the same key moving between
        # owners) would be deleted then added again: drop the pair.
        same = set(added) & set(removed)
        added = [e for e in added if e not in same]
        removed = [e for e in removed if e not in same]
        gone = [n for n in self.needed if n not in state.needed and n not in new.always]
        born = [n for n in state.needed if n not in self.needed and n not in old.always]
        tx = Transaction()
        table = f"{new.family} {new.table}"
        _declare(tx, new, born)
        _fill_chains(tx, new, born)
        _elements(tx, "delete", table, removed)
        _elements(tx, "add", table, added)
        for name in gone:
            declaration = old.declarations[name]
            if isinstance(declaration, Chain):
                tx.add(f"flush chain {table} {name}")
                tx.add(f"delete chain {table} {name}")
        for name in gone:
            if not isinstance(old.declarations[name], Chain):
                tx.add(f"delete {old.declarations[name].kind} {table} {name}")
        return tx, state

    def _contribute(self, owner: Hashable, fragment: Fragment, added: list[Element]) -> None:
        refused = []
        for element in sorted(fragment.elements):
            slot = (element.container, element.key)
            entry = self.held.get(slot)
            if entry is None:
                self.held[slot] = (element, 1)
                added.append(element)
            elif entry[0].value == element.value:
                self.held[slot] = (entry[0], entry[1] + 1)
            else:
                refused.append(element)
        if refused:
            self.conflicts[owner] = frozenset(refused)
            log.error(
                "%s: %d entries conflict with another Service (e.g. %s in %s); left out",
                owner, len(refused), refused[0].key, refused[0].container,
            )
        for name in fragment.needs:
            self.needed[name] = self.needed.get(name, 0) + 1

    def _retract(self, owner: Hashable, fragment: Fragment, removed: list[Element]) -> None:
        refused = self.conflicts.pop(owner, frozenset())
        for element in fragment.elements:
            if element in refused:
                continue
            slot = (element.container, element.key)
            held, count = self.held[slot]
            if count == 1:
                del self.held[slot]
                removed.append(held)
            else:
                self.held[slot] = (held, count - 1)
        for name in fragment.needs:
            self.needed[name] -= 1
            if not self.needed[name]:
                del self.needed[name]


def full(ruleset: Ruleset) -> tuple[Transaction, Programmed]:
    """One transaction that replaces the table with exactly `ruleset`."""
    state = Programmed(ruleset)
    added: list[Element] = []
    for owner in sorted(ruleset.fragments, key=repr):
        state._contribute(owner, ruleset.fragments[owner], added)
    table = f"{ruleset.family} {ruleset.table}"
    names = [n for n in ruleset.declarations if n in ruleset.always or n in state.needed]
    tx = Transaction([f"add table {table}", f"delete table {table}", f"add table {table}"])
    _declare(tx, ruleset, names)
    _fill_chains(tx, ruleset, names)
    _elements(tx, "add", table, added)
    return tx, state


def _declare(tx: Transaction, ruleset: Ruleset, names: Iterable[str]) -> None:
    # Maps and sets first, then chains, so that no rule names a missing object.
    declarations = [ruleset.declarations[n] for n in names]
    table_family, table = ruleset.family, ruleset.table
    tx.extend(d.declaration(table_family, table) for d in declarations if not isinstance(d, Chain))
    tx.extend(d.declaration(table_family, table) for d in declarations if isinstance(d, Chain))


def _fill_chains(tx: Transaction, ruleset: Ruleset, names: Iterable[str]) -> None:
    table = f"{ruleset.family} {ruleset.table}"
    for name in names:
        declaration = ruleset.declarations[name]
        if isinstance(declaration, Chain):
            tx.extend(f"add rule {table} {name} {rule}" for rule in declaration.rules)


def _elements(tx: Transaction, verb: str, table: str, elements: Iterable[Element], batch: int = 2000) -> None:
    by_container: dict[str, list[Element]] = defaultdict(list)
    for element in elements:
        by_container[element.container].append(element)
    for container in sorted(by_container):
        items = sorted(by_container[container])
        for start in range(0, len(items), batch):
            # Deleting takes the key alone; adding takes key, comment and value.
            texts = (e.key if verb == "delete" else e.text() for e in items[start : start + batch])
            tx.add(f"{verb} element {table} {container} {{ {', '.join(texts)} }}")
