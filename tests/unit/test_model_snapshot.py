"""Joining Services with their endpoints (join_service) and the Store that keeps
the joins current, returning exactly the Services whose state changed.

Address plan: see yamlcases.py. Service shop/web is 10.96.0.10; Pods on node-1
are 10.244.1.x, on node-2 10.244.2.x; the legacy Endpoints point at 10.244.3.x.
"""

from __future__ import annotations

import pytest

from dataplane.model import Backend, ObjectSet, ServiceKey, join_service
from dataplane.sync.store import Store
from yamlcases import parse_ok

WEB = ServiceKey("shop", "web")

# Two ports: "http" targets the container port named http-alt, "metrics" a number.
SVC = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: http-alt}
  - {name: metrics, port: 9100, protocol: TCP, targetPort: 9100}
  selector: {app: web}
"""
SVC_ONE_PORT = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, protocol: TCP, targetPort: 8080}], selector: {app: web}}
"""
SVC_NO_SELECTOR = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
"""


def _slice(name: str, endpoints: str, ports: str = "[{name: http, port: 8080, protocol: TCP}, {name: metrics, port: 9100, protocol: TCP}]") -> str:
    return f"""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: shop
  labels: {{kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}}
addressType: IPv4
endpoints: {endpoints}
ports: {ports}
"""


SLICE_A = _slice("web-a", "[{addresses: [10.244.1.5], conditions: {ready: true, serving: true, terminating: false}, nodeName: node-1}, {addresses: [10.244.1.6], conditions: {ready: false, serving: false, terminating: false}, nodeName: node-1}]")
SLICE_B = _slice("web-b", "[{addresses: [10.244.2.7], conditions: {ready: true, serving: true, terminating: false}, nodeName: node-2}]")
SLICE_DUP = _slice("web-dup", "[{addresses: [10.244.1.6], conditions: {ready: true}, nodeName: node-1}]")
SLICE_EMPTY = _slice("web-empty", "[]")
SLICE_UNNAMED = _slice("web-u", "[{addresses: [10.244.1.5], conditions: {ready: true}}]", "[{name: '', port: 8080, protocol: TCP}]")
SLICE_UDP = _slice("web-udp", "[{addresses: [10.244.1.5], conditions: {ready: true}}]", "[{name: http, port: 8080, protocol: UDP}]")
ENDPOINTS = """
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: shop}
subsets:
- addresses: [{ip: 10.244.3.3, nodeName: node-3}]
  notReadyAddresses: [{ip: 10.244.3.4}]
  ports: [{name: http, port: 8081, protocol: TCP}, {name: metrics, port: 9101, protocol: TCP}]
"""


def _pod(name: str, ip: str | None, ready: bool = True, ports: str = "[{name: http-alt, containerPort: 8080}]", namespace: str = "shop", app: str = "web", extra_meta: str = "") -> str:
    status = f"podIP: {ip}\n  podIPs: [{{ip: {ip}}}]" if ip else "hostIP: 192.168.1.11"
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}, pod-template-hash: 7d4b9c8f6}}{extra_meta}}}
spec:
  nodeName: node-{ip.split('.')[2] if ip else 1}
  containers: [{{name: app, image: nginx, ports: {ports}}}]
status:
  phase: Running
  conditions: [{{type: Ready, status: '{ready}'}}]
  {status}
"""


POD_1 = _pod("web-1", "10.244.1.5")
POD_2 = _pod("web-2", "10.244.2.7", ports="[{name: http-alt, containerPort: 8088}]")
POD_NOT_READY = _pod("web-3", "10.244.1.8", ready=False)
POD_TERMINATING = _pod("web-4", "10.244.2.9", extra_meta=", deletionTimestamp: '2024-05-01T10:05:00Z'")
POD_NO_IP = _pod("web-5", None)
POD_NO_NAMED_PORT = _pod("web-6", "10.244.2.10", ports="[{name: other, containerPort: 7000}]")
POD_UDP_NAMED = _pod("web-7", "10.244.2.11", ports="[{name: http-alt, containerPort: 8080, protocol: UDP}]")
POD_OTHER_APP = _pod("api-1", "10.244.1.20", app="api")
POD_OTHER_NS = _pod("web-1", "10.244.1.30", namespace="other")
POD_DUAL = _pod("web-8", "10.244.1.40").replace("podIPs: [{ip: 10.244.1.40}]", "podIPs: [{ip: 10.244.1.40}, {ip: 'fd00:10:244:1::40'}]")


