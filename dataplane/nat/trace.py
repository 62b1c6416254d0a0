"""A packet tracer over FakeNftables: every outcome the first packet of a new connection may meet.

It interprets the rules the fake holds, statement by statement, and knows
nothing of Services: a wrong rule gives a wrong answer, which is what lets a
packet-flow table check the renderer. Where the kernel picks at random
(`numgen random mod N`) the tracer follows all N branches, so a trace is the
set of every possible outcome, not a sample. Where it hashes the flow
(`jhash ... mod M seed S`, a balancing table) the tracer computes the one
slot the kernel computes, bit for bit (lb/tables.jhash; checked against the
kernel in tests/e2e/test_tables_kernel.py), so such a trace has one outcome per source port.

Hooks, in the kernel's order (priorities from the base chains themselves):

    from outside     prerouting (filter -110, nat -100, ...) -> routing -> postrouting (nat 100)
    from the node    output     (filter -110, nat -100, ...) -> routing -> postrouting (nat 100)

Base chains of the packet's family (and `inet`) run in priority order.
`accept` ends one base chain; `drop` and `reject` end the packet; `dnat` and
`masquerade` accept, as in the kernel, and once a nat chain has translated
the connection, later nat chains of that hook are skipped (nf_nat's loop).
Only new connections are traced: `ct state` is new, `ct status` holds dnat
once a dnat ran. Local delivery (input) is not modelled: an accepted packet
goes on to postrouting whatever its address.

Dynamic sets (`update @set { ip saddr }`) are modelled per trace: a Path
carries what it learned, and a later trace may start `after` earlier paths
(a second connection from the same client), or the updates may be written
into the fake with `FakeNftables.learn`.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from ..lb.tables import jhash, register_bytes, scale
from .expr import (
    MARK, AnonMap, AnonSet, BinOp, Counter, Jhash, Lookup, Masquerade, Match, Nat, Queue, Reject, Rule, Selector,
    SetMeta, SetRef, SetUpdate, Verdict, Vmap,
)
from .fake import FLAG_TYPES, ChainState, FakeNftables, Learned, TableState, key_matches
from .fake.fields import FIELDS

# Statement results
NEXT = "next"  # go on with the rule's next statement
NEXT_RULE = "next-rule"  # the rule is done (or did not match): the chain's next rule
RETURN = "return"
ACCEPT, DROP, REJECT, QUEUE = "ACCEPT", "DROP", "REJECT", "QUEUE"
DNAT = "DNAT"

JUMP_STACK = 16  # the kernel's NFT_JUMP_STACK_SIZE


class TraceError(RuntimeError):
    """The ruleset does something the tracer cannot follow (too deep, or not modelled)."""


@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a new connection."""

    saddr: str
    daddr: str
    protocol: str = "tcp"  # tcp, udp or sctp
    dport: int = 80
    sport: int = 40000
    from_node: bool = False  # sent by the node itself: the output hook instead of prerouting
    saddr_local: bool | None = None  # `fib saddr type local`; None: the same as from_node
    mark: int = 0

    @property
    def family(self) -> str:
        return "ip" if ipaddress.ip_address(self.saddr).version == 4 else "ip6"


@dataclass(frozen=True, slots=True, order=True)
class Outcome:
    verdict: str  # DNAT, ACCEPT (untranslated), DROP, REJECT, QUEUE
    address: str = ""  # after DNAT: the endpoint
    port: int = 0
    masqueraded: bool = False

    @property
    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"

    def __str__(self) -> str:
        if self.verdict in (DROP, REJECT, QUEUE):
            return self.verdict
        target = self.endpoint if self.verdict == DNAT else "ACCEPT (untranslated)"
        return f"{target}{' masqueraded' if self.masqueraded else ''}"


@dataclass(frozen=True, slots=True)
class Path:
    """One way through the hooks: its outcome, what it taught dynamic sets, and the rules that acted."""

    outcome: Outcome
    learned: tuple[Learned, ...] = ()
    steps: tuple[str, ...] = ()

    def explain(self) -> str:
        return "\n".join((*self.steps, f"=> {self.outcome}"))


