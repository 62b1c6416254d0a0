"""Transactions that bring the kernel from one Ruleset to the next.

`full()` makes the table exactly the ruleset in one transaction (replacing
it, or flushing and refilling it in place so affinity state survives): used
at start (which adopts whatever a previous run left), after a failure and on
resync.
`Programmed.plan()` touches only the elements that differ in owners whose
fragment changed (a balancing table's moved slots, not all of them), plus
declarations that became needed or unneeded.

Elements are reference-counted by (container, key): two owners may share one
(a Pod behind two Services shares its hairpin entry), and a key already held
with another value is a conflict (two Services claiming one ClusterIP:port):
the first holder keeps it and the newcomer's element is left out, so one bad
Service cannot make a transaction fail for everyone.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Collection, Hashable, Iterable

from .ruleset import (
    EMPTY, AddRule, Chain, Container, Declaration, Element, Elements, Fragment, Operation, Ruleset, Table, Transaction,
)

log = logging.getLogger(__name__)

ElementKey = tuple[str, str]  # (container, key)
# container -> key -> element: no (container, key) tuple per element (131,000 of them, 7 MB at 10,000 Services).
Held = dict[str, dict[str, Element]]


_GONE = Element("", "", "", "")  # overlay marker: the slot was released
_NOTHING: dict[str, Element] = {}  # a container nothing is held in (never written to)


class Programmed:
    """What the kernel holds after the last successful transaction.

    `plan()` is pure: it returns the transaction and a Change, and only
    `commit(change)`, called once the kernel accepted the transaction,
    moves this state forward. A failed apply therefore loses nothing.
    """

    def __init__(self, ruleset: Ruleset | None = None):
        self.ruleset = ruleset
        self.held: Held = {}  # container -> key -> the element the kernel holds there
        self.shares: dict[ElementKey, int] = {}  # slot -> owners, where more than one holds it
        self.needed: dict[Hashable, int] = {}  # need (layout.Need) -> refcount
        self.conflicts: dict[Hashable, frozenset[Element]] = {}
        self.sizes: dict[str, int] = {}  # container -> elements held, for metrics

    def plan(self, new: Ruleset) -> tuple[Transaction, "Change"]:
        """The transaction from this state to `new`; a full one if there is no state yet."""
        if self.ruleset is None or (new.family, new.table) != (self.ruleset.family, self.ruleset.table):
            tx, state = full(new)
            return tx, Change(new, replacement=state)
        old = self.ruleset
        change = Change(new, base=self)
        added: list[Element] = []
        removed: list[Element] = []
        owners = sorted(_changed_owners(old, new), key=repr)
        # Only the elements that differ are retracted and contributed: a balancing table whose
        # endpoint left changes about 1/N of its slots, and its other slots cost set arithmetic
        # (in C), not a Python step each. An element refused before is tried again: its
        # holder may be leaving in this very change.
        deltas = {}
        for owner in owners:
            before, after = old.fragments.get(owner, EMPTY), new.fragments.get(owner, EMPTY)
            refused = self.conflicts.get(owner, frozenset())
            before_set, after_set = _as_set(before.elements), _as_set(after.elements)
            deltas[owner] = (Fragment(before_set - after_set, before.needs),
                             Fragment((after_set - before_set) | (refused & after_set), after.needs))
        for owner in owners:
            change.retract(owner, deltas[owner][0], removed)
        for owner in owners:
            change.contribute(owner, deltas[owner][1], added)
        # The same element released by one owner and taken by another stays.
        same = set(added) & set(removed)
        added = [e for e in added if e not in same]
        removed = [e for e in removed if e not in same]
        gone = [name for need, count in change.needed.items() if count == 0 and need in self.needed
                for name in old.groups[need]]
        born = [name for need, count in change.needed.items() if count > 0 and need not in self.needed
                for name in new.groups[need]]
        owned_old = {d.name: d for o in owners for d in old.fragments.get(o, EMPTY).owned}
        owned_new = {d.name: d for o in owners for d in new.fragments.get(o, EMPTY).owned}
        retired = [d for name, d in owned_old.items() if owned_new.get(name) != d]  # gone, or changed
        created = [d for name, d in owned_new.items() if owned_old.get(name) != d]
        # Changed in place: a chain is flushed and refilled; a set (an affinity timeout) is
        # declared again, which the kernel applies keeping its elements. Deleting it
        # would be refused while a rule still reads it.
        refilled = [d for d in created if isinstance(d, Chain) and d.name in owned_old]
        retired = [d for d in retired if d.name not in owned_new]
        created = [d for d in created if d not in refilled]

        tx = Transaction()
        table = Table(new.family, new.table)
        old_chains = [old.declarations[n] for n in gone if isinstance(old.declarations[n], Chain)]
        old_chains += [d for d in retired if isinstance(d, Chain)]
        old_containers = [old.declarations[n] for n in gone if not isinstance(old.declarations[n], Chain)]
        old_containers += [d for d in retired if not isinstance(d, Chain)]
        tx.extend(Operation("flush", table, d) for d in old_chains)
        born_declarations = [new.declarations[n] for n in sorted(born)] + created
        _declare(tx, table, born_declarations)
        _fill_chains(tx, table, born_declarations)
        tx.extend(Operation("flush", table, chain) for chain in refilled)
        _fill_chains(tx, table, refilled)
        _elements(tx, "delete", table, removed)
        _elements(tx, "add", table, added)
        # Flushed before any is deleted: one may still jump to another.
        tx.extend(Operation("delete", table, d) for d in old_chains)
        tx.extend(Operation("delete", table, d) for d in old_containers)
        return tx, change

    def adopt(self, change: "Change") -> None:
        """Takes over a change planned from nothing (a full sync) without copying it."""
        assert not self.held and change.base is self
        self.held = change.held  # nothing was released: no _GONE markers
        self.shares = {slot: count for slot, count in change.shares.items() if count > 1}
        self.needed = {name: count for name, count in change.needed.items() if count}
        self.conflicts = {owner: refused for owner, refused in change.conflicts.items() if refused}
        self.sizes = {container: len(entries) for container, entries in self.held.items()}
        self.ruleset = change.ruleset

    def commit(self, change: "Change") -> "Programmed":
        """The state once the kernel accepted `change`'s transaction."""
        if change.replacement is not None:
            return change.replacement
        assert change.base is self, "a change applies to the state it was planned from"
        sizes = self.sizes
        for container, entries in change.held.items():
            mine = self.held.get(container)
            if mine is None:
                mine = self.held[container] = {}
            for key, entry in entries.items():
                if entry is _GONE:
                    if mine.pop(key, None) is not None:
                        sizes[container] -= 1
                else:
                    if mine.get(key) is None:
                        sizes[container] = sizes.get(container, 0) + 1
                    mine[key] = entry
            if not mine:  # an emptied container leaves no trace: the state equals a fresh full()'s
                del self.held[container]
        for slot, count in change.shares.items():
            if count > 1:
                self.shares[slot] = count
            else:
                self.shares.pop(slot, None)
        for name, count in change.needed.items():
            if count:
                self.needed[name] = count
            else:
                self.needed.pop(name, None)
        for owner, refused in change.conflicts.items():
            if refused:
                self.conflicts[owner] = refused
            else:
                self.conflicts.pop(owner, None)
        self.ruleset = change.ruleset
        return self


