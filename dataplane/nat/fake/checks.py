"""What the kernel (and nft's evaluation step) refuses in a rule and in a table's chains.

`check_rule` runs when a rule is added, against the table as the batch has
made it so far: what the rule names must exist with the right types, its
literals must be values of their fields' types, and its statements must
make sense together (a port mapping needs a transport protocol match).
`validate` runs once the whole batch is in, as the kernel's chain
validation does: what each base chain reaches must suit its type and hook,
and jumps must neither loop nor nest deeper than the jump stack.

Both read Rule values (expr.py) only, never rule text, so a script and a
Transaction are held to exactly the same checks.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..expr import (
    L4PROTO, AnonSet, BinOp, Counter, Expr, Jhash, Lookup, Masquerade, Match, Nat, Queue, Reject, Rule, Selector,
    SetMeta, SetRef, SetUpdate, Statement, Verdict, Vmap,
)
from ..ruleset import BaseChain
from .errors import EMLINK, ENOENT, EOPNOTSUPP, JUMP_STACK, Failed
from .fields import SETTABLE
from .state import ChainState, SetState, TableState
from .values import fits

_TERMINAL = (Verdict, Reject, Nat, Masquerade, Queue)
_REJECT_FAMILIES = {"icmp": "ip", "icmpv6": "ip6"}


def check_rule(table: TableState, rule: Rule) -> None:
    """Raises Failed for a rule the kernel would refuse in `table` as it stands."""
    if not rule.statements:
        raise Failed("syntax error, a rule needs at least one statement")
    for index, statement in enumerate(rule.statements[:-1]):
        if isinstance(statement, _TERMINAL):
            raise Failed(f"syntax error, statement after a terminal one ({rule.text}): "
                         f"{rule.statements[index + 1]}")
    for name in sorted(rule.chains):
        target = table.chains.get(name)
        if target is None:
            raise Failed(f"Could not process rule: {ENOENT} (chain {name})")
        if target.base is not None:
            raise Failed(f"Could not process rule: {EOPNOTSUPP} (cannot jump to base chain {name})")
    for operand in _operands(rule):
        _check_operand(table.family, operand)
    for index, statement in enumerate(rule.statements):
        _check_statement(table, statement, rule.statements[:index])


def _operands(rule: Rule) -> Iterator[Selector | BinOp | Jhash | Lookup]:
    for statement in rule.statements:
        if isinstance(statement, (Match, Vmap, SetUpdate, Nat)):
            yield from statement.expr
        elif isinstance(statement, SetMeta):
            yield statement.target
            if not isinstance(statement.value, int):
                yield statement.value


def _check_operand(family: str, operand) -> None:
    if isinstance(operand, (Jhash, Lookup)):
        for part in operand.inputs if isinstance(operand, Jhash) else operand.expr:
            _check_operand(family, part)
        if isinstance(operand, Jhash) and not 0 < operand.mod <= 0xFFFFFFFF:
            raise Failed(f"syntax error, jhash modulus {operand.mod} is out of range")
    elif isinstance(operand, BinOp):
        if operand.type not in ("mark", "integer"):
            raise Failed(f"{operand.op} needs an integer expression, not {operand.left}")
        if not fits("integer", operand.value, ranges=False):
            raise Failed(f"syntax error, {operand.value} is out of range")
        _check_operand(family, operand.left)
    elif operand.family and family not in ("inet", operand.family):
        raise Failed(f"{operand} cannot be used in an {family} table")


def _check_literal(expr: Expr, key: tuple) -> None:
    types = tuple(part.type for part in expr)
    if len(key) != len(types):
        raise Failed(f"datatype mismatch: {len(key)} values for {' . '.join(types)}")
    for type_, value in zip(types, key):
        if not fits(type_, value):
            raise Failed(f"datatype mismatch: {value!r} is not an {type_}")


def _lookup(table: TableState, name: str, expr: Expr, kinds: tuple[str, ...], what: str) -> SetState:
    found = table.sets.get(name)
    if found is None or found.kind not in kinds:
        raise Failed(f"{ENOENT}: no {'/'.join(kinds)} @{name} in table {table.family} {table.name}")
    types = tuple(part.type for part in expr)
    if types != found.spec.key:
        raise Failed(f"datatype mismatch: {what} looks up {' . '.join(types)} in @{name}, which is keyed "
                     f"by {' . '.join(found.spec.key)}")
    return found


def _l4_matched(before: tuple[Statement, ...]) -> bool:
    """A match on the transport protocol (meta l4proto, or a tcp/udp/sctp field) comes first."""
    return any(isinstance(s, Match) and s.op in ("", "==")
               and any(part == L4PROTO or (isinstance(part, Selector) and part.protocol) for part in s.expr)
               for s in before)


def _check_statement(table: TableState, statement: Statement, before: tuple[Statement, ...]) -> None:
    family = table.family
    if isinstance(statement, Counter) and statement.name:
        if statement.name not in table.counters:
            raise Failed(f"{ENOENT}: no counter {statement.name} in table {table.family} {table.name}")
    elif isinstance(statement, Match):
        if isinstance(statement.right, SetRef):
            _lookup(table, statement.right.name, statement.expr, ("set", "map"), "the match")
        elif isinstance(statement.right, AnonSet):
            for key in statement.right.keys:
                _check_literal(statement.expr, key)
        else:
            _check_literal(statement.expr, statement.right)
    elif isinstance(statement, Vmap):
        if isinstance(statement.map, SetRef):
            found = _lookup(table, statement.map.name, statement.expr, ("map",), "vmap")
            if found.spec.data != ("verdict",):
                raise Failed(f"datatype mismatch: vmap @{found.name} does not map to verdicts")
        else:
            for key, verdict in statement.map.entries:
                _check_literal(statement.expr, key)
                if not isinstance(verdict, Verdict):
                    raise Failed(f"datatype mismatch: {verdict!r} is not a verdict")
    elif isinstance(statement, SetUpdate):
        _lookup(table, statement.set, statement.expr, ("set",), statement.op)
    elif isinstance(statement, SetMeta):
        if statement.target not in SETTABLE:
            raise Failed(f"syntax error, only {' and '.join(map(str, SETTABLE))} can be set, not {statement.target}")
        if isinstance(statement.value, int) and not fits("mark", statement.value):
            raise Failed(f"datatype mismatch: {statement.value} is not a mark")
        if isinstance(statement.value, Lookup):
            found = _lookup(table, statement.value.map, statement.value.expr, ("map",), f"{statement.target} set")
            if found.spec.data != ("mark",):
                raise Failed(f"datatype mismatch: {statement.target} set needs a map to mark, @{found.name} maps to "
                             f"{' . '.join(found.spec.data or ())}")
    elif isinstance(statement, Reject):
        kind = statement.how.partition(" ")[0]
        if _REJECT_FAMILIES.get(kind, family) != family and family != "inet":
            raise Failed(f"reject with {kind} does not fit an {family} table")
    elif isinstance(statement, Nat):
        _check_nat(table, statement, before)


def _check_nat(table: TableState, nat: Nat, before: tuple[Statement, ...]) -> None:
    family = table.family
    if nat.family not in ("ip", "ip6") or family not in ("inet", nat.family):
        raise Failed(f"dnat {nat.family} in an {family} table")
    address = "ipv4_addr" if nat.family == "ip" else "ipv6_addr"
    if nat.map:
        found = _lookup(table, nat.map, nat.expr, ("map",), "dnat")
        if found.spec.data not in ((address,), (address, "inet_service")):
            raise Failed(f"datatype mismatch: dnat {nat.family} needs a map to {address} [. inet_service], "
                         f"@{found.name} maps to {' . '.join(found.spec.data or ())}")
        maps_port = found.spec.data[-1] == "inet_service"
    else:
        if not fits(address, nat.address, ranges=False):
            raise Failed(f"datatype mismatch: {nat.address} is not an {address}")
        if nat.port is not None and not fits("inet_service", nat.port, ranges=False):
            raise Failed(f"datatype mismatch: {nat.port} is not an inet_service")
        maps_port = nat.port is not None
    if maps_port and not _l4_matched(before):
        raise Failed("transport protocol mapping is only valid after transport protocol match")


# ---------------------------------------------------------------------------------------------
# Chain validation, once the whole batch is in

_NAT_HOOKS = {"dnat": ("prerouting", "output"), "masquerade": ("postrouting", "input")}
_REJECT_HOOKS = ("prerouting", "input", "forward", "output")
_CONSTRAINED = {Nat: "dnat", Masquerade: "masquerade", Reject: "reject"}


def validate(table: TableState) -> None:
    """The kernel's chain validation: what every base chain reaches must suit its type and hook."""
    for chain in sorted((c for c in table.chains.values() if c.base is not None), key=lambda c: c.name):
        assert chain.base is not None
        _visit(table, chain.base, chain, (chain.name,), {})


