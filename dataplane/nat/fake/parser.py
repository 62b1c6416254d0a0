"""nft script text -> the typed commands the executor runs (ruleset.Operation, commands.Listing).

The parser knows nft's grammar for our subset and nothing of the kernel's
rules: a script is refused here only when nft's own parser would refuse it
(an unknown word, a malformed literal, a missing brace), with its line and
column. What the kernel refuses (a missing chain, a dnat reached from a
filter chain, a port mapping without a protocol match...) is checked by the
executor, on scripts and Transactions alike.

For everything the layout emits, `str(Transaction(parse(text))) == text` and
every parsed Rule equals the one the layout built (tests/unit/test_fake_typed.py).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..expr import (
    AnonMap, AnonSet, BinOp, Counter, Expr, Jhash, Lookup, Masquerade, Match, Nat, Queue, Reject, Rule, Selector,
    SetMeta, SetRef, SetUpdate, Statement, Verdict, Vmap,
)
from ..ruleset import AddRule, BaseChain, Chain, Container, Element, Elements, Operation, Table
from .commands import Command, Listing, TimedElement
from .errors import Invalid
from .fields import BY_WORDS
from .tokens import Cursor, Token, tokenize
from .values import FLAG_TYPES, VERDICTS, parse_number, parse_value

FAMILIES = ("ip", "ip6", "inet")
_VERBS = {
    "add": ("table", "chain", "map", "set", "rule", "element", "counter"),
    "delete": ("table", "chain", "map", "set", "element", "counter"),
    "flush": ("table", "chain", "map", "set"),
    "list": ("ruleset", "tables", "table"),
}
_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
_SELECTOR_STARTS = {words[0] for words in BY_WORDS} | {"numgen", "jhash"}
_TIME = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?$")


class Located(NamedTuple):
    """A parsed command and the tokens an error about it points at."""

    command: Command
    first: Token
    name: Token | None = None
    elements: tuple[Token, ...] = ()  # the first token of each element, in order


def parse(script: str) -> list[Command]:
    """Every command of `script`; raises NftError naming the line of the first syntax error."""
    return [located.command for located in parse_located(script)]


def parse_located(script: str) -> list[Located]:
    return [_command(Cursor(tokens, script)) for tokens in tokenize(script)]


def _command(cur: Cursor) -> Located:
    first = cur.next("a command")
    verb = first.text
    if verb not in _VERBS:
        raise cur.error(f"syntax error, unexpected {verb!r}: only {', '.join(_VERBS)} are supported", first)
    obj = cur.take(*_VERBS[verb]).text
    if verb == "list" and obj != "table":
        cur.finish()
        return Located(Listing(obj), first)
    table = Table(cur.take(*FAMILIES).text, cur.word("a table name").text)
    if obj == "table":
        cur.finish()
        return Located(Listing("table", table) if verb == "list" else Operation(verb, table), first)
    name_token = cur.word(f"a {obj} name")
    name = name_token.text
    if name.startswith("@"):
        raise cur.error("syntax error, a name cannot start with '@'", name_token)
    element_tokens: tuple[Token, ...] = ()
    subject: Chain | Container | AddRule | Elements
    if obj == "chain":
        subject = Chain(name, base=_base_chain(cur) if verb == "add" and cur.peek() == "{" else None)
    elif obj in ("map", "set"):
        subject = _container(cur, name, obj) if verb == "add" else Container(name, kind=obj)
    elif obj == "counter":
        if verb == "add" and cur.accept("{"):
            while not cur.accept("}"):
                if not cur.accept(";"):
                    cur.take("packets", "bytes")
                    cur.word("a number")
        subject = Container(name, kind="counter")
    elif obj == "rule":
        subject = AddRule(name, _rule(cur, table.family))
    else:
        elements, element_tokens = _elements(cur, name, with_values=verb == "add")
        subject = Elements(name, elements)
    cur.finish()
    return Located(Operation(verb, table, subject), first, name_token, element_tokens)


def _base_chain(cur: Cursor) -> BaseChain:
    cur.take("{")
    cur.take("type")
    type_ = cur.take("filter", "nat").text
    cur.take("hook")
    hook = cur.take(*_HOOKS).text
    cur.take("priority")
    token = cur.word("a priority")
    if token.text in _PRIORITIES:
        priority = _PRIORITIES[token.text]
    else:
        try:
            priority = int(token.text)
        except ValueError:
            raise cur.error(f"syntax error, {token.text!r} is not a priority", token) from None
    policy = "accept"
    while not cur.accept("}"):
        if cur.accept(";"):
            continue
        cur.take("policy")
        policy = cur.take("accept", "drop").text
    return BaseChain(type_, hook, priority, policy)


def _seconds(cur: Cursor) -> int:
    token = cur.word("a time")
    if token.text.isdigit():
        return int(token.text)
    match = _TIME.match(token.text)
    if not token.text or match is None or not any(match.groups()):
        raise cur.error(f"syntax error, {token.text!r} is not a time (like 600s, 10m, 3h)", token)
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _container(cur: Cursor, name: str, kind: str) -> Container:
    """`{ type A . B [: C] | typeof EXPR [: EXPR] ; [flags F,... ;] [timeout 10s ;] }`; whether the
    types, flags and shape make sense is the executor's to say (SetSpec.of), for scripts and Transactions alike."""
    cur.take("{")
    key: tuple = ()
    value: tuple = ()
    typeof = False
    flags: tuple[str, ...] = ()
    timeout = 0
    while not cur.at_end() and cur.peek() != "}":
        if cur.accept(";"):
            continue
        word = cur.take("type", "typeof", "flags", "timeout").text
        if word in ("type", "typeof"):
            typeof = word == "typeof"
            key = _type_list(cur, typeof, data=False)
            value = _type_list(cur, typeof, data=True) if cur.accept(":") else ()
        elif word == "flags":
            names = [cur.word("a flag").text]
            while cur.accept(","):
                names.append(cur.word("a flag").text)
            flags = tuple(names)
        else:
            timeout = _seconds(cur)
    cur.take("}")
    return Container(name, key, value, kind, typeof, flags, timeout)