def describe(backend: Backend) -> str:
    """`ip:port` with the conditions that differ from a plain ready endpoint."""
    flags = [
        *(["not-ready"] if not backend.ready else []),
        *(["serving"] if backend.serving and not backend.ready else []),
        *(["terminating"] if backend.terminating else []),
    ]
    host = f"[{backend.ip}]" if backend.family == 6 else backend.ip
    return " ".join([f"{host}:{backend.port}", *flags])


def _objects(*manifests: str) -> ObjectSet:
    return parse_ok("---".join(manifests))


# Each case: the manifests present, and per Service port name the backends expected.
JOIN_CASES = [
    pytest.param([SVC, SLICE_A, ENDPOINTS, POD_1], {"http": ["10.244.1.5:8080", "10.244.1.6:8080 not-ready"], "metrics": ["10.244.1.5:9100", "10.244.1.6:9100 not-ready"]}, id="slices-win-over-endpoints-and-pods"),
    pytest.param([SVC, SLICE_EMPTY, ENDPOINTS, POD_1], {"http": [], "metrics": []}, id="an-empty-slice-still-wins"),
    pytest.param([SVC, ENDPOINTS, POD_1], {"http": ["10.244.3.3:8081", "10.244.3.4:8081 not-ready"], "metrics": ["10.244.3.3:9101", "10.244.3.4:9101 not-ready"]}, id="endpoints-win-over-pods"),
    pytest.param([SVC, POD_1, POD_2], {"http": ["10.244.1.5:8080", "10.244.2.7:8088"], "metrics": ["10.244.1.5:9100", "10.244.2.7:9100"]}, id="pods-when-nothing-else-named-port-per-pod"),
    pytest.param([SVC, SLICE_A, SLICE_B], {"http": ["10.244.1.5:8080", "10.244.1.6:8080 not-ready", "10.244.2.7:8080"], "metrics": ["10.244.1.5:9100", "10.244.1.6:9100 not-ready", "10.244.2.7:9100"]}, id="several-slices-merged"),
    pytest.param([SVC, SLICE_A, SLICE_DUP], {"http": ["10.244.1.5:8080", "10.244.1.6:8080"], "metrics": ["10.244.1.5:9100", "10.244.1.6:9100"]}, id="duplicate-endpoint-ready-copy-wins"),
    pytest.param([SVC_ONE_PORT, SLICE_UNNAMED], {"": ["10.244.1.5:8080"]}, id="unnamed-port-matches-unnamed-slice-port"),
    pytest.param([SVC, SLICE_UNNAMED], {"http": [], "metrics": []}, id="named-port-ignores-unnamed-slice-port"),
    pytest.param([SVC_ONE_PORT, SLICE_A], {"": []}, id="unnamed-port-ignores-named-slice-ports"),
    pytest.param([SVC, SLICE_UDP], {"http": [], "metrics": []}, id="slice-port-protocol-must-match"),
    pytest.param([SVC, SLICE_B, POD_2], {"http": ["10.244.2.7:8080"], "metrics": ["10.244.2.7:9100"]}, id="named-target-port-from-slice-not-pods"),
    pytest.param([SVC_ONE_PORT, POD_1, POD_2], {"": ["10.244.1.5:8080", "10.244.2.7:8080"]}, id="numeric-target-port-ignores-container-ports"),
    pytest.param([SVC, POD_NO_NAMED_PORT], {"http": [], "metrics": ["10.244.2.10:9100"]}, id="pod-without-the-named-port-skipped-for-it"),
    pytest.param([SVC, POD_UDP_NAMED], {"http": [], "metrics": ["10.244.2.11:9100"]}, id="named-port-protocol-must-match"),
    pytest.param([SVC, POD_NOT_READY], {"http": ["10.244.1.8:8080 not-ready"], "metrics": ["10.244.1.8:9100 not-ready"]}, id="not-ready-pod"),
    pytest.param([SVC, POD_TERMINATING], {"http": ["10.244.2.9:8080 not-ready serving terminating"], "metrics": ["10.244.2.9:9100 not-ready serving terminating"]}, id="terminating-ready-pod-serves-but-is-not-ready"),
    pytest.param([SVC, POD_OTHER_APP], {"http": [], "metrics": []}, id="pod-not-matching-selector"),
    pytest.param([SVC, POD_OTHER_NS], {"http": [], "metrics": []}, id="pod-in-another-namespace"),
    pytest.param([SVC, POD_NO_IP], {"http": [], "metrics": []}, id="pod-without-ip"),
    pytest.param([SVC, POD_DUAL], {"http": ["10.244.1.40:8080", "[fd00:10:244:1::40]:8080"], "metrics": ["10.244.1.40:9100", "[fd00:10:244:1::40]:9100"]}, id="dual-stack-pod"),
    pytest.param([SVC_NO_SELECTOR, POD_1], {"http": []}, id="no-selector-no-pods"),
    pytest.param([SVC_NO_SELECTOR, ENDPOINTS], {"http": ["10.244.3.3:8081", "10.244.3.4:8081 not-ready"]}, id="no-selector-manual-endpoints"),
]


