"""Every packet field the fake knows, as the expr.Selector values the layout builds.

The parser finds them by their words, the tracer by value (which field of
the packet each one reads): neither ever looks inside a selector's text.
"""

from __future__ import annotations

from ..expr import CT_STATE, CT_STATUS, DPORT, FIB_SADDR_TYPE, L4PROTO, MARK, PROTOCOLS, Selector, daddr, saddr

CT_MARK = Selector("ct mark", "mark")
SPORT = Selector("th sport", "inet_service")
FIB_DADDR_TYPE = Selector("fib daddr type", "fib_addrtype")

# selector -> the packet field it reads (trace.py)
FIELDS: dict[Selector, str] = {
    saddr("ip"): "saddr", saddr("ip6"): "saddr", daddr("ip"): "daddr", daddr("ip6"): "daddr",
    L4PROTO: "l4proto", DPORT: "dport", SPORT: "sport", MARK: "mark", CT_MARK: "ct mark",
    CT_STATE: "ct state", CT_STATUS: "ct status", FIB_SADDR_TYPE: "fib saddr type", FIB_DADDR_TYPE: "fib daddr type",
    **{Selector(f"{proto} {port}", "inet_service", protocol=PROTOCOLS[proto]): port[0] + "port"
       for proto in ("tcp", "udp", "sctp") for port in ("dport", "sport")},
}
# their words -> selector (parser.py); numgen is built from its modulus
BY_WORDS: dict[tuple[str, ...], Selector] = {tuple(selector.text.split()): selector for selector in FIELDS}
SETTABLE = (MARK, CT_MARK)  # what `... set VALUE` may write
