"""The cluster zone: DNS records derived from a Snapshot, and their lookup.

Records follow the Kubernetes DNS-Based Service Discovery specification,
schema 1.1.0 (kubernetes/dns docs/specification.md), for `<zone>`:

    <svc>.<ns>.svc.<zone>                 A/AAAA  ClusterIPs, or every ready endpoint (headless)
    _<port>._<proto>.<svc>.<ns>.svc.<zone> SRV    named ports; headless: one per ready endpoint
    <host>.<svc>.<ns>.svc.<zone>          A/AAAA  headless endpoints (endpoint hostname, else its dashed IP)
    <reversed ip>.in-addr.arpa / ip6.arpa PTR     ClusterIPs and ready headless endpoints
    <svc>.<ns>.svc.<zone>                 CNAME   ExternalName
    dns-version.<zone>                    TXT     "1.1.0"
    <a-b-c-d>.<ns>.pod.<zone>             A       any address (section 2.6, deprecated but required)

Invariants:
- Each Service contributes one fragment, computed from its ServiceState alone
  (`service_records`, pure). The index holds the union of fragments, so a change
  to one Service replaces one fragment: `Zone.update` costs O(changed records)
  plus an identity scan of the snapshot (ServiceState values are shared between
  snapshots, so `is` finds the unchanged ones).
- Names are stored lower-case, absolute, as text (`"web.default.svc.cluster.local."`);
  lookups are case-insensitive, as the specification requires.
- A name under the zone with no records of its own but with descendants (an empty
  non-terminal such as `default.svc.<zone>`) exists: it answers NODATA, not NXDOMAIN.
- Nothing here does I/O or knows the wire format; `wire.py` turns an Answer
  into a DNS message.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from dns.rdatatype import RdataType

from ..model import Endpoint, ServiceKey, ServiceState, ServiceType, Snapshot

SCHEMA_VERSION = "1.1.0"
DEFAULT_TTL = 5
REVERSE_ZONES = ("in-addr.arpa.", "ip6.arpa.")
_MAX_NAME = 253  # presentation length of the longest name that fits in 255 octets
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SVC_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

A, AAAA, CNAME, PTR, SRV, TXT, SOA, ANY = (
    RdataType.A, RdataType.AAAA, RdataType.CNAME, RdataType.PTR, RdataType.SRV, RdataType.TXT, RdataType.SOA,
    RdataType.ANY,
)


class Record(NamedTuple):
    """One resource record. `value` by type: A/AAAA an address; CNAME/PTR a target name;
    SRV (priority, weight, port, target); TXT the string; SOA the zone it heads."""

    name: str
    type: RdataType
    value: object


@dataclass(frozen=True, slots=True)
class Answer:
    """What the zone says about (name, type).

    rcode: NOERROR (answer or NODATA) or NXDOMAIN; meaningless when `outside`.
    soa: the zone whose SOA goes in the authority section (negative answers), or None.
    chase: a CNAME target outside the zone that the answer ends on; a resolver may
    resolve it for the client (specification 2.5 shows the target's A record).
    outside: the name is not ours; forward it.
    """

    rcode: str = "NOERROR"
    records: tuple[Record, ...] = ()
    additional: tuple[Record, ...] = ()
    soa: str | None = None
    chase: str | None = None
    outside: bool = False


OUTSIDE = Answer(outside=True)


def normalize_domain(domain: str) -> str:
    """`Cluster.Local` -> `cluster.local.`; raises ValueError for anything that is not a DNS name."""
    text = domain.strip().rstrip(".").lower()
    labels = text.split(".")
    if not text or len(text) > 200 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"--cluster-domain: {domain!r} is not a DNS name")
    return text + "."


def reverse_name(address: str) -> str:
    """`10.96.0.1` -> `1.0.96.10.in-addr.arpa.`; IPv6 in nibble form under ip6.arpa.

    Addresses in the model are canonical, so IPv4 needs no parsing (the common case, and
    the bulk of a full build's cost otherwise).
    """
    if ":" not in address:
        a, b, c, d = address.split(".")
        return f"{d}.{c}.{b}.{a}.in-addr.arpa."
    return ipaddress.ip_address(address).reverse_pointer + "."


def endpoint_hostname(hostname: str, address: str) -> str:
    """The endpoint's `hostname` when it is a valid DNS label, else its address with dashes.

    The specification leaves the fallback to the implementation; dashes are what
    CoreDNS uses, so SRV targets look the same as in a cluster.
    """
    lowered = hostname.lower()
    if lowered and _LABEL.fullmatch(lowered):
        return lowered
    return address.replace(".", "-").replace(":", "-")


def service_records(state: ServiceState, domain: str) -> tuple[Record, ...]:
    """Every record one Service contributes to zone `domain` (normalised, with the dot). Pure; never raises."""
    service = state.service
    base = f"{service.name}.{service.namespace}.svc.{domain}"
    if not _SVC_NAME.fullmatch(service.name) or not _SVC_NAME.fullmatch(service.namespace):
        return ()
    records: list[Record] = []
    if service.type == ServiceType.EXTERNAL_NAME:
        target = _external_target(service.external_name)
        return (Record(base, CNAME, target),) if target else ()
    if service.cluster_ips:
        for ip in service.cluster_ips:
            records.append(Record(base, AAAA if ":" in ip else A, ip))
            records.append(Record(reverse_name(ip), PTR, base))
        for port in service.ports:
            if port.name:
                records.append(Record(f"_{port.name}._{port.protocol.lower()}.{base}", SRV, (0, 100, port.port, base)))
        return tuple(r for r in records if len(r.name) <= _MAX_NAME)
    # Headless: the data plane does nothing for it; DNS is the whole Service.
    ready = [endpoint for endpoint in state.endpoints if endpoint.ready]
    for endpoint in ready:
        kind = AAAA if ":" in endpoint.address else A
        host = f"{_hostname(endpoint)}.{base}"
        records.append(Record(base, kind, endpoint.address))
        records.append(Record(host, kind, endpoint.address))
        records.append(Record(reverse_name(endpoint.address), PTR, host))
    for port, backends in state.port_backends():
        if not port.name:
            continue
        targets = sorted({(b.port, f"{endpoint_hostname(b.hostname, b.ip)}.{base}") for b in backends if b.ready})
        weight = max(1, 100 // len(targets)) if targets else 0
        name = f"_{port.name}._{port.protocol.lower()}.{base}"
        records.extend(Record(name, SRV, (0, weight, number, target)) for number, target in targets)
    return tuple(r for r in records if len(r.name) <= _MAX_NAME and (r.type != SRV or len(r.value[3]) <= _MAX_NAME))


def _hostname(endpoint: Endpoint) -> str:
    return endpoint_hostname(endpoint.hostname, endpoint.address)


def _external_target(name: str) -> str | None:
    """An ExternalName as an absolute lower-case name, or None when it cannot be one."""
    text = name.strip().rstrip(".").lower()
    if not text or len(text) > _MAX_NAME or not all(_LABEL.fullmatch(label) for label in text.split(".")):
        return None
    return text + "."


class Zone:
    """The records of every Service in a snapshot, indexed for lookup.

    Mutable, and owned by one thread at a time: the server applies small updates
    on its event loop and builds large ones off the loop into a fresh Zone that it
    then swaps in (see server.py).
    """

    def __init__(self, domain: str = "cluster.local", ttl: int = DEFAULT_TTL):
        self.domain = normalize_domain(domain)
        self.ttl = ttl
        self.serial = int(time.time()) & 0xFFFFFFFF
        self._suffix = "." + self.domain
        self._states: dict[ServiceKey, ServiceState] = {}
        self._snapshot: Snapshot | None = None  # the one applied last: its successor says what changed
        self._fragments: dict[ServiceKey, tuple[Record, ...]] = {}
        # Records by name. A Record object belongs to exactly one fragment, so identity tells whose it is.
        self._names: dict[str, list[Record]] = {}
        self._parents: Counter[str] = Counter()  # empty non-terminals, by number of fragments below them
        static = (
            Record(self.domain, SOA, self.domain),
            Record(f"dns-version.{self.domain}", TXT, SCHEMA_VERSION),
        )
        for record in static:
            self._names.setdefault(record.name, []).append(record)
        for name in (f"svc.{self.domain}", f"pod.{self.domain}"):
            self._parents[name] += 1

    @classmethod
    def build(cls, snapshot: Snapshot, domain: str = "cluster.local", ttl: int = DEFAULT_TTL) -> "Zone":
        zone = cls(domain, ttl)
        zone.update(snapshot)
        return zone

    def __len__(self) -> int:
        return len(self._states)

    def changes(self, snapshot: Snapshot) -> tuple[list[ServiceKey], list[ServiceKey]]:
        """(changed or new, removed) Service keys between this zone and `snapshot`.

        O(changed) when `snapshot` directly follows the one applied last (its lineage
        names what changed); otherwise an identity scan of every Service.
        """
        states, services = self._states, snapshot.services
        previous = snapshot.previous() if snapshot.previous is not None else None
        if previous is not None and previous is self._snapshot and snapshot.changed is not None:
            changed = [key for key in snapshot.changed if key in services and states.get(key) is not services[key]]
            removed = [key for key in snapshot.changed if key not in services and key in states]
            return changed, removed
        changed = [key for key, state in services.items() if states.get(key) is not state]
        removed = [key for key in states if key not in services]
        return changed, removed

    def update(self, snapshot: Snapshot) -> int:
        """Makes the zone match `snapshot`; returns how many Services' records changed."""
        changed, removed = self.changes(snapshot)
        return self.apply(snapshot, changed, removed)

    def apply(self, snapshot: Snapshot, changed: Iterable[ServiceKey], removed: Iterable[ServiceKey]) -> int:
        """Replaces the fragments of `changed` (taken from `snapshot`) and drops those of `removed`."""
        services = snapshot.services
        self._snapshot = snapshot
        count = 0
        for key in removed:
            self._states.pop(key, None)
            count += self._replace(key, ())
        for key in changed:
            state = services[key]
            previous = self._states.get(key)
            self._states[key] = state
            if previous is not None and previous == state:
                continue
            count += self._replace(key, service_records(state, self.domain))
        if count:
            self.serial = (self.serial + 1) & 0xFFFFFFFF
        return count

    def _replace(self, key: ServiceKey, records: tuple[Record, ...]) -> int:
        old = self._fragments.get(key, ())
        if old == records:
            return 0
        gone = {id(record) for record in old}
        for name in {record.name for record in old}:
            entries = [record for record in self._names[name] if id(record) not in gone]
            if entries:
                self._names[name] = entries
            else:
                del self._names[name]
        for parent in self._ancestors(old):
            self._parents[parent] -= 1
            if not self._parents[parent]:
                del self._parents[parent]
        for record in records:
            self._names.setdefault(record.name, []).append(record)
        for parent in self._ancestors(records):
            self._parents[parent] += 1
        if records:
            self._fragments[key] = records
        else:
            self._fragments.pop(key, None)
        return 1

    def _ancestors(self, records: tuple[Record, ...]) -> set[str]:
        """Names strictly between each record's name and the apex, in this zone only."""
        found: set[str] = set()
        suffix = self._suffix
        for name in {record.name for record in records}:
            if not name.endswith(suffix):
                continue
            while True:
                name = name.split(".", 1)[1]
                if name == self.domain or name in found:
                    break
                found.add(name)
        return found

    # Lookup.

    def lookup(self, qname: str, qtype: int) -> Answer:
        """What the zone answers for `qname` (any case, absolute) and `qtype`. Never raises."""
        name = qname.lower()
        if not name.endswith("."):
            name += "."
        if name != self.domain and not name.endswith(self._suffix):
            if name.endswith(REVERSE_ZONES) and name in self._names:
                return self._answer(name, qtype, "in-addr.arpa." if name.endswith("in-addr.arpa.") else "ip6.arpa.")
            return OUTSIDE
        return self._answer(name, qtype, self.domain)

    def _answer(self, name: str, qtype: int, soa: str) -> Answer:
        chain: list[Record] = []
        seen = set()
        while True:
            records = self._records(name)
            if records is None:
                if name in self._parents or name.endswith(self._suffix) and self._pod_parent(name):
                    return Answer("NOERROR", tuple(chain), soa=soa)
                return Answer("NXDOMAIN", tuple(chain), soa=soa)
            if qtype == ANY:
                return Answer("NOERROR", tuple(chain) + tuple(records))
            found = [r for r in records if r.type == qtype]
            if found:
                return Answer("NOERROR", tuple(chain) + tuple(found), additional=self._additional(found))
            alias = next((r for r in records if r.type == CNAME), None)
            if alias is None:
                return Answer("NOERROR", tuple(chain), soa=soa)
            chain.append(alias)
            target = alias.value
            seen.add(name)
            if target in seen or len(chain) > 8:
                return Answer("SERVFAIL", tuple(chain))
            if target != self.domain and not target.endswith(self._suffix):
                return Answer("NOERROR", tuple(chain), chase=target)
            name = target

    def _records(self, name: str) -> list[Record] | None:
        entries = self._names.get(name)
        if entries is not None:
            return _dedupe(entries) if len(entries) > 1 else entries
        pod = self._pod_address(name)
        return [Record(name, A if "." in pod else AAAA, pod)] if pod else None

    def _additional(self, found: list[Record]) -> tuple[Record, ...]:
        """A/AAAA of SRV targets (the specification's optional Additional section)."""
        extra: list[Record] = []
        for target in sorted({r.value[3] for r in found if r.type == SRV}):
            extra.extend(r for r in self._records(target) or () if r.type in (A, AAAA))
        return tuple(extra)

    def _pod_address(self, name: str) -> str | None:
        """`10-244-1-5.<ns>.pod.<zone>` -> `10.244.1.5`, as specification 2.6 requires for any address."""
        labels = name[: -len(self._suffix)].split(".") if name.endswith(self._suffix) else []
        if len(labels) != 3 or labels[2] != "pod" or not _LABEL.fullmatch(labels[1]):
            return None
        text = labels[0]
        try:
            return str(ipaddress.ip_address(text.replace("-", "." if text.count("-") == 3 else ":")))
        except ValueError:
            return None

    def _pod_parent(self, name: str) -> bool:
        """`pod.<zone>` and `<ns>.pod.<zone>` have (virtual) children for every address."""
        labels = name[: -len(self._suffix)].split(".")
        return len(labels) == 2 and labels[1] == "pod" and bool(_LABEL.fullmatch(labels[0]))

    def records(self) -> list[Record]:
        """Every stored record, sorted (for tests and debugging; computed records excluded)."""
        return sorted(r for entries in self._names.values() for r in entries)


def _dedupe(records: Iterable[Record]) -> list[Record]:
    return list(dict.fromkeys(records))
