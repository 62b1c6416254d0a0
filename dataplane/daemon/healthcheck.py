"""Health as kube-proxy serves it: /healthz and /livez, and the healthCheckNodePort servers.

`ProxyHealth` answers /healthz and /livez with kube-proxy's bodies, status
codes and headers. Both are 503 while the proxy is unhealthy (the daemon's
`Health` decides that: not before the first sync is live, not while a change
has waited too long); /healthz is also 503, with `nodeEligible: false`, while
this node's Node object is being deleted or carries the cluster autoscaler's
`ToBeDeletedByClusterAutoscaler` taint, so that cloud load balancers stop
sending to a draining node; /livez ignores the Node.

For every LoadBalancer Service with externalTrafficPolicy: Local and a
healthCheckNodePort, one HTTP server on that port answers any path: 200 when
this node has a ready endpoint of the Service and the proxy is healthy (so the
balancer sends it traffic), 503 otherwise, with the count in a JSON body and in the
X-Load-Balancing-Endpoint-Weight header. Servers open and close as
Services come and go; a port that cannot be bound is logged and retried at
the next update, the others keep serving. As kube-proxy's, they listen on
the node addresses NodePorts answer on, not on every address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from ..model import ServiceKey, ServiceType, Snapshot, TrafficPolicy
from . import http

log = logging.getLogger(__name__)


NOSNIFF = {"X-Content-Type-Options": "nosniff"}  # (eligibility is sync/kube.py's NodeInfo.eligible)


def go_time(stamp: float | None) -> str:
    """A time as Go's time.Time prints it in kube-proxy's bodies ("2026-12-02 07:00:00.5 +0000 UTC")."""
    if stamp is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    moment = datetime.fromtimestamp(stamp, timezone.utc)
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (f".{fraction}" if fraction else "") + " +0000 UTC"


class ProxyHealth:
    """The /healthz and /livez handlers; `state()` -> (proxy healthy, last successful sync time or None)."""

    def __init__(self, state: Callable[[], tuple[bool, float | None]], healthz_total=None, livez_total=None,
                 clock: Callable[[], float] = time.time):
        self.state = state
        self.clock = clock
        self.healthz_total = healthz_total  # kubeproxy_proxy_healthz_total{code}, and livez's
        self.livez_total = livez_total
        self.eligible = True  # as kube-proxy: eligible until a Node event says otherwise
        self._seen_node = False

    def sync_node(self, node) -> None:
        """This node's Node changed (`node` has `.eligible`), or went away (None)."""
        if node is None:
            self.eligible = not self._seen_node  # deleted after being seen: draining is over
            return
        self._seen_node = True
        eligible = bool(node.eligible)
        if eligible != self.eligible:
            log.warning("Node %s is %s: /healthz %s", getattr(node, "name", "?"),
                        "eligible again" if eligible else "being deleted or marked ToBeDeletedByClusterAutoscaler",
                        "follows the proxy again" if eligible else "answers 503 (nodeEligible: false)")
        self.eligible = eligible

    def healthy(self) -> bool:
        return self.state()[0]

    def healthz(self) -> tuple[int, str, bytes, dict[str, str]]:
        healthy, last = self.state()
        now = self.clock()
        ok = healthy and self.eligible
        if ok:
            last = now  # kube-proxy's compatibility rule: a healthy answer reports "now"
        body = (f'{{"lastUpdated": {json.dumps(go_time(last))},"currentTime": {json.dumps(go_time(now))}, '
                f'"nodeEligible": {"true" if self.eligible else "false"}}}')
        return self._answer(ok, body, self.healthz_total)

    def livez(self) -> tuple[int, str, bytes, dict[str, str]]:
        healthy, last = self.state()
        now = self.clock()
        if healthy:
            last = now
        body = f'{{"lastUpdated": {json.dumps(go_time(last))},"currentTime": {json.dumps(go_time(now))}}}'
        return self._answer(healthy, body, self.livez_total)

    @staticmethod
    def _answer(ok: bool, body: str, counter) -> tuple[int, str, bytes, dict[str, str]]:
        status = 200 if ok else 503
        if counter is not None:
            counter.labels(str(status)).inc()
        return status, "application/json", body.encode(), dict(NOSNIFF)


@dataclass(frozen=True, slots=True)
class Probe:
    service: ServiceKey
    local_endpoints: int

    def answer(self, proxy_healthy: bool = True) -> tuple[int, str, bytes, dict[str, str]]:
        body = {
            "service": {"namespace": self.service.namespace, "name": self.service.name},
            "localEndpoints": self.local_endpoints,
            "serviceProxyHealthy": proxy_healthy,
        }
        status = 200 if self.local_endpoints and proxy_healthy else 503
        headers = {**NOSNIFF, "X-Load-Balancing-Endpoint-Weight": str(self.local_endpoints)}
        # kube-proxy's layout, byte for byte: tab-indented, no newline at the end
        return status, "application/json", json.dumps(body, indent="\t").encode(), headers


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
    """One server per healthCheckNodePort and node address (`host` given: on that address only)."""

    def __init__(self, node_name: str, host: str = "", healthy: Callable[[], bool] = lambda: True):
        self.node_name = node_name
        self.host = host
        self.healthy = healthy  # the proxy's own health: 503 on every port while it is not healthy
        self._probes: dict[int, Probe] = {}
        self._servers: dict[tuple[int, str], asyncio.AbstractServer] = {}
        self.unbound = 0  # (port, address) pairs the last update could not bind

    async def update(self, snapshot: Snapshot, node_ips: tuple[str, ...] = ()) -> None:
        self._probes = probes(snapshot, self.node_name)
        hosts = (self.host,) if self.host else (node_ips or ("0.0.0.0",))
        wanted = {(port, host) for port in self._probes for host in hosts}
        for key in list(self._servers.keys() - wanted):
            self._servers.pop(key).close()
        for port, host in sorted(wanted - self._servers.keys()):
            bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            try:
                self._servers[(port, host)] = await http.serve(bind, {"*": self._answer(port)})
            except OSError as error:
                log.error("cannot serve healthCheckNodePort %d on %s for %s: %s", port, host,
                          self._probes[port].service, error)
        self.unbound = len(wanted - self._servers.keys())  # retried at the next update, whatever changed

    def _answer(self, port: int):
        # Looks the probe up at request time: counts change without reopening the server.
        return lambda: (self._probes[port].answer(self.healthy()) if port in self._probes
                        else (404, "text/plain", b"gone\n"))

    def close(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()