class Change:
    """A planned step: overlays on a Programmed state, so planning copies nothing big."""

    def __init__(self, ruleset: Ruleset, base: Programmed | None = None, replacement: Programmed | None = None):
        self.ruleset = ruleset
        self.base = base
        self.replacement = replacement
        self.held: Held = {}  # _GONE where released
        self.shares: dict[ElementKey, int] = {}
        self.needed: dict[Hashable, int] = {}
        self.conflicts: dict[Hashable, frozenset[Element]] = {}

    def _entry(self, container: str, key: str) -> Element | None:
        entry = self.held.get(container, _NOTHING).get(key)
        if entry is None and self.base is not None:
            entry = self.base.held.get(container, _NOTHING).get(key)
        return None if entry is _GONE else entry

    def _owners(self, slot: ElementKey) -> int:
        """How many owners hold a held slot (1 unless shared)."""
        count = self.shares.get(slot)
        if count is None and self.base is not None:
            count = self.base.shares.get(slot)
        return count or 1

    def _need(self, name: Hashable, delta: int) -> None:
        current = self.needed.get(name)
        if current is None:
            current = self.base.needed.get(name, 0) if self.base is not None else 0
        self.needed[name] = current + delta

    def contribute(self, owner: Hashable, fragment: Fragment, added: list[Element]) -> None:
        refused = []
        held, base = self.held, self.base.held if self.base is not None else {}
        container, mine, theirs = None, _NOTHING, _NOTHING
        for element in fragment.elements:
            if element[0] != container:  # a fragment's elements come mostly grouped by container
                container = element[0]
                mine = held.get(container)
                if mine is None:
                    mine = held[container] = {}
                theirs = base.get(container, _NOTHING)
            key = element[1]
            entry = mine.get(key) or theirs.get(key)  # inlined _entry: the full-sync hot loop
            if entry is None or entry is _GONE:
                mine[key] = element
                added.append(element)
            elif entry[2] == element[2]:  # the same value: one more owner
                slot = (container, key)
                self.shares[slot] = self._owners(slot) + 1
            else:
                refused.append(element)
        self.conflicts[owner] = frozenset(refused)
        if refused:
            log.error(
                "%s: %d entries conflict with another Service (e.g. %s in %s); left out",
                owner, len(refused), refused[0].key, refused[0].container,
            )
        for name in fragment.needs:
            self._need(name, +1)

    def retract(self, owner: Hashable, fragment: Fragment, removed: list[Element]) -> None:
        refused = self.conflicts.get(owner)
        if refused is None:
            refused = self.base.conflicts.get(owner, frozenset()) if self.base is not None else frozenset()
        self.conflicts[owner] = frozenset()
        for element in fragment.elements:
            if element in refused:
                continue
            slot = element[:2]
            count = self._owners(slot)
            if count == 1:
                removed.append(self._entry(*slot))
                self.held.setdefault(slot[0], {})[slot[1]] = _GONE
            else:
                self.shares[slot] = count - 1
        for name in fragment.needs:
            self._need(name, -1)