@dataclass(frozen=True, slots=True)
class _State:
    saddr: ipaddress.IPv4Address | ipaddress.IPv6Address
    daddr: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dport: int
    mark: int
    dnat: bool = False
    masqueraded: bool = False
    learned: tuple[Learned, ...] = ()
    steps: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Context:
    packet: Packet
    protocol: int
    saddr_local: bool
    hook: str
    now: float
    known: tuple[Learned, ...]  # learned before this trace (from `after`)


_PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}


class Tracer:
    """Traces packets through the tables a FakeNftables holds now."""

    def __init__(self, nft: FakeNftables, max_paths: int = 100_000):
        self.nft = nft
        self.max_paths = max_paths

    def outcomes(self, packet: Packet, after: Iterable[Path] = (), now: float | None = None) -> frozenset[Outcome]:
        return frozenset(path.outcome for path in self.trace(packet, after, now))

    def trace(self, packet: Packet, after: Iterable[Path] = (), now: float | None = None) -> list[Path]:
        """Every path the packet may take; `after`: paths of earlier connections, whose dynamic-set
        updates this one sees. Raises TraceError for what the tracer cannot follow."""
        if packet.protocol not in _PROTOCOLS:
            raise TraceError(f"protocol {packet.protocol!r}: only tcp, udp and sctp are traced")
        family = packet.family
        if ipaddress.ip_address(packet.daddr).version != ipaddress.ip_address(packet.saddr).version:
            raise TraceError("source and destination are of different families")
        now = self.nft.clock() if now is None else now
        known = tuple(update for path in after for update in path.learned)
        tables = [t for (f, _), t in sorted(self.nft.tables().items()) if f in (family, "inet")]
        saddr_local = packet.from_node if packet.saddr_local is None else packet.saddr_local
        start = _State(ipaddress.ip_address(packet.saddr), ipaddress.ip_address(packet.daddr), packet.sport,
                       packet.dport, packet.mark)
        live = [start]
        finished: list[Path] = []
        for hook in ("output" if packet.from_node else "prerouting", "postrouting"):
            ctx = _Context(packet, _PROTOCOLS[packet.protocol], saddr_local, hook, now, known)
            base_chains = sorted(((c.base.priority, t.family, t.name, c.name), t, c)
                                 for t in tables for c in t.chains.values() if c.base and c.base.hook == hook)
            for _, table, chain in base_chains:
                next_live = []
                for state in live:
                    assert chain.base is not None
                    if chain.base.type == "nat" and (state.masqueraded if hook == "postrouting" else state.dnat):
                        next_live.append(state)  # already translated: nf_nat skips later nat chains
                        continue
                    for result_state, result in self._chain(ctx, state, table, chain, 0, 0):
                        if result == RETURN:
                            result = chain.base.policy.upper()
                        if result == ACCEPT:
                            next_live.append(result_state)
                        else:
                            finished.append(self._path(result_state, Outcome(result)))
                        if len(next_live) + len(finished) > self.max_paths:
                            raise TraceError(f"more than {self.max_paths} paths")
                live = next_live
        for state in live:
            if state.dnat:
                outcome = Outcome(DNAT, str(state.daddr), state.dport, state.masqueraded)
            else:
                outcome = Outcome(ACCEPT, masqueraded=state.masqueraded)
            finished.append(self._path(state, outcome))
        return finished

    @staticmethod
    def _path(state: _State, outcome: Outcome) -> Path:
        return Path(outcome, state.learned, state.steps)

    # chains and rules
    def _chain(self, ctx: _Context, state: _State, table: TableState, chain: ChainState, jumps: int,
               depth: int) -> Iterator[tuple[_State, str]]:
        if jumps > JUMP_STACK or depth > 4 * JUMP_STACK:
            raise TraceError(f"jump stack overflow at chain {chain.name}")
        pending = [(0, state)]
        while pending:
            index, current = pending.pop()
            if index == len(chain.rules):
                yield current, RETURN
                continue
            for after, result in self._rule(ctx, current, table, chain, chain.rules[index], jumps, depth):
                if result == NEXT_RULE:
                    pending.append((index + 1, after))
                else:
                    yield after, result

    def _rule(self, ctx: _Context, state: _State, table: TableState, chain: ChainState, rule: Rule, jumps: int,
              depth: int) -> Iterator[tuple[_State, str]]:
        def run(index: int, current: _State, noted: bool) -> Iterator[tuple[_State, str]]:
            if index == len(rule.statements):
                yield current, NEXT_RULE
                return
            statement = rule.statements[index]
            if not noted and not isinstance(statement, Match):
                current = replace(current, steps=current.steps + (f"{ctx.hook} {chain.name}: {rule.text}",))
                noted = True
            for after, result in self._statement(ctx, current, table, statement, jumps, depth):
                if result == NEXT:
                    yield from run(index + 1, after, noted)
                else:
                    yield after, result

        yield from run(0, state, False)

    def _statement(self, ctx: _Context, state: _State, table: TableState, statement, jumps: int,
                   depth: int) -> Iterator[tuple[_State, str]]:
        if isinstance(statement, Match):
            values = self._values(ctx, state, statement.expr)
            if not values:
                yield state, NEXT_RULE  # the field is absent (tcp dport on udp): no match
            for value in values:
                yield state, NEXT if self._match(ctx, state, table, statement, value) else NEXT_RULE
        elif isinstance(statement, Verdict):
            yield from self._verdict(ctx, state, table, statement, jumps, depth)
        elif isinstance(statement, Vmap):
            values = self._values(ctx, state, statement.expr)
            if not values:
                yield state, NEXT_RULE
            for value in values:
                verdict = self._vmap(ctx, table, statement, value)
                if verdict is None:
                    yield state, NEXT_RULE
                else:
                    yield from self._verdict(ctx, state, table, verdict, jumps, depth)
        elif isinstance(statement, SetMeta):
            if statement.target != MARK:
                raise TraceError(f"setting {statement.target} is not modelled")
            if isinstance(statement.value, int):
                marks = [statement.value]
            elif isinstance(statement.value, Lookup):
                marks = []
                for key in self._values(ctx, state, statement.value.expr):
                    element = table.sets[statement.value.map].lookup(key, ctx.now)
                    if element is not None:
                        marks.append(element.value[0])
                if not marks:
                    yield state, NEXT_RULE  # a map miss breaks the rule
            else:
                marks = self._operand(ctx, state, statement.value)
            for mark in marks:
                yield replace(state, mark=mark), NEXT
        elif isinstance(statement, SetUpdate):
            target = table.sets[statement.set]
            timeout = target.spec.timeout
            for value in self._values(ctx, state, statement.expr):
                expires = ctx.now + timeout if timeout is not None else float("inf")
                update = Learned(table.family, table.name, statement.set, value, expires)
                yield replace(state, learned=state.learned + (update,)), NEXT
        elif isinstance(statement, Nat):
            if statement.map:
                values = self._values(ctx, state, statement.expr)
                if not values:
                    yield state, NEXT_RULE
                for value in values:
                    element = table.sets[statement.map].lookup(value, ctx.now)
                    if element is None:
                        yield state, NEXT_RULE  # a map miss breaks the rule
                        continue
                    address, *port = element.value
                    yield replace(state, daddr=address, dport=port[0] if port else state.dport, dnat=True), ACCEPT
            else:
                port = statement.port if statement.port is not None else state.dport
                yield replace(state, daddr=statement.address, dport=port, dnat=True), ACCEPT
        elif isinstance(statement, Masquerade):
            yield replace(state, masqueraded=True), ACCEPT
        elif isinstance(statement, Reject):
            yield state, REJECT
        elif isinstance(statement, Queue):
            yield state, QUEUE
        elif isinstance(statement, Counter):
            yield state, NEXT
        else:
            raise TraceError(f"statement {statement!r} is not modelled")

    def _verdict(self, ctx: _Context, state: _State, table: TableState, verdict: Verdict, jumps: int,
                 depth: int) -> Iterator[tuple[_State, str]]:
        kind = verdict.kind
        if kind in ("accept", "drop"):
            yield state, kind.upper()
        elif kind == "return":
            yield state, RETURN
        elif kind == "continue":
            yield state, NEXT_RULE
        else:
            target = table.chains.get(verdict.chain)
            if target is None:
                raise TraceError(f"{kind} to missing chain {verdict.chain}")
            pushed = jumps + 1 if kind == "jump" else jumps
            for after, result in self._chain(ctx, state, table, target, pushed, depth + 1):
                if result == RETURN and kind == "jump":
                    yield after, NEXT_RULE  # back in the caller, after the jumping rule
                else:
                    yield after, result  # goto: the called chain's return is this chain's return

    def _vmap(self, ctx: _Context, table: TableState, statement: Vmap, value: tuple) -> Verdict | None:
        if isinstance(statement.map, AnonMap):
            return next((verdict for key, verdict in statement.map.entries if key_matches(key, value)), None)
        element = table.sets[statement.map.name].lookup(value, ctx.now)
        return element.value if element is not None else None

    # expressions
    def _values(self, ctx: _Context, state: _State, expr: tuple) -> list[tuple]:
        """Every value the concatenation may take: one, or N for numgen mod N; none if a field is absent."""
        return list(itertools.product(*(self._operand(ctx, state, part) for part in expr)))

    def _operand(self, ctx: _Context, state: _State, part: Selector | BinOp) -> list:
        if isinstance(part, BinOp):
            values = self._operand(ctx, state, part.left)
            if part.op == "&":
                return [v & part.value for v in values]
            if part.op == "|":
                return [v | part.value for v in values]
            return [v ^ part.value for v in values]
        if part.modulus:
            return list(range(part.modulus))
        if isinstance(part, Jhash):
            # The registers the kernel hashes: each input's value, padded to 4-byte words.
            slots = []
            for values in itertools.product(*(self._operand(ctx, state, p) for p in part.inputs)):
                data = b"".join(register_bytes(p.type, v) for p, v in zip(part.inputs, values))
                slots.append(scale(jhash(data, part.seed), part.mod))
            return slots
        field = FIELDS.get(part)
        if part.protocol and part.protocol != ctx.protocol:
            return []  # tcp dport and the like: absent from other protocols' packets
        if field == "saddr":
            return [state.saddr]
        if field == "daddr":
            return [state.daddr]
        if field == "l4proto":
            return [ctx.protocol]
        if field == "dport":
            return [state.dport]
        if field == "sport":
            return [state.sport]
        if field == "mark":
            return [state.mark]
        if field == "ct state":
            return [frozenset({"new"})]
        if field == "ct status":
            return [frozenset({"dnat"}) if state.dnat else frozenset()]
        if field == "ct mark":
            return [0]
        if field == "fib saddr type":
            return [frozenset({"local" if ctx.saddr_local else "unicast"})]
        raise TraceError(f"{part} is not modelled")

    def _match(self, ctx: _Context, state: _State, table: TableState, match: Match, value: tuple) -> bool:
        negate = match.op in ("!=", "!")
        flags = len(match.expr) == 1 and match.expr[0].type in FLAG_TYPES
        right = match.right
        if isinstance(right, SetRef):
            hit = table.sets[right.name].lookup(value, ctx.now) is not None or self._learned(
                ctx, state, table, right.name, value)
        elif isinstance(right, AnonSet):
            hit = any(self._equal(key, value, flags) for key in right.keys)
        else:
            hit = self._equal(right, value, flags)
        return hit != negate

    @staticmethod
    def _equal(key: tuple, value: tuple, flags: bool) -> bool:
        if flags:
            return bool(key[0] & value[0])
        return key_matches(key, value)

    @staticmethod
    def _learned(ctx: _Context, state: _State, table: TableState, name: str, value: tuple) -> bool:
        return any(update.set == name and update.table == table.name and update.family == table.family
                   and update.key == value and update.expires > ctx.now
                   for update in ctx.known + state.learned)
