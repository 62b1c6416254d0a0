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


def test_a_port_that_could_not_be_bound_is_bound_at_a_later_sync_of_other_services(tmp_path) -> None:
    # The daemon skips rebuilding probes when no Service with a healthCheckNodePort changed; a port
    # that failed to bind must still be retried, as kube-proxy retries at every sync.
    from dataplane.config import NodeSettings
    from dataplane.daemon.app import Daemon, Options
    from dataplane.lab.manifests import ManifestDir, endpoint_slice, port, service
    from dataplane.nat.fake import FakeNftables

    number = free_port()
    manifests = ManifestDir(tmp_path / "manifests")
    manifests.write("lb.yaml", [
        service("lb", "10.96.0.20", [port("http", 80, node_port=30080)], type="LoadBalancer",
                externalTrafficPolicy="Local", healthCheckNodePort=number),
        endpoint_slice("lb", ["10.244.1.21"], [("http", 80, "TCP")], node="node1")])
    manifests.write("web.yaml", [service("web", "10.96.0.10", [port("http", 80)])])
    daemon = Daemon(Options(source=manifests.path, settings=NodeSettings(node_name="node1")), FakeNftables())
    daemon.health_checks.host = "127.0.0.1"

    async def scenario() -> None:
        with socket.socket() as taken:  # someone else holds the port for a while
            taken.bind(("127.0.0.1", number))
            taken.listen()
            daemon.source.load_all()
            daemon.changed("start")
            assert await daemon.loop.step(True)
        manifests.write("web.yaml", [service("web", "10.96.0.10", [port("http", 81)])])  # not the LB Service
        daemon.source.load_all()
        daemon.changed("web")
        assert await daemon.loop.step(False)
        status, _, body = await get(number)
        assert (status, body["localEndpoints"]) == (200, 1)
        daemon.health_checks.close()

    asyncio.run(scenario())