def _type_list(cur: Cursor, typeof: bool, data: bool) -> tuple:
    if data and cur.accept("verdict"):
        return ("verdict",)
    if typeof:
        return _expr(cur)
    types = [cur.word("a type").text]
    while cur.accept("."):
        types.append(cur.word("a type").text)
    return tuple(types)


def _elements(cur: Cursor, container: str, with_values: bool) -> tuple[tuple, tuple[Token, ...]]:
    """Elements as text (key, value, comment), for the executor to read against the set's types."""
    cur.take("{")
    elements: list[Element | TimedElement] = []
    firsts: list[Token] = []
    while not cur.accept("}"):
        first = cur.word("an element key")
        key = [first.text]
        while cur.accept("."):
            key.append(cur.word("a key component").text)
        comment, timeout = "", None
        while cur.peek() in ("comment", "timeout", "expires"):
            word = cur.next("comment or timeout").text
            if word == "comment":
                token = cur.next("a quoted comment")
                if not token.text.startswith('"'):
                    raise cur.error("syntax error, a comment is a quoted string", token)
                comment = token.text[1:-1]
            elif word == "timeout":
                timeout = _seconds(cur)
            else:
                _seconds(cur)
        value = ""
        if cur.accept(":"):
            words = [cur.word("a value").text]
            if words[0] in ("jump", "goto"):
                words.append(cur.word("a chain name").text)
                value = " ".join(words)
            else:
                while cur.accept("."):
                    words.append(cur.word("a value component").text)
                value = " . ".join(words)
            if not with_values:
                value = ""  # nft accepts a value on delete, and ignores it
        text_key = " . ".join(key)
        elements.append(Element(container, text_key, value, comment) if timeout is None
                        else TimedElement(container, text_key, value, comment, timeout))
        firsts.append(first)
        if cur.accept("}"):
            break
        cur.take(",", "}")
    return tuple(elements), tuple(firsts)


# ---------------------------------------------------------------------------------------------
# Rules


def _number(cur: Cursor, what: str) -> int:
    token = cur.word(what)
    try:
        return parse_number(token.text, 0xFFFFFFFF)
    except Invalid as error:
        raise cur.error(f"syntax error, {error}", token) from None


def _jhash(cur: Cursor, first: Token) -> Jhash:
    """`jhash EXPR mod N [seed S] [offset 0]`; the inputs are a concatenation of packet fields."""
    inputs = _expr(cur)
    if not all(isinstance(part, Selector) and not part.modulus for part in inputs):
        raise cur.error("syntax error, jhash hashes packet fields", first)
    cur.take("mod")
    mod = _number(cur, "a modulus")
    if mod == 0:
        raise cur.error("syntax error, jhash modulus must be positive", first)
    seed = _number(cur, "a seed") if cur.accept("seed") else 0
    if cur.accept("offset") and _number(cur, "an offset") != 0:
        raise cur.error("syntax error, a jhash offset is not supported by this fake", first)
    return Jhash(inputs, mod, seed)


