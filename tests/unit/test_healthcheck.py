"""healthCheckNodePort servers, on loopback: what a cloud load balancer sees."""

from __future__ import annotations

import asyncio
import json
import socket

from dataplane.daemon.healthcheck import HealthCheckServers, probes
from dataplane.model import Endpoint, Service, ServicePort, ServiceState, ServiceType, Snapshot, TrafficPolicy
from dataplane.model import Protocol


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(port: int, *endpoints: Endpoint, policy=TrafficPolicy.LOCAL, type=ServiceType.LOAD_BALANCER) -> Snapshot:
    service = Service("shop", "web", type=type, cluster_ips=("10.96.0.1",), health_check_node_port=port,
                      external_traffic_policy=policy, ports=(ServicePort("http", Protocol.TCP, 80, 8080, 31000),))
    return Snapshot({service.key: ServiceState(service, ((),), tuple(endpoints))})


def test_only_local_ready_endpoints_count() -> None:
    found = probes(snapshot(32000, Endpoint("10.244.1.1", node_name="node-a"),
                            Endpoint("10.244.1.2", ready=False, node_name="node-a"),
                            Endpoint("10.244.2.1", node_name="node-b")), "node-a")
    assert found[32000].local_endpoints == 1


def test_cluster_policy_services_get_no_health_check() -> None:
    assert probes(snapshot(32000, policy=TrafficPolicy.CLUSTER), "node-a") == {}


async def get(port: int) -> tuple[int, dict[str, str], dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_server_answers_200_then_503_then_closes() -> None:
    port = free_port()

    async def scenario() -> None:
        servers = HealthCheckServers("node-a", host="127.0.0.1")
        await servers.update(snapshot(port, Endpoint("10.244.1.1", node_name="node-a"),
                                      Endpoint("10.244.1.3", node_name="node-a")))
        status, headers, body = await get(port)
        assert (status, headers["X-Load-Balancing-Endpoint-Weight"], body["localEndpoints"]) == (200, "2", 2)
        assert body["service"] == {"namespace": "shop", "name": "web"}
        await servers.update(snapshot(port, Endpoint("10.244.2.1", node_name="node-b")))
        status, headers, body = await get(port)
        assert (status, headers["X-Load-Balancing-Endpoint-Weight"], body["localEndpoints"]) == (503, "0", 0)
        await servers.update(Snapshot())
        await asyncio.sleep(0.05)
        try:
            await get(port)
            raise AssertionError("the server should be gone with its Service")
        except ConnectionRefusedError:
            pass
        servers.close()

    asyncio.run(scenario())