def _as_set(elements: Collection[Element]) -> frozenset[Element] | set[Element]:
    return elements if isinstance(elements, (frozenset, set)) else set(elements)


def _changed_owners(old: Ruleset, new: Ruleset) -> set[Hashable]:
    """Owners whose fragment differs; cheap when `new` was built from `old`."""
    if new.changed is not None and new.previous is not None and new.previous() is old:
        candidates = new.changed
    else:
        candidates = old.fragments.keys() | new.fragments.keys()
    return {
        owner for owner in candidates
        if old.fragments.get(owner, EMPTY) is not new.fragments.get(owner, EMPTY)
        and old.fragments.get(owner, EMPTY) != new.fragments.get(owner, EMPTY)
    }


def full(ruleset: Ruleset, existing: Iterable[tuple[str, str]] | None = None) -> tuple[Transaction, Programmed]:
    """One transaction that makes the table exactly `ruleset`.

    Without `existing` it deletes and recreates the table: the complete,
    self-contained script `dataplane render` prints. With `existing`, the
    (kind, name) of every object the table holds now, it flushes and refills
    instead, deleting only what is no longer wanted: session-affinity sets
    keep their clients across resyncs and restarts.
    """
    state = Programmed()
    change = Change(ruleset, base=state)
    added: list[Element] = []
    for owner in sorted(ruleset.fragments, key=repr):
        change.contribute(owner, ruleset.fragments[owner], added)
    state.adopt(change)
    table = Table(ruleset.family, ruleset.table)
    # The skeleton in its own order, then the rest by name: the same text in every process.
    wanted = [ruleset.declarations[n] for n in ruleset.declarations if n in ruleset.always]
    wanted += [ruleset.declarations[n] for n in sorted(n for need in state.needed for n in ruleset.groups[need])]
    wanted += [d for owner in sorted(ruleset.fragments, key=repr) for d in ruleset.fragments[owner].owned]
    if existing is None:
        tx = Transaction([Operation("add", table), Operation("delete", table), Operation("add", table)])
        _declare(tx, table, wanted)
    else:
        tx = Transaction([Operation("add", table), Operation("flush", table)])  # every chain's rules
        # Maps and sets are rebuilt whole, except the dynamic ones (affinity state). They are
        # deleted and declared again rather than flushed: nft 1.0.6 cannot add a rule that
        # reads a `typeof` map it has to read back from the kernel (see layout.declare).
        present = {name for kind, name in existing if kind != "chain"}
        tx.extend(Operation("delete", table, d) for d in wanted
                  if isinstance(d, Container) and not d.dynamic and d.name in present)
        _declare(tx, table, wanted)
    _fill_chains(tx, table, wanted)
    _elements(tx, "add", table, added)
    if existing is not None:
        names = {d.name for d in wanted}
        stale = [(kind, name) for kind, name in existing if name not in names]
        tx.extend(Operation("delete", table, Chain(name)) for kind, name in stale if kind == "chain")
        tx.extend(Operation("delete", table, Container(name, kind=kind)) for kind, name in stale if kind != "chain")
    return tx, state


def _declare(tx: Transaction, table: Table, declarations: list[Declaration]) -> None:
    # Maps and sets first, then chains, so that no rule names a missing object.
    tx.extend(Operation("add", table, d) for d in declarations if not isinstance(d, Chain))
    tx.extend(Operation("add", table, d) for d in declarations if isinstance(d, Chain))


def _fill_chains(tx: Transaction, table: Table, declarations: list[Declaration]) -> None:
    for declaration in declarations:
        if isinstance(declaration, Chain):
            tx.extend(Operation("add", table, AddRule(declaration.name, rule)) for rule in declaration.rules)


def _elements(tx: Transaction, verb: str, table: Table, elements: Iterable[Element], batch: int = 2000) -> None:
    by_container: dict[str, list[Element]] = defaultdict(list)
    for element in elements:
        by_container[element.container].append(element)
    for container in sorted(by_container):
        items = sorted(by_container[container])
        for start in range(0, len(items), batch):
            tx.add(Operation(verb, table, Elements(container, tuple(items[start : start + batch]))))