def _visit(table: TableState, base: BaseChain, chain: ChainState, path: tuple[str, ...], done: dict[str, int]) -> None:
    """Checks `chain`, reached from base chain `base` along `path`, and what it jumps to.
    `done`: chain -> the deepest level it was checked at (a check there covers shallower ones)."""
    for rule in chain.rules:
        for statement in rule.statements:
            kind = _CONSTRAINED.get(type(statement), "")
            if kind in _NAT_HOOKS and (base.type != "nat" or base.hook not in _NAT_HOOKS[kind]):
                raise Failed(f"Could not process rule: {EOPNOTSUPP} ({kind} in chain {chain.name} is reached "
                             f"from {base.type} chain {' -> '.join(path)} on hook {base.hook}: {rule.text})")
            if kind == "reject" and base.hook not in _REJECT_HOOKS:
                raise Failed(f"Could not process rule: {EOPNOTSUPP} (reject in chain {chain.name} is reached "
                             f"from hook {base.hook} via {' -> '.join(path)})")
        targets = set(rule.chains)
        for statement in rule.statements:
            if isinstance(statement, Vmap) and isinstance(statement.map, SetRef):
                found = table.sets.get(statement.map.name)
                if found is not None:
                    targets |= {e.value.chain for e in found.elements.values() if e.value.chain}
        for name in sorted(targets):
            if name in path or len(path) >= JUMP_STACK:
                what = "loop" if name in path else f"deeper than {JUMP_STACK} jumps"
                raise Failed(f"Could not process rule: {EMLINK} ({what}: {' -> '.join((*path, name))})")
            if done.get(name, -1) < len(path) and name in table.chains:
                _visit(table, base, table.chains[name], (*path, name), done)
    done[chain.name] = len(path) - 1
