"""Sorts raw Kubernetes documents into model values, one bad object at a time.

An invalid object is reported and skipped; the others in the same document
stream are still used. A problem that leaves the object usable (a bad
annotation) is reported too, with `skipped` False. Kinds we do not serve are
ignored silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .endpoints import EndpointSlice, Pod, parse_endpoint_slice, parse_endpoints, parse_pod
from .errors import InvalidObject
from .service import Service, is_foreign, object_ref, parse_service


@dataclass(frozen=True, slots=True)
class ObjectSet:
    services: tuple[Service, ...] = ()
    slices: tuple[EndpointSlice, ...] = ()
    legacy: tuple[EndpointSlice, ...] = ()  # converted from v1 Endpoints
    pods: tuple[Pod, ...] = ()


_PARSERS = {
    "Service": parse_service,
    "EndpointSlice": parse_endpoint_slice,
    "Endpoints": parse_endpoints,
    "Pod": parse_pod,
}

SERVED_KINDS = frozenset(_PARSERS)  # what parse_objects reads; every other kind is ignored silently
_KEEPING = ("Service", "EndpointSlice")  # parsers that report problems an object survives


def parse_objects(documents: Iterable[Any], source: str = "") -> tuple[ObjectSet, list[InvalidObject]]:
    """Parses every usable object; returns them with one error per bad object."""
    found: dict[str, list[Any]] = {kind: [] for kind in _PARSERS}
    errors: list[InvalidObject] = []
    for obj in _flatten(documents):
        if not isinstance(obj, dict):
            errors.append(InvalidObject("document", "<none>", "<document>", "is not a mapping", source))
            continue
        kind = obj.get("kind")
        if kind not in _PARSERS or (kind == "Service" and is_foreign(obj)):
            continue
        try:
            kept: list[InvalidObject] = []
            found[kind].append(_PARSERS[kind](obj, kept) if kind in _KEEPING else _PARSERS[kind](obj))
            errors.extend(problem.with_source(source) for problem in kept)
        except InvalidObject as error:
            errors.append(error.with_source(source))
        except (TypeError, ValueError, AttributeError) as error:  # shapes the readers did not foresee
            errors.append(InvalidObject(kind, object_ref(obj), "<object>", str(error), source))
    legacy = tuple(s for group in found["Endpoints"] for s in group)
    return ObjectSet(tuple(found["Service"]), tuple(found["EndpointSlice"]), legacy, tuple(found["Pod"])), errors


def _flatten(documents: Iterable[Any]) -> Iterable[Any]:
    for document in documents:
        if document is None:
            continue
        if isinstance(document, dict) and str(document.get("kind") or "").endswith("List") and "items" in document:
            items = document.get("items") or []
            yield from items if isinstance(items, list) else [items]
        else:
            yield document
