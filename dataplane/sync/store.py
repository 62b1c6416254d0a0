"""The state store: objects by origin, joined into snapshots incrementally.

Objects arrive grouped by origin (a file, or one API object); replacing an
origin's objects rejoins only the Services those objects can affect, which is
what keeps one change cheap when 10,000 Services exist. Snapshots are values:
a consumer may hold an old one while the store moves on.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict

from ..model import EndpointSlice, ObjectSet, Pod, Service, ServiceKey, ServiceState, Snapshot, join_service

log = logging.getLogger(__name__)


class Store:
    def __init__(self) -> None:
        self._origins: dict[str, ObjectSet] = {}
        # Index: what each origin contributes, by the key that affects Services.
        self._services: dict[ServiceKey, dict[str, Service]] = defaultdict(dict)
        self._slices: dict[ServiceKey, dict[tuple[str, str], EndpointSlice]] = defaultdict(dict)
        self._legacy: dict[ServiceKey, dict[tuple[str, str], EndpointSlice]] = defaultdict(dict)
        self._pods: dict[str, dict[tuple[str, str], Pod]] = defaultdict(dict)  # by namespace
        self._states: dict[ServiceKey, ServiceState] = {}
        self._pod_index: dict[tuple[str, str], Pod] = {}
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
        changed = {key for key in affected if self._rejoin(key)}
        self._changed |= changed
        return changed

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
        definitions = self._services.get(key)
        if not definitions:
            self._services.pop(key, None)
            return self._states.pop(key, None) is not None
        if len(definitions) > 1:
            log.warning("Service %s is defined in %s; using the last", key, ", ".join(sorted(definitions)))
        service = definitions[max(definitions)]
        state = join_service(
            service,
            self._slices.get(key, {}).values(),
            self._legacy.get(key, {}).values(),
            self._pods.get(key.namespace, {}).values(),
        )
        if self._states.get(key) == state:
            return False
        self._states[key] = state
        return True


def _put(bucket: dict, key: object, value: object, add: bool) -> None:
    if add:
        bucket[key] = value
    else:
        bucket.pop(key, None)