def _selector(cur: Cursor) -> Selector | Jhash:
    first = cur.next("an expression")
    if first.text == "jhash":
        return _jhash(cur, first)
    if first.text == "numgen":
        how = cur.take("random", "inc")
        cur.take("mod")
        token = cur.word("a modulus")
        try:
            modulus = parse_number(token.text, 0xFFFFFFFF)
        except Invalid as error:
            raise cur.error(f"syntax error, {error}", token) from None
        if modulus == 0:
            raise cur.error("syntax error, numgen modulus must be positive", token)
        return Selector(f"numgen {how.text} mod {modulus}", "integer", modulus=modulus)
    words: tuple[str, ...] = (first.text,)
    while words not in BY_WORDS:
        candidates = [w for w in BY_WORDS if w[:len(words)] == words]
        if not candidates:
            raise cur.error(f"syntax error, unexpected {' '.join(words)!r}: not an expression this fake knows", first)
        words += (cur.take(*sorted({w[len(words)] for w in candidates})).text,)
    return BY_WORDS[words]


def _expr(cur: Cursor) -> Expr:
    parts = [_operand(cur)]
    while cur.peek() == "." and cur.peek(1) in _SELECTOR_STARTS:
        cur.take(".")
        parts.append(_operand(cur))
    return tuple(parts)


def _operand(cur: Cursor) -> Selector | BinOp | Jhash:
    operand: Selector | BinOp | Jhash = _selector(cur)
    while cur.peek() in ("&", "|", "^"):
        if isinstance(operand, Jhash):
            raise cur.error("syntax error, a jhash is not combined with a constant here", cur.tokens[cur.i])
        op = cur.next("an operator").text
        token = cur.word("a constant")
        try:
            operand = BinOp(operand, op, parse_number(token.text, 0xFFFFFFFF))
        except Invalid as error:
            raise cur.error(f"syntax error, {error}", token) from None
    return operand


def _literal_key(cur: Cursor, types: tuple[str, ...], ranges: bool) -> tuple:
    values = []
    for index, type_ in enumerate(types):
        if index:
            cur.take(".")
        token = cur.word(f"a {type_} value")
        try:
            values.append(parse_value(type_, token.text, ranges))
        except Invalid as error:
            raise cur.error(f"datatype mismatch: {error}", token) from None
    return tuple(values)


def _verdict(cur: Cursor) -> Verdict:
    word = cur.take(*VERDICTS).text
    if word in ("jump", "goto"):
        return Verdict(word, cur.word("a chain name").text)
    return Verdict(word)


def _rule(cur: Cursor, family: str) -> Rule:
    if cur.at_end():
        raise cur.error("syntax error, a rule needs at least one statement", cur.last())
    statements: list[Statement] = []
    while not cur.at_end():
        word = cur.peek()
        start = cur.tokens[cur.i]
        if word in VERDICTS:
            statements.append(_verdict(cur))
        elif word == "reject":
            cur.next("reject")
            how = ""
            if cur.accept("with"):
                kind = cur.take("icmp", "icmpv6", "icmpx", "tcp").text
                if kind == "tcp":
                    cur.take("reset")
                    how = "tcp reset"
                else:
                    cur.take("type")
                    how = f"{kind} type {cur.word('an icmp type').text}"
            statements.append(Reject(how))
        elif word == "dnat":
            statements.append(_nat(cur, family))
        elif word == "masquerade":
            cur.next("masquerade")
            flags: list[str] = []
            while cur.peek() in ("fully-random", "random", "persistent"):
                flags.append(cur.next("a flag").text)
                cur.accept(",")
            statements.append(Masquerade(tuple(flags)))
        elif word in ("update", "add") and (cur.peek(1) or "").startswith("@"):
            op = cur.next(word).text
            name = cur.next("@set").text[1:]
            cur.take("{")
            expr = _expr(cur)
            cur.take("}")
            statements.append(SetUpdate(op, name, expr))
        elif word == "counter":
            cur.next("counter")
            name = ""
            if cur.accept("name"):
                name = cur.next("a counter name").text.strip('"')
            elif cur.accept("packets"):
                cur.word("a number")
                cur.take("bytes")
                cur.word("a number")
            statements.append(Counter(name))
        elif word == "queue":
            cur.next("queue")
            cur.take("num")
            numbers = cur.word("queue numbers").text
            queue_flags: set[str] = set()
            while cur.peek() in ("bypass", "fanout"):
                queue_flags.add(cur.next("a queue flag").text)
                if not cur.accept(","):
                    break
            statements.append(Queue(numbers, "bypass" in queue_flags, "fanout" in queue_flags))
        elif word in _SELECTOR_STARTS:
            statements.append(_expression_statement(cur, start))
        else:
            raise cur.error(f"syntax error, unexpected {word!r}: not a statement this fake knows", start)
    return Rule(tuple(statements))