@pytest.mark.parametrize("manifests, expected", JOIN_CASES)
def test_join_service(manifests, expected):
    objects = _objects(*manifests)
    (service,) = objects.services
    state = join_service(service, objects.slices, objects.legacy, objects.pods)
    assert state.service is service
    assert {port.name: [describe(b) for b in backends] for port, backends in state.port_backends()} == expected


@pytest.mark.parametrize("manifests, expected", JOIN_CASES)
def test_store_joins_the_same_way(manifests, expected):
    store = Store()
    # One file per manifest: the join must not depend on objects sharing a file.
    for index, manifest in enumerate(manifests):
        store.replace(f"/m/{index}.yaml", _objects(manifest))
    state = store.snapshot().services[WEB]
    assert {port.name: [describe(b) for b in backends] for port, backends in state.port_backends()} == expected


def test_backend_carries_node_zone_and_hints_from_the_slice():
    objects = _objects(SVC, _slice("web-z", "[{addresses: [10.244.1.5], conditions: {ready: true}, nodeName: node-1, zone: zone-a, hostname: web-0, hints: {forZones: [{name: zone-a}]}}]"))
    state = join_service(objects.services[0], objects.slices)
    assert state.backends[0] == (Backend("10.244.1.5", 8080, True, True, False, "node-1", "zone-a", ("zone-a",), "web-0"),)


def test_backend_from_pod_carries_its_node():
    objects = _objects(SVC, POD_2)
    state = join_service(objects.services[0], pods=objects.pods)
    assert state.backends[0] == (Backend("10.244.2.7", 8088, ready=True, serving=True, terminating=False, node_name="node-2"),)


def test_backends_are_sorted_whatever_the_input_order():
    objects = _objects(SVC, POD_2, POD_1, POD_NOT_READY)
    forward = join_service(objects.services[0], pods=objects.pods)
    backward = join_service(objects.services[0], pods=reversed(objects.pods))
    assert forward == backward
    assert [b.ip for b in forward.backends[1]] == ["10.244.1.5", "10.244.1.8", "10.244.2.7"]


# --- Store: which Services a change touches --------------------------------------------------

