"""The domain: Services, their ports and endpoints, as immutable values."""

from .endpoints import ContainerPort, Endpoint, EndpointPort, EndpointSlice, Pod
from .errors import InvalidObject
from .objects import ObjectSet, parse_objects
from .service import Protocol, Service, ServiceKey, ServicePort, ServiceType, TrafficPolicy
from .selection import Selection
from .snapshot import Backend, ServiceState, Snapshot, join_service

__all__ = [
    "Backend",
    "ContainerPort",
    "Endpoint",
    "EndpointPort",
    "EndpointSlice",
    "InvalidObject",
    "ObjectSet",
    "Pod",
    "Protocol",
    "Selection",
    "Service",
    "ServiceKey",
    "ServicePort",
    "ServiceState",
    "ServiceType",
    "Snapshot",
    "TrafficPolicy",
    "join_service",
    "parse_objects",
]
