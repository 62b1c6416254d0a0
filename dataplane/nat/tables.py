"""Balancing tables as map elements: a Service port's Maglev (or weighted) table in `slots-M`.

Invariants:
- One table per Service port and endpoint set, whatever its addresses: the ClusterIP, the
  external and LoadBalancer IPs and the NodePort map to the same table id (`table-ids`,
  `nodeport-table-ids`), so the port's M slots exist once (README, "Balancing tables").
- A table id is a hash of the Service port's name and role (`TableIdAllocator`): it stays
  while the port exists, so a change of endpoints changes only the slot elements whose
  endpoint Maglev moved (the planner diffs elements; unchanged slots are the same elements),
  and the same Services give the same ids in every process.
- Ids are marks in userspace mode's id bits (marks.mark_for): the bits kube-proxy gives
  meaning to (0x4000, 0x8000) and the queue bit stay free.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Hashable, NamedTuple, Sequence

from ..lb import maglev
from ..lb import tables as lb_tables
from ..marks import MAX_ID, mark_for
from ..model import Backend, Service
from . import layout
from .expr import Jhash, Vmap
from .ruleset import Chain, Element, Fragment, Ruleset


def id_text(table_id: int) -> str:
    """A table id as the mark literal the maps hold."""
    return f"0x{mark_for(table_id):08x}"


class TableIdAllocator:
    """Ids for (owner, table) pairs: a hash of the table's name, so the same Services get the same
    ids whatever the order they came in (an incremental sync converges to a full one, and a
    restarted daemon writes what the kernel already holds); an owner's ids are released when it
    stops using them.

    Two names hashing alike (about 1 in 270,000 pairs among 2^29 ids) are told apart by probing:
    the later one takes the next free hash. Only then may the ids depend on history.
    Ids never leave one packet's walk through the chains (the mark is set and read there), so
    a released id may be handed out again at once.
    """

    def __init__(self) -> None:
        self._ids: dict[Hashable, dict[Hashable, int]] = {}  # owner -> table -> id
        self._taken: set[int] = set()
        self.slots = SlotElements()  # the tables' last renderings, forgotten with their ids

    def get(self, owner: Hashable, table: Hashable, name: str = "") -> int:
        """`owner`'s id for `table` (named `name`, what the id is a hash of), the same as last time."""
        ids = self._ids.setdefault(owner, {})
        if table not in ids:
            ids[table] = self._allocate(name or repr((owner, table)))
        return ids[table]

    def keep(self, owner: Hashable, tables: set[Hashable]) -> None:
        """Releases `owner`'s ids of tables other than `tables` (it no longer has them)."""
        ids = self._ids.get(owner, {})
        for table in [t for t in ids if t not in tables]:
            released = ids.pop(table)
            self._taken.discard(released)
            self.slots.forget(released)
        if not ids:
            self._ids.pop(owner, None)

    def retain(self, owners) -> None:
        """Releases the ids of every owner not in `owners` (a full rebuild: the others are gone)."""
        for owner in [o for o in self._ids if o not in owners]:
            self.keep(owner, set())

    def _allocate(self, name: str) -> int:
        if len(self._taken) >= MAX_ID:
            raise OverflowError(f"more than {MAX_ID} balancing tables")
        for attempt in range(MAX_ID):
            digest = hashlib.blake2b(f"{name}#{attempt}".encode(), digest_size=8).digest()
            candidate = int.from_bytes(digest, "little") % MAX_ID + 1
            if candidate not in self._taken:
                self._taken.add(candidate)
                return candidate
        raise OverflowError("no free balancing table id")


class _Filled(NamedTuple):
    """A table as last rendered: what its fill is a function of, the fill, and its elements by slot."""

    source: tuple  # (endpoint names, weights, size)
    fill: array  # slot -> index into the names
    elements: list[Element]
    previous_source: tuple  # the rendering before: an endpoint flapping back finds its fill here
    previous_fill: array | None


