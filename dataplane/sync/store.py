"""The state store: objects by origin, joined into snapshots incrementally.

Objects arrive grouped by origin (a file, or one API object); replacing an
origin's objects rejoins only the Services those objects can affect, which is
what keeps one change cheap when 10,000 Services exist. Snapshots are values:
a consumer may hold an old one while the store moves on.

Two Services claiming one address:port (or NodePort) are decided here,
before any snapshot, by `model.claims` (the older keeps it): a snapshot
never holds a contested claim twice.

The store is also the one error path: every invalid object or field, from
any source, is `report`ed by origin, logged once when it appears, and counted
(`problems()`, which the daemon's `dataplane_invalid_objects` sums), together
with the conflicts decided here.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict

from typing import Iterable

from ..model import (EndpointSlice, InvalidObject, ObjectSet, Pod, Service, ServiceKey, ServiceState, Snapshot,
                     join_service)
from ..model.claims import Claim, claims_of, precedence, without

log = logging.getLogger(__name__)

MAX_PROBLEMS_PER_ORIGIN = 100


class Store:
    def __init__(self) -> None:
        self._origins: dict[str, ObjectSet] = {}
        # Index: what each origin contributes, by the key that affects Services.
        self._services: dict[ServiceKey, dict[str, Service]] = defaultdict(dict)
        self._slices: dict[ServiceKey, dict[tuple[str, str], EndpointSlice]] = defaultdict(dict)
        self._legacy: dict[ServiceKey, dict[tuple[str, str], EndpointSlice]] = defaultdict(dict)
        self._pods: dict[str, dict[tuple[str, str], Pod]] = defaultdict(dict)  # by namespace
        self._joined: dict[ServiceKey, ServiceState] = {}  # before conflicts are decided
        self._states: dict[ServiceKey, ServiceState] = {}  # what snapshots hold
        self._claims: dict[ServiceKey, dict[Claim, int]] = {}
        # The holders of claims held by more than one Service; a claim held alone has only its winner
        # (10,000 one-key sets were 2.3 MB at 10,000 Services).
        self._claimants: dict[Claim, set[ServiceKey]] = {}
        self._reported: dict[str, tuple[str, ...]] = {}  # origin -> its problems, as reported
        self._derived: dict[ServiceKey, tuple[tuple[str, str], ...]] = {}  # conflicts decided here: (origin, problem)
        self._pod_index: dict[tuple[str, str], Pod] = {}
        self._winners: dict[Claim, ServiceKey] = {}  # who keeps each claim (model.claims.precedence)
        self._moved: set[ServiceKey] = set()  # winners that lost or won a claim since the last _contenders()
        self._last: weakref.ref[Snapshot] | None = None
        self._changed: set[ServiceKey] = set()

    def replace(self, origin: str, objects: ObjectSet | None) -> set[ServiceKey]:
        """Replaces everything `origin` contributed; returns the Services whose state changed."""
        affected: set[ServiceKey] = set()
        old = self._origins.pop(origin, None)
        if old is not None:
            affected |= self._index(origin, old, add=False)
        if objects is not None:
            self._origins[origin] = objects
            affected |= self._index(origin, objects, add=True)
        rejoined = {key for key in affected if self._rejoin(key)}
        # A second definition of a Service may leave its state as it was, and must still be reported.
        rejoined |= {key for key in affected if len(self._services.get(key, ())) > 1 or key in self._derived}
        changed = {key for key in self._contenders(rejoined) if self._resolve(key)}
        self._changed |= changed
        return changed

    def report(self, origin: str, problems: Iterable[InvalidObject | str] | None) -> None:
        """Records the problems an origin's last read found (None: the origin is gone); logs the new ones."""
        if problems is None:
            self._reported.pop(origin, None)
            return
        problems = list(problems)
        if len(problems) > MAX_PROBLEMS_PER_ORIGIN:
            # A file of a million bad documents must not become a million log lines and strings.
            more = len(problems) - MAX_PROBLEMS_PER_ORIGIN
            problems = problems[:MAX_PROBLEMS_PER_ORIGIN] + [f"{origin}: {more} more problems not shown"]
        messages = tuple(str(problem) for problem in problems)
        _log_new(problems, self._reported.get(origin, ()))
        if messages:
            self._reported[origin] = messages
        else:  # only origins with problems are kept: counting them after each sync stays cheap
            self._reported.pop(origin, None)

    def problems(self) -> dict[str, list[str]]:
        """Origin -> every problem reported for it, conflicts decided here included; origins without any left out."""
        found: dict[str, list[str]] = {origin: list(messages) for origin, messages in self._reported.items()}
        for entries in self._derived.values():
            for origin, message in entries:
                found.setdefault(origin, []).append(message)
        return found

    def problem_count(self) -> int:
        """How many problems `problems()` holds (`dataplane_invalid_objects`), in time of the origins that have any."""
        return sum(len(messages) for messages in self._reported.values()) + \
            sum(len(entries) for entries in self._derived.values())

    def snapshot(self) -> Snapshot:
        """The current state; records what changed since the previous snapshot."""
        previous = self._last() if self._last is not None else None
        snapshot = Snapshot(
            dict(self._states),
            dict(self._pod_index),
            previous=self._last if previous is not None else None,
            changed=frozenset(self._changed) if previous is not None else None,
        )
        self._last = weakref.ref(snapshot)
        self._changed = set()
        return snapshot

    def state(self, key: ServiceKey) -> ServiceState | None:
        """A Service's joined state now (None: no such Service), without taking a snapshot."""
        return self._states.get(key)

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(self._origins)

    def _index(self, origin: str, objects: ObjectSet, add: bool) -> set[ServiceKey]:
        affected: set[ServiceKey] = set()
        for service in objects.services:
            _put(self._services[service.key], origin, service, add)
            affected.add(service.key)
        for slices, bucket in ((objects.slices, self._slices), (objects.legacy, self._legacy)):
            for endpoint_slice in slices:
                key = ServiceKey(endpoint_slice.namespace, endpoint_slice.service_name)
                _put(bucket[key], (origin, endpoint_slice.name), endpoint_slice, add)
                affected.add(key)
        namespaces = set()
        for pod in objects.pods:
            _put(self._pods[pod.namespace], (origin, pod.name), pod, add)
            if add:
                self._pod_index[(pod.namespace, pod.name)] = pod
            elif self._pod_index.get((pod.namespace, pod.name)) is pod:
                del self._pod_index[(pod.namespace, pod.name)]
            namespaces.add(pod.namespace)
        if namespaces:
            affected |= {key for key in self._services if key.namespace in namespaces}
        return affected

    def _rejoin(self, key: ServiceKey) -> bool:
        """Joins one Service again; True when its joined state (before conflicts) changed."""
        definitions = self._services.get(key)
        if not definitions:
            self._services.pop(key, None)
            self._set_claims(key, {})
            return self._joined.pop(key, None) is not None
        service = definitions[max(definitions)]
        state = join_service(
            service,
            self._slices.get(key, {}).values(),
            self._legacy.get(key, {}).values(),
            self._pods.get(key.namespace, {}).values(),
        )
        if self._joined.get(key) == state:
            return False
        self._joined[key] = state
        self._set_claims(key, claims_of(state))
        return True

    def _set_claims(self, key: ServiceKey, claims: dict[Claim, int]) -> None:
        """Replaces the Service's claims, keeping each claim's winner current (O(1) unless a winner leaves)."""
        for claim in self._claims.pop(key, {}):
            holders = self._claimants.get(claim)
            if holders is None:  # held alone, by this Service
                del self._winners[claim]
                continue
            holders.discard(key)
            if len(holders) == 1:
                del self._claimants[claim]
            if self._winners[claim] == key:
                self._winners[claim] = winner = min(holders, key=self._precedence)
                self._moved.add(winner)
        if claims:
            self._claims[key] = claims
            first = self._precedence(key)
            for claim in claims:
                winner = self._winners.get(claim)
                if winner is None:
                    self._winners[claim] = key
                    continue
                holders = self._claimants.get(claim)
                if holders is None:
                    holders = self._claimants[claim] = {winner}
                holders.add(key)
                if first < self._precedence(winner):
                    self._winners[claim] = key
                    self._moved.add(winner)

    def _precedence(self, key: ServiceKey) -> tuple:
        return precedence(self._joined[key].service)

    def _contenders(self, rejoined: set[ServiceKey]) -> set[ServiceKey]:
        """The rejoined Services, and those that won or lost a claim because of them.

        The other holders of a claim still lose it whoever keeps it: they are not decided again
        (a problem names the holder when the port was lost), so a folder of 10,000 Services on
        one address costs linear work, not quadratic.
        """
        keys = rejoined | {key for key in self._moved if key in self._joined}
        self._moved = set()
        return keys

    def _resolve(self, key: ServiceKey) -> bool:
        """Decides the Service's contested claims; True when the state snapshots hold for it changed."""
        joined = self._joined.get(key)
        if joined is None:
            self._derived.pop(key, None)
            return self._states.pop(key, None) is not None
        lost = {claim: self._winners[claim] for claim in self._claims.get(key, ())
                if self._winners[claim] != key}
        definitions = self._services[key]
        origin = max(definitions)
        derived = [(other, InvalidObject(
            "Service", str(key), "metadata.name", f"is also defined in {origin}, which is used; this one is ignored",
            other)) for other in sorted(definitions) if other != origin]
        state = joined
        if lost:
            state, problems = without(joined, lost, origin)
            derived += [(origin, problem) for problem in problems]
        self._set_derived(key, tuple(derived))
        if self._states.get(key) == state:
            return False
        self._states[key] = state
        return True

    def _set_derived(self, key: ServiceKey, derived: tuple[tuple[str, InvalidObject], ...]) -> None:
        before = tuple(message for _, message in self._derived.get(key, ()))
        entries = tuple((origin, str(problem)) for origin, problem in derived)
        if entries == self._derived.get(key, ()):
            return
        _log_new([problem for _, problem in derived], before)
        if entries:
            self._derived[key] = entries
        else:
            self._derived.pop(key, None)

def _put(bucket: dict, key: object, value: object, add: bool) -> None:
    if add:
        bucket[key] = value
    else:
        bucket.pop(key, None)


def _log_new(problems: Iterable[InvalidObject | str], before: tuple[str, ...]) -> None:
    for problem in problems:
        message = str(problem)
        if message in before:
            continue
        if isinstance(problem, InvalidObject):
            log.error("%s: %s", "skipping invalid object" if problem.skipped else "ignoring part of an object",
                      message)
        else:
            log.error("%s", message)