def _expression_statement(cur: Cursor, start: Token) -> Statement:
    """A statement that starts with an expression: `EXPR set VALUE`, `EXPR vmap ...` or a match."""
    expr = _expr(cur)
    if cur.accept("set"):
        if len(expr) != 1 or not isinstance(expr[0], Selector):
            raise cur.error("syntax error, only a single field can be set", start)
        if cur.peek() in _SELECTOR_STARTS:
            value_expr = _expr(cur)
            if cur.accept("map"):
                name = cur.next("@map").text
                if not name.startswith("@"):
                    raise cur.error("syntax error, only named maps are supported here", cur.last())
                return SetMeta(expr[0], Lookup(value_expr, name[1:]))
            if len(value_expr) != 1:
                raise cur.error("syntax error, a mark is not a concatenation", start)
            value: Selector | BinOp | int = value_expr[0]
        else:
            (value,) = _literal_key(cur, ("mark",), ranges=False)
        return SetMeta(expr[0], value)
    if cur.accept("vmap"):
        if (cur.peek() or "").startswith("@"):
            return Vmap(expr, SetRef(cur.next("@map").text[1:]))
        return Vmap(expr, _anon_map(cur, expr))
    op = cur.next("an operator").text if cur.peek() in ("==", "!=", "!") else ""
    types = tuple(part.type for part in expr)
    right: tuple | SetRef | AnonSet
    if (cur.peek() or "").startswith("@"):
        right = SetRef(cur.next("@set").text[1:])
    elif cur.peek() == "{":
        right = _anon_set(cur, types)
    else:
        right = _literal_key(cur, types, ranges=True)
    return Match(expr, op, right)


def _nat(cur: Cursor, family: str) -> Nat:
    kind = cur.next("dnat").text
    nat_family = family if family != "inet" else ""
    if cur.peek() in ("ip", "ip6") and cur.peek(1) == "to":
        nat_family = cur.next("ip or ip6").text
    cur.take("to")
    if not nat_family:
        raise cur.error("dnat in an inet table needs ip or ip6", cur.last())
    if cur.peek() in _SELECTOR_STARTS:
        expr = _expr(cur)
        cur.take("map")
        name = cur.next("@map").text
        if not name.startswith("@"):
            raise cur.error("syntax error, only named maps are supported in dnat", cur.last())
        return Nat(kind, nat_family, expr=expr, map=name[1:])
    token = cur.word("an address")
    text = token.text
    address_type = "ipv4_addr" if nat_family == "ip" else "ipv6_addr"
    port = None
    if nat_family == "ip6" and text.startswith("["):
        address_text, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise cur.error(f"syntax error, {text!r} is not [address]:port", token)
            port_text = rest[1:]
        else:
            port_text = None
    elif nat_family == "ip" and ":" in text:
        address_text, _, port_text = text.partition(":")
    else:
        address_text, port_text = text, None
    try:
        address = parse_value(address_type, address_text)
        if port_text is not None:
            port = parse_value("inet_service", port_text)
    except Invalid as error:
        raise cur.error(f"datatype mismatch: {error}", token) from None
    return Nat(kind, nat_family, address=address, port=port)


def _anon_set(cur: Cursor, types: tuple[str, ...]) -> AnonSet:
    cur.take("{")
    keys = []
    while not cur.accept("}"):
        keys.append(_literal_key(cur, types, ranges=True))
        if cur.peek() != "}":
            cur.take(",")
    if not keys:
        raise cur.error("syntax error, an empty anonymous set", cur.last())
    if len(types) == 1 and types[0] in FLAG_TYPES:
        return AnonSet(((frozenset().union(*(k[0] for k in keys)),),))  # flags: one key, their union
    return AnonSet(tuple(keys))


def _anon_map(cur: Cursor, expr: Expr) -> AnonMap:
    types = tuple(part.type for part in expr)
    cur.take("{")
    entries = []
    while not cur.accept("}"):
        key = _literal_key(cur, types, ranges=True)
        cur.take(":")
        entries.append((key, _verdict(cur)))
        if cur.peek() != "}":
            cur.take(",")
    return AnonMap(tuple(entries))
