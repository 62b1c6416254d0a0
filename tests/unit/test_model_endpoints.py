"""EndpointSlice, legacy v1 Endpoints and Pod parsing, as kubectl shows them.

Address plan: see yamlcases.py (Pods 10.244.0.0/16: node-1 10.244.1.0/24,
node-2 10.244.2.0/24).
"""

from __future__ import annotations

import datetime

import pytest

from dataplane.model import ContainerPort, Endpoint, EndpointPort, EndpointSlice, Pod, Protocol
from yamlcases import WEB_ENDPOINTS, WEB_POD, WEB_SLICE, documents, overlay, parse_dicts, parse_single


def test_kubectl_endpoint_slice_as_shown():
    assert parse_single(WEB_SLICE) == EndpointSlice(
        namespace="shop",
        name="web-8xk2p",
        service_name="web",
        address_type="IPv4",
        endpoints=(
            Endpoint("10.244.1.5", ready=True, serving=True, terminating=False, node_name="node-1", zone="zone-a", zone_hints=("zone-a",)),
            Endpoint("10.244.2.7", ready=False, serving=True, terminating=True, node_name="node-2", zone="zone-b"),
        ),
        ports=(EndpointPort("http", 8080, Protocol.TCP),),
    )


# (ready, serving, terminating) as kube-proxy reads them: unset ready and serving mean true.
@pytest.mark.parametrize(
    "conditions, expected",
    [
        pytest.param("{}", (True, True, False), id="all-unset"),
        pytest.param("null", (True, True, False), id="conditions-null"),
        pytest.param("{ready: true}", (True, True, False), id="ready"),
        pytest.param("{ready: false}", (False, True, False), id="not-ready-serving-unset"),
        pytest.param("{ready: false, serving: false}", (False, False, False), id="not-ready-not-serving"),
        pytest.param("{ready: false, serving: true, terminating: true}", (False, True, True), id="terminating-serving"),
        pytest.param("{ready: false, serving: false, terminating: true}", (False, False, True), id="terminating-not-serving"),
        pytest.param("{terminating: true}", (True, True, True), id="only-terminating-set"),
    ],
)
def test_endpoint_conditions(conditions, expected):
    obj = overlay(WEB_SLICE, "{}")
    obj["endpoints"] = [{"addresses": ["10.244.1.5"], "conditions": documents(conditions)[0]}]
    (endpoint,) = parse_single(obj).endpoints
    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == expected


@pytest.mark.parametrize(
    "patch, read, expected",
    [
        pytest.param("{ports: [{port: 8080}]}", lambda s: s.ports, (EndpointPort("", 8080, Protocol.TCP),), id="unnamed-port-defaults-tcp"),
        pytest.param("{ports: [{name: dns, port: 5353, protocol: UDP}, {name: sig, port: 9000, protocol: SCTP}]}", lambda s: s.ports, (EndpointPort("dns", 5353, Protocol.UDP), EndpointPort("sig", 9000, Protocol.SCTP)), id="named-ports-udp-sctp"),
        pytest.param("{ports: null}", lambda s: s.ports, (), id="no-ports"),
        pytest.param("{endpoints: null}", lambda s: s.endpoints, (), id="no-endpoints"),
        pytest.param("{endpoints: [{addresses: [10.244.1.5, 10.244.1.6]}]}", lambda s: [e.address for e in s.endpoints], ["10.244.1.5"], id="only-first-address-used"),
        pytest.param("{addressType: IPv6, endpoints: [{addresses: ['fd00:10:244:1:0::5']}]}", lambda s: (s.address_type, s.endpoints[0].address), ("IPv6", "fd00:10:244:1::5"), id="ipv6-canonicalised"),
        pytest.param("{addressType: FQDN, endpoints: [{addresses: [db.example.com]}]}", lambda s: (s.address_type, s.endpoints), ("FQDN", ()), id="fqdn-never-proxied"),
        pytest.param("{endpoints: [{addresses: [10.244.1.5], hostname: web-0}]}", lambda s: s.endpoints[0].hostname, "web-0", id="hostname"),
        pytest.param("{endpoints: [{addresses: [10.244.1.5], hints: {forZones: [{name: zone-a}, {name: zone-b}]}}]}", lambda s: s.endpoints[0].zone_hints, ("zone-a", "zone-b"), id="zone-hints"),
        pytest.param("{endpoints: [{addresses: [10.244.1.5]}]}", lambda s: (s.endpoints[0].node_name, s.endpoints[0].zone, s.endpoints[0].zone_hints), ("", "", ()), id="no-node-zone-hints"),
        pytest.param("{metadata: {name: web.abc-1}}", lambda s: s.name, "web.abc-1", id="name-may-be-subdomain"),
        pytest.param("{addressType: null}", lambda s: s.address_type, "IPv4", id="address-type-default"),
    ],
)
def test_endpoint_slice_field(patch, read, expected):
    assert read(parse_single(overlay(WEB_SLICE, patch))) == expected


