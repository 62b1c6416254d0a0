"""Pick tables: the balancer's random and round-robin ports as arrays the compiled loop reads (nfqueue._nfqueue).

Pure, apart from the counts the compiled loop writes into the arrays. A
table maps key(daddr, protocol, port) of an IPv4 frontend (a Service
address, or a node address and NodePort) to (kind, marks, counts, cursor):
one mark per slot (random: a target `weight` times, as PortState.slots;
round-robin: PortState.sequence), the flows decided per slot, and the
round-robin position. Ports a table cannot decide alone stay out and go to
the balancer itself: ClientIP affinity (per-client state), least-conn (live
counts), Maglev (a hash of the flow), a random port too weighted for slots,
IPv6, and ports without endpoints (counted as undecided there).

`fold()` hands what the compiled loop decided back to the balancer (its
per-endpoint counts and the round-robin position), so /status and /metrics,
and the next table, carry on from there. An entry names each slot's target
by id, not by its index in the port's targets, so a table may be folded
after the balancer renumbered them: the forwarder builds the next table
outside its lock, while the loop goes on with the last one, and folds that
one when it swaps them. A port's round-robin position is one array that
every table built from the last one shares, so a swap never moves it back.
"""

from __future__ import annotations

from array import array
from typing import Callable

KIND = {"random": 0, "round-robin": 1}


def key(daddr: bytes, protocol: int, port: int) -> int:
    """The table key of an IPv4 frontend (the compiled loop computes the same from the packet)."""
    return (int.from_bytes(daddr, "big") << 24) | (protocol << 16) | port


class Entry(tuple):
    """(kind, marks, counts, cursor, port state, slot -> target id); the loop reads the first four."""

    __slots__ = ()


def entry_for(port, cursor: array | None = None) -> Entry | None:
    """A PortState's entry, or None when the balancer must decide its packets itself.

    `cursor`: the round-robin position array to go on with (the last table's for this port).
    """
    table = port.table
    kind = KIND.get(table.algorithm)
    if kind is None or table.affinity_timeout is not None or not port.targets:
        return None
    slots = port.slots if kind == KIND["random"] else port.sequence
    if not slots:
        return None
    marks = array("I", (port.marks[i] for i in slots))
    if cursor is None:
        cursor = array("Q", (port.cursor if kind == KIND["round-robin"] else 0,))
    ids = port.ids
    return Entry((kind, marks, array("Q", bytes(8 * len(slots))), cursor, port, tuple(ids[i] for i in slots)))


def build(balancer, last: dict[int, Entry] | None = None) -> dict[int, Entry]:
    """The pick table of a balancer now: its frontends, and its NodePorts on every IPv4 node address.

    `last`: the table the loop uses now; a port keeps its round-robin position array from it.
    """
    found: dict[int, Entry] = {}
    entries: dict[int, Entry | None] = {}  # id(port state) -> its entry: one per port, shared by its keys
    # (`last` holds its port states, so no id() here is one of a port state freed meanwhile)
    cursors = {id(e[4]): e[3] for e in (last or {}).values()}

    def of(port) -> Entry | None:
        if id(port) not in entries:
            entries[id(port)] = entry_for(port, cursors.get(id(port)))
        return entries[id(port)]

    v4_node_ips = [ip for ip in balancer.node_ips if len(ip) == 4]
    for (family, protocol, node_port), port in balancer.nodeports.items():
        entry = of(port) if family == 4 else None
        if entry is not None:
            for ip in v4_node_ips:
                found[key(ip, protocol, node_port)] = entry
    for (daddr, protocol, port_number), port in balancer.frontends.items():  # a frontend wins over a NodePort
        k = key(daddr, protocol, port_number) if len(daddr) == 4 else None
        if k is None:
            continue
        entry = of(port)
        if entry is not None:
            found[k] = entry
        else:
            found.pop(k, None)  # the balancer decides, as decide() would find the frontend first
    return found


def fold(table: dict[int, Entry], drain: Callable[[array], list[int]]) -> int:
    """Adds what the loop decided to each port's counts, moves round-robin on; returns how many flows.

    `drain` reads and zeroes a counts array in one step (the compiled loop's).
    """
    total = 0
    for entry in {id(e): e for e in table.values()}.values():
        kind, _, counts, cursor, port, ids = entry
        decided = port.decided
        for slot, n in enumerate(drain(counts)):
            if n:
                target_id = ids[slot]
                decided[target_id] = decided.get(target_id, 0) + n
                total += n
        if kind == KIND["round-robin"] and port.sequence:
            port.cursor = cursor[0] % len(port.sequence)
    return total
