"""Runs typed commands against a copy of the tables: the fake's transaction.

`Work` copies a table, chain or set the first time the batch writes it
(copy-on-write, per object), so the committed tables stay untouched until
the caller takes `Work.tables`; a Failed raised anywhere simply drops the
copies. Commands are ruleset.Operation (verb, table, subject) values,
whether they came from a Transaction or from parsing a script, plus
commands.Listing. Only element keys and values are text; they are read
against the set's declared types here (values.parse_key, cached).
"""

from __future__ import annotations

from typing import Any

from ..expr import Verdict
from ..ruleset import AddRule, Chain, Container, Element, Elements, Operation, Table, safe_comment
from . import checks
from .commands import Command, Listing, TimedElement
from .dump import dump_tables
from .errors import EBUSY, EEXIST, ENOENT, EOPNOTSUPP, NAME, Failed, Invalid
from .state import ChainState, HeldElement, SetSpec, SetState, TableState
from .values import format_key, overlap, parse_key, parse_verdict

Tables = dict[tuple[str, str], TableState]


class Work:
    """The tables as one transaction changes them."""

    def __init__(self, tables: Tables, now: float):
        self.tables = dict(tables)
        self.now = now
        self._fresh: set[int] = set()  # ids of the objects this transaction owns (copied or created)
        self.touched: set[tuple[str, str]] = set()
        self.output: list[str] = []
        self.changes = False  # some command writes (a batch of listings only commits nothing)

    # copy-on-write accessors
    def _own(self, obj):
        self._fresh.add(id(obj))
        return obj

    def table(self, key: Table) -> TableState:
        index = (key.family, key.name)
        table = self.tables.get(index)
        if table is None:
            raise Failed(f"Could not process rule: {ENOENT} (table {key})")
        if id(table) not in self._fresh:
            table = self.tables[index] = self._own(table.shallow_copy())
        self.touched.add(index)
        return table

    def chain(self, table: TableState, name: str) -> ChainState:
        chain = table.chains.get(name)
        if chain is None:
            raise Failed(f"Could not process rule: {ENOENT} (chain {name})", NAME)
        if id(chain) not in self._fresh:
            chain = table.chains[name] = self._own(chain.copy())
        return chain

    def set(self, table: TableState, name: str, kinds: tuple[str, ...] = ("set", "map")) -> SetState:
        found = table.sets.get(name)
        if found is None or found.kind not in kinds:
            raise Failed(f"Could not process rule: {ENOENT} ({'/'.join(kinds)} {name})", NAME)
        if id(found) not in self._fresh:
            found = table.sets[name] = self._own(found.copy())
        return found

    def execute(self, command: Command) -> None:
        """Applies one command to the copy; raises Failed as the kernel would refuse it."""
        if isinstance(command, Listing):
            self._list(command)
            return
        self.changes = True
        subject = command.subject
        if subject is None:
            handler = _TABLE.get(command.verb)
        elif isinstance(subject, Chain):
            handler = _CHAIN.get(command.verb)
        elif isinstance(subject, Container):
            handler = (_COUNTER if subject.kind == "counter" else _SET).get(command.verb)
        elif isinstance(subject, AddRule):
            handler = Work._add_rule if command.verb == "add" else None
        elif isinstance(subject, Elements):
            handler = _ELEMENTS.get(command.verb)
        else:
            handler = None
        if handler is None:
            raise Failed(f"syntax error, {command.verb} of {type(subject).__name__} is not a command nft has")
        handler(self, command)

    # tables
    def _add_table(self, command: Operation) -> None:
        key = (command.table.family, command.table.name)
        if key not in self.tables:
            self.tables[key] = self._own(TableState(*key))
        self.touched.add(key)

    def _delete_table(self, command: Operation) -> None:
        self.table(command.table)
        del self.tables[(command.table.family, command.table.name)]

    def _flush_table(self, command: Operation) -> None:
        table = self.table(command.table)
        for name in list(table.chains):  # rules only: sets and maps keep their elements
            self.chain(table, name).rules.clear()

    # chains
    def _add_chain(self, command: Operation) -> None:
        table = self.table(command.table)
        subject = command.subject
        assert isinstance(subject, Chain)
        name, base = subject.name, subject.base  # the rules come as AddRule commands, as in the script
        existing = table.chains.get(name)
        if existing is None:
            table.chains[name] = self._own(ChainState(name, base))
        elif base is not None and (existing.base is None or existing.base.type != base.type
                                   or existing.base.hook != base.hook):
            raise Failed(f"Could not process rule: {EEXIST} (chain {name} exists with another type)", NAME)
        elif base is not None and existing.base != base:
            self.chain(table, name).base = base  # policy, priority

    def _delete_chain(self, command: Operation) -> None:
        table = self.table(command.table)
        assert isinstance(command.subject, Chain)
        name = command.subject.name
        self.chain(table, name)
        users = [f"chain {c.name}" for c in table.chains.values()
                 if c.name != name and any(name in r.chains for r in c.rules)]
        users += [f"map {s.name}" for s in table.sets.values() if s.spec.data == ("verdict",)
                  and any(e.value.chain == name for e in s.elements.values())]
        if users:
            raise Failed(f"Could not process rule: {EBUSY} (chain {name} is used by {', '.join(users)})", NAME)
        del table.chains[name]

    def _flush_chain(self, command: Operation) -> None:
        assert isinstance(command.subject, Chain)
        self.chain(self.table(command.table), command.subject.name).rules.clear()

    # sets and maps
    def _add_set(self, command: Operation) -> None:
        table = self.table(command.table)
        container = command.subject
        assert isinstance(container, Container)
        spec = SetSpec.of(container)
        existing = table.sets.get(container.name)
        if existing is None:
            table.sets[container.name] = self._own(SetState(container.name, spec))
        elif existing.spec.shape() != spec.shape():
            raise Failed(f"Could not process rule: {EEXIST} ({existing.kind} {container.name} exists as "
                         f"{{ {' ; '.join(existing.spec.lines())} }})", NAME)
        elif existing.spec != spec:
            self.set(table, container.name).spec = spec  # a new timeout

    def _delete_set(self, command: Operation) -> None:
        table = self.table(command.table)
        container = command.subject
        assert isinstance(container, Container)
        self.set(table, container.name, kinds=(container.kind,))
        users = [c.name for c in table.chains.values() if any(container.name in r.sets for r in c.rules)]
        if users:
            raise Failed(f"Could not process rule: {EBUSY} ({container.kind} {container.name} is used by chain "
                         f"{', '.join(users)})", NAME)
        del table.sets[container.name]

    def _flush_set(self, command: Operation) -> None:
        container = command.subject
        assert isinstance(container, Container)
        self.set(self.table(command.table), container.name, kinds=(container.kind,)).elements.clear()

    # named counters
    def _add_counter(self, command: Operation) -> None:
        table = self.table(command.table)
        assert isinstance(command.subject, Container)
        table.counters = table.counters | {command.subject.name}

    def _delete_counter(self, command: Operation) -> None:
        table = self.table(command.table)
        assert isinstance(command.subject, Container)
        name = command.subject.name
        if name not in table.counters:
            raise Failed(f"Could not process rule: {ENOENT} (counter {name})", NAME)
        users = [c.name for c in table.chains.values() if any(name in r.sets for r in c.rules)]
        if users:
            raise Failed(f"Could not process rule: {EBUSY} (counter {name} is used by chain {', '.join(users)})",
                         NAME)
        table.counters = table.counters - {name}

    # elements
    def _value(self, table: TableState, spec: SetSpec, element: Element | TimedElement, index: int) -> Any:
        if spec.data is None:
            if element.value:
                raise Failed("syntax error, a set element has no value", index)
            return None
        if not element.value:
            raise Failed("syntax error, a map element needs ': value'", index)
        try:
            if spec.data != ("verdict",):
                return parse_key(spec.data, element.value, False, True)
            verdict = parse_verdict(element.value)
        except Invalid as error:
            raise Failed(str(error), index) from None
        if verdict.chain:
            self._check_target(table, verdict, index)
        return verdict

    @staticmethod
    def _check_target(table: TableState, verdict: Verdict, index: int) -> None:
        target = table.chains.get(verdict.chain)
        if target is None:
            raise Failed(f"Could not process rule: {ENOENT} (chain {verdict.chain})", index)
        if target.base is not None:
            raise Failed(f"Could not process rule: {EOPNOTSUPP} (cannot jump to base chain {verdict.chain})", index)

    @staticmethod
    def _key(spec: SetSpec, element: Element | TimedElement, index: int) -> tuple:
        try:
            return parse_key(spec.key, element.key, spec.interval)
        except Invalid as error:
            raise Failed(str(error), index) from None

    def _add_element(self, command: Operation) -> None:
        table = self.table(command.table)
        subject = command.subject
        assert isinstance(subject, Elements)
        target = self.set(table, subject.container)
        spec = target.spec
        held = target.elements
        for index, element in enumerate(subject.elements):
            key = self._key(spec, element, index)
            value = self._value(table, spec, element, index)
            own = element.timeout if isinstance(element, TimedElement) else None
            if own is not None and "timeout" not in spec.flags:
                raise Failed(f"Could not process rule: {EOPNOTSUPP} (element timeout in a set without flags "
                             f"timeout)", index)
            existing = held.get(key)
            if existing is not None:
                if existing.value != value:
                    raise Failed(f"Could not process rule: {EEXIST} (key already held with {existing.value})", index)
                continue  # `add` of the same element: nothing to do, as in the kernel
            if spec.interval:
                clash = next((k for k in held if overlap(k, key)), None)
                if clash is not None:
                    raise Failed(f"Could not process rule: {EEXIST} (overlaps {format_key(spec.key, clash)})", index)
            timeout = own if own is not None else spec.timeout
            comment = safe_comment(element.comment) if element.comment else ""
            held[key] = HeldElement(value, comment, None if timeout is None else self.now + timeout)

    def _delete_element(self, command: Operation) -> None:
        table = self.table(command.table)
        subject = command.subject
        assert isinstance(subject, Elements)
        target = self.set(table, subject.container)
        for index, element in enumerate(subject.elements):
            key = self._key(target.spec, element, index)
            if target.elements.pop(key, None) is None:
                raise Failed(f"Could not process rule: {ENOENT} (no element {format_key(target.spec.key, key)})",
                             index)

    # rules
    def _add_rule(self, command: Operation) -> None:
        table = self.table(command.table)
        subject = command.subject
        assert isinstance(subject, AddRule)
        chain = self.chain(table, subject.chain)
        checks.check_rule(table, subject.rule)
        chain.rules.append(subject.rule)

    # listing
    def _list(self, command: Listing) -> None:
        listed = self.tables if command.what != "table" or command.table is None else {
            key: t for key, t in self.tables.items() if key == (command.table.family, command.table.name)}
        if command.what != "tables":
            for table in listed.values():
                crash = next((s for s in table.sets.values() if " jhash " in f" {s.spec.text} "), None)
                if crash is not None:
                    # nft 1.0.6 itself crashes here (SIGSEGV, exit 139); the kernel's state is fine.
                    raise Failed(f"nft: Segmentation fault listing {crash.kind} {crash.name} "
                                 f"({crash.spec.text}): nft 1.0.6 cannot list a jhash-typeof map")
        if command.what == "ruleset":
            self.output.append(dump_tables(self.tables))
        elif command.what == "tables":
            self.output.append("".join(f"table {f} {n}\n" for f, n in sorted(self.tables)))
        else:
            assert command.table is not None
            key = (command.table.family, command.table.name)
            if key not in self.tables:
                raise Failed(f"Could not process rule: {ENOENT} (table {command.table})")
            self.output.append(dump_tables({key: self.tables[key]}))

    def validate(self) -> None:
        """The checks the kernel makes once the whole batch is in (checks.validate)."""
        for key in sorted(self.touched):
            table = self.tables.get(key)
            if table is not None:
                checks.validate(table)


_TABLE = {"add": Work._add_table, "delete": Work._delete_table, "flush": Work._flush_table}
_CHAIN = {"add": Work._add_chain, "delete": Work._delete_chain, "flush": Work._flush_chain}
_SET = {"add": Work._add_set, "delete": Work._delete_set, "flush": Work._flush_set}
_COUNTER = {"add": Work._add_counter, "delete": Work._delete_counter}
_ELEMENTS = {"add": Work._add_element, "delete": Work._delete_element}
