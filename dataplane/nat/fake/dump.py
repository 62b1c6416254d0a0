"""The fake's state as text, sorted, in `nft list ruleset`'s layout.

Tables, then counters, sets and maps, then chains, each by name; elements by
value (addresses numerically); rules keep their order. Two fakes that hold
the same state dump the same text, whatever order it arrived in.
"""

from __future__ import annotations

from .state import TableState
from .values import format_key, sort_key


def dump_tables(tables: dict[tuple[str, str], TableState]) -> str:
    out: list[str] = []
    for key in sorted(tables):
        table = tables[key]
        out.append(f"table {table.family} {table.name} {{")
        out.extend(f"\tcounter {name}" for name in sorted(table.counters))
        for name in sorted(table.sets):
            found = table.sets[name]
            spec = found.spec
            out.append(f"\t{spec.kind} {name} {{")
            out.extend(f"\t\t{line}" for line in spec.lines())
            if found.elements:
                out.append("\t\telements = {")
                items = sorted(found.elements.items(), key=lambda item: tuple(sort_key(c) for c in item[0]))
                for element_key, element in items:
                    text = format_key(spec.key, element_key)
                    if element.comment:
                        text += f' comment "{element.comment}"'
                    if spec.data == ("verdict",):
                        text += f" : {element.value}"
                    elif spec.data is not None:
                        text += f" : {format_key(spec.data, element.value)}"
                    out.append(f"\t\t\t{text}")
                out.append("\t\t}")
            out.append("\t}")
        for name in sorted(table.chains):
            chain = table.chains[name]
            out.append(f"\tchain {name} {{")
            if chain.base is not None:
                base = chain.base
                out.append(f"\t\ttype {base.type} hook {base.hook} priority {base.priority}; policy {base.policy};")
            out.extend(f"\t\t{rule.text}" for rule in chain.rules)
            out.append("\t}")
        out.append("}")
    return "".join(f"{line}\n" for line in out)
