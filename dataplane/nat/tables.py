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
from typing import Hashable, Sequence

from ..lb import tables as lb_tables
from ..marks import MAX_ID, mark_for
from ..model import Backend, Service
from . import layout
from .expr import Jhash, Vmap
from .ruleset import Chain, Fragment, Ruleset


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
            self._taken.discard(ids.pop(table))
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


def slot_elements(service: Service, backends: Sequence[Backend], size: int, table_id: int) -> list[tuple[str, str]]:
    """(key, value) of the table's slots: `id . slot` : `endpoint . port`."""
    prefix = id_text(table_id)
    return [(f"{prefix} . {slot}", f"{b.ip} . {b.port}")
            for slot, b in enumerate(lb_tables.fill(service, backends, size))]


def balanced_by_table(fragment: Fragment) -> bool:
    """The Service's rendered fragment picks by a balancing table (its slots, or affinity chains that
    hash), so userspace mode has nothing to decide for it."""
    return any(e.container.startswith("slots-") for e in fragment.elements) or any(
        isinstance(d, Chain) and any(rule.hashes for rule in d.rules) for d in fragment.owned)


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
        dispatch, slots = [], 0
        for element in fragment.elements:  # one pass: a table Service holds thousands of slots
            if element.container in (layout.SERVICE_IPS, layout.SERVICE_NODEPORTS) and element.comment:
                dispatch.append(element)
            elif not slots and element.container.startswith("slots-"):
                slots = int(element.container.rsplit("-", 1)[1])
        if not dispatch:
            continue
        queued_keys = {e.key for e in ruleset.fragments.get(("userspace", owner), Fragment()).elements}
        hashing_affinity = next((part.mod for d in fragment.owned if isinstance(d, Chain) for r in d.rules
                                 if r.hashes for s in r.statements if isinstance(s, Vmap)
                                 for part in s.expr if isinstance(part, Jhash)), 0)
        for element in dispatch:
            chain = element.value.split()[-1]
            entry = found.setdefault(element.comment, {"service": element.comment, "family": ruleset.family,
                                                       "paths": []})
            if chain.startswith("hash-") or (chain.startswith("aff-") and hashing_affinity):
                path = KERNEL_TABLE
                entry["table_slots"] = slots or hashing_affinity
            elif element.key in queued_keys:
                path = FORWARDER
            else:
                path = KERNEL_RANDOM
            if path not in entry["paths"]:
                entry["paths"].append(path)
    return sorted(found.values(), key=lambda e: (e["service"], e["family"]))