def test_legacy_endpoints_become_one_slice_per_subset():
    objects = parse_dicts(WEB_ENDPOINTS)
    assert objects.slices == () and objects.services == ()
    assert objects.legacy == (
        EndpointSlice(
            namespace="shop",
            name="web-subset-0",
            service_name="web",
            address_type="IPv4",
            endpoints=(
                Endpoint("10.244.1.5", ready=True, serving=True, node_name="node-1"),
                Endpoint("10.244.2.7", ready=False, serving=False, node_name="node-2"),
            ),
            ports=(EndpointPort("http", 8080, Protocol.TCP),),
        ),
        EndpointSlice(
            namespace="shop",
            name="web-subset-1",
            service_name="web",
            address_type="IPv4",
            endpoints=(Endpoint("10.244.1.9", hostname="web-0"),),
            ports=(EndpointPort("metrics", 9100, Protocol.TCP),),
        ),
    )


@pytest.mark.parametrize(
    "patch, expected",
    [
        pytest.param("{subsets: null}", (), id="no-subsets"),
        pytest.param("{subsets: []}", (), id="empty-subsets"),
        pytest.param("{subsets: [{addresses: [{ip: 10.244.1.5}], ports: [{port: 8080}]}]}", (("", 8080, "TCP", "10.244.1.5", True),), id="unnamed-port"),
        pytest.param("{subsets: [{addresses: [{ip: 10.244.1.5}], ports: [{name: dns, port: 53, protocol: UDP}]}]}", (("dns", 53, "UDP", "10.244.1.5", True),), id="udp-port"),
        pytest.param("{subsets: [{notReadyAddresses: [{ip: 10.244.1.5}], ports: [{port: 8080}]}]}", (("", 8080, "TCP", "10.244.1.5", False),), id="only-not-ready"),
    ],
)
def test_legacy_endpoints_field(patch, expected):
    objects = parse_dicts(overlay(WEB_ENDPOINTS, patch))
    found = tuple(
        (port.name, port.port, str(port.protocol), endpoint.address, endpoint.ready)
        for endpoint_slice in objects.legacy
        for port in endpoint_slice.ports
        for endpoint in endpoint_slice.endpoints
    )
    assert found == expected


def test_kubectl_pod_as_shown():
    assert parse_single(WEB_POD) == Pod(
        namespace="shop",
        name="web-7d4b9c8f6-x2x9k",
        labels=(("app", "web"), ("pod-template-hash", "7d4b9c8f6")),
        node_name="node-1",
        ips=("10.244.1.5", "fd00:10:244:1::5"),
        ready=True,
        terminating=False,
        container_ports=(
            ContainerPort("http-alt", 8080, Protocol.TCP),
            ContainerPort("dns", 5353, Protocol.UDP),
            ContainerPort("metrics", 9100, Protocol.TCP),
        ),
    )


@pytest.mark.parametrize(
    "patch, read, expected",
    [
        pytest.param("{status: {podIPs: null}}", lambda p: p.ips, ("10.244.1.5",), id="podip-without-podips"),
        pytest.param("{status: {podIP: null, podIPs: null}}", lambda p: p.ips, (), id="no-ip-yet"),
        pytest.param("{status: {podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}, {ip: 10.244.1.5}]}}", lambda p: p.ips, ("10.244.1.5",), id="duplicate-ips-once"),
        pytest.param("{status: {conditions: [{type: Ready, status: 'False'}]}}", lambda p: p.ready, False, id="ready-false"),
        pytest.param("{status: {conditions: [{type: ContainersReady, status: 'True'}]}}", lambda p: p.ready, False, id="no-ready-condition"),
        pytest.param("{status: {conditions: null}}", lambda p: p.ready, False, id="no-conditions"),
        pytest.param("{status: {phase: Succeeded}}", lambda p: p.ready, False, id="finished-pod-not-ready"),
        pytest.param("{status: {phase: Pending, conditions: [{type: Ready, status: 'False'}]}}", lambda p: p.ready, False, id="pending"),
        pytest.param("{metadata: {deletionTimestamp: '2024-05-01T10:05:00Z', deletionGracePeriodSeconds: 30}}", lambda p: p.terminating, True, id="terminating-quoted-timestamp"),
        pytest.param("{metadata: {deletionTimestamp: 2024-05-01T10:05:00Z}}", lambda p: p.terminating, True, id="terminating-unquoted-timestamp"),
        pytest.param("{metadata: {deletionTimestamp: null}}", lambda p: p.terminating, False, id="not-terminating"),
        pytest.param("{spec: {nodeName: null}}", lambda p: p.node_name, "", id="not-scheduled"),
        pytest.param("{spec: {containers: [{name: app, image: x, ports: [{containerPort: 80}]}]}}", lambda p: p.container_ports, (ContainerPort("", 80, Protocol.TCP),), id="unnamed-container-port"),
        pytest.param("{spec: {containers: [{name: app, image: x}]}}", lambda p: p.container_ports, (), id="no-container-ports"),
        pytest.param("{spec: {hostname: web-0, subdomain: web}}", lambda p: (p.hostname, p.subdomain), ("web-0", "web"), id="hostname-subdomain"),
        pytest.param("{metadata: {labels: null}}", lambda p: p.labels, (), id="no-labels"),
    ],
)
def test_pod_field(patch, read, expected):
    assert read(parse_single(overlay(WEB_POD, patch))) == expected


def test_unquoted_timestamp_really_is_a_datetime():
    # Guards the case above: PyYAML turns it into a datetime, which the model must accept.
    obj = overlay(WEB_POD, "{metadata: {deletionTimestamp: 2024-05-01T10:05:00Z}}")
    assert isinstance(obj["metadata"]["deletionTimestamp"], datetime.datetime)