SVC_API = """
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: api}}
"""
SVC_OTHER_NS = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: other}
spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: web}}
"""
API = ServiceKey("shop", "api")
OTHER = ServiceKey("other", "web")


def _store(**files: str) -> Store:
    store = Store()
    for origin, text in files.items():
        store.replace(origin, _objects(text))
    return store


def test_first_load_reports_every_service():
    store = Store()
    assert store.replace("services.yaml", _objects(SVC, SVC_API, SVC_OTHER_NS)) == {WEB, API, OTHER}
    assert set(store.snapshot().services) == {WEB, API, OTHER}
    assert store.origins == frozenset({"services.yaml"})


def test_reloading_identical_content_changes_nothing():
    store = _store(services=SVC + "---" + SVC_API, pods=POD_1)
    assert store.replace("services", _objects(SVC, SVC_API)) == set()
    assert store.replace("pods", _objects(POD_1)) == set()


def test_editing_one_service_reports_only_it():
    store = _store(services=SVC + "---" + SVC_API)
    edited = SVC_API.replace("port: 80,", "port: 81,")
    assert store.replace("services", _objects(SVC, edited)) == {API}
    assert store.snapshot().services[API].service.ports[0].port == 81


@pytest.mark.parametrize(
    "pod, changed",
    [
        pytest.param(POD_OTHER_NS, {OTHER}, id="matching-pod-in-other-namespace-changes-only-that-namespace"),
        pytest.param(_pod("web-9", "10.244.1.50", namespace="elsewhere"), set(), id="pod-in-a-namespace-without-services"),
        pytest.param(POD_1, {WEB}, id="matching-pod-changes-its-service"),
        pytest.param(_pod("api-1", "10.244.1.21", app="api"), {API}, id="pod-changes-only-the-service-selecting-it"),
        pytest.param(_pod("db-1", "10.244.1.22", app="db"), set(), id="pod-selected-by-nothing"),
        pytest.param(POD_NO_IP, set(), id="pod-without-ip-changes-nothing"),
    ],
)
def test_adding_a_pod_reports_exactly_the_services_it_changes(pod, changed):
    store = _store(services=SVC + "---" + SVC_API + "---" + SVC_OTHER_NS)
    before = store.snapshot()
    assert store.replace("pod.yaml", _objects(pod)) == changed
    after = store.snapshot()
    assert {key for key in after.services if after.services[key] != before.services[key]} == changed


def test_pod_in_another_namespace_changes_nothing():
    store = _store(services=SVC, pods=POD_1)
    assert store.replace("other-pods", _objects(POD_OTHER_NS)) == set()
    assert [describe(b) for b in store.snapshot().services[WEB].backends[0]] == ["10.244.1.5:8080"]


def test_pod_becoming_ready_and_being_deleted():
    store = _store(services=SVC, pods=POD_NOT_READY)
    assert store.replace("pods", _objects(POD_NOT_READY.replace("status: 'False'", "status: 'True'"))) == {WEB}
    assert [describe(b) for b in store.snapshot().services[WEB].backends[0]] == ["10.244.1.8:8080"]
    assert store.replace("pods", ObjectSet()) == {WEB}
    assert store.snapshot().services[WEB].backends == ((), ())
    assert store.snapshot().pods == {}


def test_slice_arriving_later_takes_over_from_pods_and_leaving_hands_back():
    store = _store(services=SVC, pods=POD_1)
    assert store.replace("slices", _objects(SLICE_B)) == {WEB}
    assert [describe(b) for b in store.snapshot().services[WEB].backends[0]] == ["10.244.2.7:8080"]
    assert store.replace("slices", None) == {WEB}
    assert [describe(b) for b in store.snapshot().services[WEB].backends[0]] == ["10.244.1.5:8080"]


def test_legacy_endpoints_give_way_to_a_slice():
    store = _store(services=SVC, endpoints=ENDPOINTS)
    assert store.replace("slices", _objects(SLICE_B)) == {WEB}
    assert store.replace("endpoints", None) == set()  # the slice still wins: nothing changes
    assert [describe(b) for b in store.snapshot().services[WEB].backends[0]] == ["10.244.2.7:8080"]


def test_slice_for_an_unknown_service_changes_nothing_until_it_appears():
    store = Store()
    assert store.replace("slices", _objects(SLICE_B)) == set()
    assert store.snapshot().services == {}
    assert store.replace("services", _objects(SVC)) == {WEB}
    assert [describe(b) for b in store.snapshot().services[WEB].backends[0]] == ["10.244.2.7:8080"]


def test_slice_naming_another_service_changes_only_that_one():
    store = _store(services=SVC + "---" + SVC_API, pods=POD_1)
    api_slice = SLICE_B.replace("kubernetes.io/service-name: web", "kubernetes.io/service-name: api").replace("name: web-b", "name: api-b")
    assert store.replace("api-slice", _objects(api_slice)) == {API}
    assert [describe(b) for b in store.snapshot().services[WEB].backends[0]] == ["10.244.1.5:8080"]


def test_removing_a_file_withdraws_its_objects():
    store = _store(a=SVC + "---" + POD_1, b=SVC_API)
    assert store.replace("a", None) == {WEB}
    assert set(store.snapshot().services) == {API}
    assert store.snapshot().pods == {}
    assert store.origins == frozenset({"b"})
    assert store.replace("a", None) == set()  # withdrawing twice is harmless


def test_service_moving_between_files():
    store = _store(a=SVC)
    assert store.replace("b", _objects(SVC)) == set()  # the same definition twice: state unchanged
    assert store.replace("a", None) == set()  # still defined in b
    assert store.replace("b", None) == {WEB}
    assert store.snapshot().services == {}


def test_service_defined_twice_uses_the_last_origin():
    store = _store(**{"a.yaml": SVC, "b.yaml": SVC.replace("10.96.0.10", "10.96.0.11")})
    assert store.snapshot().services[WEB].service.cluster_ips == ("10.96.0.11",)
    assert store.replace("b.yaml", None) == {WEB}
    assert store.snapshot().services[WEB].service.cluster_ips == ("10.96.0.10",)


def test_a_snapshot_is_a_value_that_does_not_move_with_the_store():
    store = _store(services=SVC, pods=POD_1)
    old = store.snapshot()
    store.replace("pods", _objects(POD_1, POD_2))
    store.replace("services", _objects(SVC_API))
    assert set(old.services) == {WEB}
    assert [describe(b) for b in old.services[WEB].backends[0]] == ["10.244.1.5:8080"]
    assert set(old.pods) == {("shop", "web-1")}
    assert set(store.snapshot().services) == {API}
    assert set(store.snapshot().pods) == {("shop", "web-1"), ("shop", "web-2")}


def test_describe_marks_conditions_and_brackets_ipv6():
    # The test helper itself: a wrong flag here would hide a wrong join.
    assert describe(Backend("10.244.1.5", 80)) == "10.244.1.5:80"
    assert describe(Backend("10.244.1.5", 80, ready=False, serving=False)) == "10.244.1.5:80 not-ready"
    assert describe(Backend("fd00::1", 80, ready=False, serving=True, terminating=True)) == "[fd00::1]:80 not-ready serving terminating"


def test_snapshot_lineage_names_what_changed_since_the_previous_one():
    store = _store(services=SVC + "---" + SVC_API)
    first = store.snapshot()
    assert (first.previous, first.changed) == (None, None)  # nothing seen before: a full sync
    store.replace("pods", _objects(POD_1))
    store.replace("api-pods", _objects(_pod("api-1", "10.244.1.21", app="api")))
    second = store.snapshot()
    assert second.previous() is first and second.changed == {WEB, API}
    third = store.snapshot()
    assert third.previous() is second and third.changed == frozenset()


def test_snapshot_lineage_is_cut_when_the_previous_snapshot_is_gone():
    store = _store(services=SVC)
    store.snapshot()  # dropped at once: no consumer holds it
    store.replace("pods", _objects(POD_1))
    latest = store.snapshot()
    assert (latest.previous, latest.changed) == (None, None)
