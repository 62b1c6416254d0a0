"""FakeNftables: the Interface (nat/interface.py) over in-memory tables, as atomic as the kernel.

A batch runs on a copy of the tables (executor.Work, copy-on-write per
object) and replaces the committed state only once every command and the
final chain validation succeeded: a failing transaction changes nothing,
exactly like the kernel's netlink batch. Failures raise the real module's
NftError, worded like nft, so `errno` and `is_not_found()` classify them alike.

`apply(tx)` runs the Transaction's typed operations as they are (rules are
stored and traced as the Rule values the layout built); `run(text)` parses
the script into the same operations first (parser.py), for scripts and for
tests that compare the fake with the kernel's own listing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from ..nftables import NftError
from ..ruleset import Elements, Operation, Table, Transaction
from .commands import Command
from .dump import dump_tables
from .errors import ENOENT, NAME, Failed
from .executor import Work
from .parser import Located, parse_located
from .state import HeldElement, Learned, TableState
from .tokens import located
from .values import format_key


class FakeNftables:
    """Nftables' interface over in-memory tables; see the package docstring for the subset."""

    backend_name = "fake"

    def __init__(self, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.clock = clock  # for element timeouts; the tracer's `now` defaults to it
        self._tables: dict[tuple[str, str], TableState] = {}
        self.applied: list[Transaction] = []  # every committed batch, in order (str(): its script)
        self._generation = 1

    # the Interface

    def run(self, text: str, check_only: bool = False) -> str:
        """Parses and runs a script whole; raises NftError (located at its line) with nothing changed."""
        parsed = parse_located(text)
        return self._execute([p.command for p in parsed], check_only,
                             lambda index, failure: _located_error(text, parsed[index], failure), text)

    def apply(self, tx: Transaction) -> None:
        """Runs the transaction's typed operations atomically; raises NftError naming the failing command."""
        if tx:
            self._typed(tx.commands, check_only=False)

    def check(self, tx: Transaction) -> None:
        """As apply, but only says whether the kernel would take it."""
        self._typed(tx.commands, check_only=True)

    def list_objects(self, family: str, table: str) -> list[tuple[str, str]]:
        """(kind, name) of every chain, map and set in the table; [] when it does not exist."""
        found = self._tables.get((family, table))
        if found is None:
            return []
        return [("chain", name) for name in found.chains] + [(s.kind, name) for name, s in found.sets.items()]

    def generation(self) -> int:
        """As the kernel's: one more for every committed transaction that changed something."""
        return self._generation

    def delete_table(self, family: str, table: str) -> None:
        """Idempotent: a missing table is already deleted."""
        key = Table(family, table)
        self.apply(Transaction([Operation("add", key), Operation("delete", key)]))

    def counters(self, family: str, table: str) -> dict[str, tuple[int, int]]:
        """Named counters, name -> (packets, bytes); counts are not modelled: always (0, 0).
        Raises NftError (not found) when the table does not exist, as nft does."""
        found = self._tables.get((family, table))
        if found is None:
            raise NftError(f"Error: Could not process rule: {ENOENT} (table {family} {table})")
        return {name: (0, 0) for name in sorted(found.counters)}

    # the batch

    def _typed(self, commands: list[Operation], check_only: bool) -> None:
        self._execute(commands, check_only, lambda index, failure: _command_error(commands[index], failure), "")

    def _execute(self, commands: Sequence[Command], check_only: bool,
                 error: Callable[[int, Failed], NftError], text: str) -> str:
        work = Work(self._tables, self.clock())
        for index, command in enumerate(commands):
            try:
                work.execute(command)
            except Failed as failure:
                raise error(index, failure) from None
        try:
            work.validate()
        except Failed as failure:
            raise NftError(f"Error: {failure}", text) from None
        if work.changes and not check_only:
            self._tables = work.tables
            self.applied.append(Transaction(c for c in commands if isinstance(c, Operation)))
            self._generation += 1
        return "".join(work.output)

    # reading the state: golden tests, convergence checks, the tracer

    def dump(self) -> str:
        """Every table, sorted: the text golden tests and convergence checks compare."""
        return dump_tables(self._tables)

    def tables(self) -> dict[tuple[str, str], TableState]:
        """The committed tables; treat them as read-only (a transaction replaces, never edits, them)."""
        return dict(self._tables)

    def elements(self, family: str, table: str, name: str) -> dict[str, str]:
        """A set's or map's elements as text, key -> value ('' for sets)."""
        found = self._tables[(family, table)].sets[name]
        spec = found.spec
        out = {}
        for key, element in found.elements.items():
            if spec.data is None:
                value = ""
            elif spec.data == ("verdict",):
                value = str(element.value)
            else:
                value = format_key(spec.data, element.value)
            out[format_key(spec.key, key)] = value
        return out

    def rules(self, family: str, table: str, chain: str) -> list[str]:
        return [rule.text for rule in self._tables[(family, table)].chains[chain].rules]

    def learn(self, updates: Iterable[Learned]) -> None:
        """Writes the packet path's dynamic-set updates (from a traced Path) into the sets,
        as the kernel does when the packet passes; updates for vanished sets are ignored."""
        tables = dict(self._tables)
        for update in updates:
            key = (update.family, update.table)
            table = tables.get(key)
            if table is None or update.set not in table.sets:
                continue
            if table is self._tables.get(key):
                table = tables[key] = table.shallow_copy()
            target = table.sets[update.set] = table.sets[update.set].copy()
            target.elements[update.key] = HeldElement(None, "", update.expires)
        self._tables = tables


def _located_error(script: str, item: Located, failure: Failed) -> NftError:
    """nft's message for a script: the line and column of what the failure points at."""
    token = item.first
    if failure.where == NAME and item.name is not None:
        token = item.name
    elif isinstance(failure.where, int) and failure.where < len(item.elements):
        token = item.elements[failure.where]
    return located(script, token.line, token.col, len(token.text), str(failure))


def _command_error(operation: Command, failure: Failed) -> NftError:
    """nft's message for a typed operation: the error, then the command it failed in (an element
    command shows only the failing element: it may hold thousands)."""
    text = str(operation)
    subject = getattr(operation, "subject", None)
    if isinstance(subject, Elements):
        assert isinstance(operation, Operation)
        head = f"{operation.verb} element {operation.table} {subject.container}"
        if isinstance(failure.where, int):
            element = subject.elements[failure.where]
            text = f"{head} {{ {element.key if operation.verb == 'delete' else element.text()} }}"
        elif len(subject.elements) > 1:
            text = f"{head} {{ {subject.elements[0].text()}, ... }}  ({len(subject.elements)} elements)"
    return NftError(f"Error: {failure}\n{text}", text)