class SlotElements:
    """Renders tables' slot elements, remembering each table's last rendering (by table id), so that
    a change costs about what Maglev moved: an unchanged slot keeps its Element object (no text
    formatted; the planner's set difference meets the same object), an unchanged table is not
    filled again, and endpoints coming back to the set before (readiness flapping) reuse that
    fill. About 12 bytes a slot beyond the elements themselves."""

    def __init__(self) -> None:
        self._last: dict[int, _Filled] = {}

    def render(self, service: Service, backends: Sequence[Backend], size: int, table_id: int) -> list[Element]:
        """The table's slot elements in the map of its size: `id . slot` : `endpoint . port`."""
        ordered, names, weights = lb_tables.fill_input(service, backends)
        source = (names, weights, size)
        last = self._last.get(table_id)
        if last is not None and len(last.elements) != size:
            last = None
        if last is not None and last.source == source:
            return last.elements
        if last is not None and last.previous_source == source and last.previous_fill is not None:
            fill = last.previous_fill
        else:
            fill = array("H" if len(names) < 1 << 16 else "I", maglev.build(names, weights, size))
        values = [f"{b.ip} . {b.port}" for b in ordered]
        container = layout.slots_map(size)  # a kept rendering has this size, so this container
        if last is None:
            prefix = id_text(table_id)
            elements = [Element(container, f"{prefix} . {slot}", values[index]) for slot, index in enumerate(fill)]
        else:
            elements = [old if old[2] == value else Element(container, old[1], value)
                        for old, value in zip(last.elements, [values[index] for index in fill])]
        if last is None:
            self._last[table_id] = _Filled(source, fill, elements, (), None)
        else:
            self._last[table_id] = _Filled(source, fill, elements, last.source, last.fill)
        return elements

    def forget(self, table_id: int) -> None:
        """Drops what is remembered of a table that is gone."""
        self._last.pop(table_id, None)


def _affinity_tables(fragment: Fragment) -> dict[str, int]:
    """Affinity chain base (nat/affinity.py: `<base>-pick-<which>`) -> the slots its pick hashes over,
    for each of the Service's ports whose affinity places new clients by a balancing table."""
    found = {}
    for declaration in fragment.owned:
        if not isinstance(declaration, Chain) or "-pick-" not in declaration.name:
            continue
        for rule in declaration.rules:
            if rule.hashes:
                found[declaration.name.rsplit("-pick-", 1)[0]] = next(
                    part.mod for s in rule.statements if isinstance(s, Vmap) for part in s.expr
                    if isinstance(part, Jhash))
    return found


def table_keys(fragment: Fragment) -> dict[str, int]:
    """Dispatch key (`daddr . proto . port` in the Service-address map, `proto . nodeport` in the
    NodePort one) -> the slots of its balancing table, for each address of the Service whose new
    flows the kernel picks for by a table: a hash chain, or an affinity chain whose pick hashes.
    Per port: a table-balanced Service may have a port without (its table would not be larger than
    its endpoints), which takes the kernel's random pick, or in userspace mode the forwarder."""
    affinity = None
    found = {}
    for element in fragment.elements:
        if element.container not in (layout.SERVICE_IPS, layout.SERVICE_NODEPORTS):
            continue
        chain = element.value.split()[-1]
        if chain.startswith("hash-"):
            found[element.key] = int(chain.rsplit("-", 1)[1])
        elif chain.startswith("aff-"):
            affinity = _affinity_tables(fragment) if affinity is None else affinity
            slots = affinity.get(chain.rsplit("-", 1)[0])  # <base>-cluster, -external, -local
            if slots:
                found[element.key] = slots
    return found


KERNEL_TABLE, FORWARDER, KERNEL_RANDOM = "kernel-table", "forwarder", "kernel-random"


def balancing_paths(ruleset: Ruleset | None) -> list[dict]:
    """Which path each Service port's new flows take in `ruleset` (what the kernel holds, userspace
    mode's part included): a kernel balancing table (with its slots), the userspace forwarder,
    or the kernel's random pick. A port whose addresses differ (an externalTrafficPolicy: Local
    Service's external traffic is never queued) lists each path it takes."""
    if ruleset is None:
        return []
    found: dict[str, dict] = {}
    for owner, fragment in ruleset.fragments.items():
        if owner == "node" or (isinstance(owner, tuple) and owner[:1] in (("userspace",), ("endpoint-ids",))):
            continue
        dispatch = [e for e in fragment.elements
                    if e.container in (layout.SERVICE_IPS, layout.SERVICE_NODEPORTS) and e.comment]
        if not dispatch:
            continue
        tabled = table_keys(fragment)
        queued_keys = {e.key for e in ruleset.fragments.get(("userspace", owner), Fragment()).elements}
        for element in dispatch:
            entry = found.setdefault(element.comment, {"service": element.comment, "family": ruleset.family,
                                                       "paths": []})
            if element.key in tabled:
                path = KERNEL_TABLE
                entry["table_slots"] = tabled[element.key]
            elif element.key in queued_keys:
                path = FORWARDER
            else:
                path = KERNEL_RANDOM
            if path not in entry["paths"]:
                entry["paths"].append(path)
    return sorted(found.values(), key=lambda e: (e["service"], e["family"]))
