"""healthCheckNodePort servers: what cloud load balancers probe on each node.

For every LoadBalancer Service with externalTrafficPolicy: Local and a
healthCheckNodePort, one HTTP server on that port answers any path: 200 when
this node has a ready endpoint of the Service (so the balancer sends it
traffic), 503 otherwise, with the count in a JSON body and in the
X-Load-Balancing-Endpoint-Weight header. Servers open and close as
Services come and go; a port that cannot be bound is logged and retried at
the next update, the others keep serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from ..model import ServiceKey, ServiceType, Snapshot, TrafficPolicy
from . import http

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Probe:
    service: ServiceKey
    local_endpoints: int

    def answer(self) -> tuple[int, str, bytes, dict[str, str]]:
        body = {
            "service": {"namespace": self.service.namespace, "name": self.service.name},
            "localEndpoints": self.local_endpoints,
            "serviceProxyHealthy": True,
        }
        status = 200 if self.local_endpoints else 503
        headers = {"X-Content-Type-Options": "nosniff", "X-Load-Balancing-Endpoint-Weight": str(self.local_endpoints)}
        return status, "application/json", (json.dumps(body) + "\n").encode(), headers


def probes(snapshot: Snapshot, node_name: str) -> dict[int, Probe]:
    """healthCheckNodePort -> what it reports, for this node. Pure."""
    found: dict[int, Probe] = {}
    for key, state in sorted(snapshot.services.items()):
        service = state.service
        port = service.health_check_node_port
        if (port is None or service.type != ServiceType.LOAD_BALANCER
                or service.external_traffic_policy != TrafficPolicy.LOCAL):
            continue
        local = {e.address for e in state.endpoints if e.ready and e.node_name == node_name}
        if port in found:
            log.error("healthCheckNodePort %d of %s is taken by %s; not served", port, key, found[port].service)
            continue
        found[port] = Probe(key, len(local))
    return found


class HealthCheckServers:
    def __init__(self, node_name: str, host: str = "0.0.0.0"):
        self.node_name = node_name
        self.host = host
        self._probes: dict[int, Probe] = {}
        self._servers: dict[int, asyncio.AbstractServer] = {}

    async def update(self, snapshot: Snapshot) -> None:
        self._probes = probes(snapshot, self.node_name)
        for port in list(self._servers.keys() - self._probes.keys()):
            self._servers.pop(port).close()
        for port in self._probes.keys() - self._servers.keys():
            try:
                self._servers[port] = await http.serve(f"{self.host}:{port}", {"*": self._answer(port)})
            except OSError as error:
                log.error("cannot serve healthCheckNodePort %d for %s: %s", port, self._probes[port].service, error)

    def _answer(self, port: int):
        # Looks the probe up at request time: counts change without reopening the server.
        return lambda: self._probes[port].answer() if port in self._probes else (404, "text/plain", b"gone\n")

    def close(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()
