"""The model's fast parse path: for every object it accepts, the same value the field-by-field
Reader path builds, with no problem the Reader path would have reported; everything else is left
to the Reader path, which names the object and the field.

The generator starts from well-formed objects and replaces fields (at every depth) with values
drawn from pools of good, odd and bad ones: the fast path must either agree or decline.

Address plan: ClusterIPs 10.96.0.0/12, Pods 10.244.0.0/16, IPv6 Pods fd00::/64.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dataplane.model.endpoints import _read_endpoint_slice, fast_endpoint_slice
from dataplane.model.errors import InvalidObject
from dataplane.model.service import _read_service, fast_service

SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                 "annotations": {"note": "x"}, "creationTimestamp": "2026-01-02T03:04:05Z"},
    "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
             "selector": {"app": "web"},
             "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                       {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}]},
}
SLICE = {
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
    "metadata": {"name": "web-abcde", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}, "nodeName": "node-1"},
                  {"addresses": ["10.244.1.6"], "conditions": {"ready": False, "serving": True, "terminating": True},
                   "nodeName": "node-2", "zone": "a", "hostname": "pod-2", "hints": {"forZones": [{"name": "a"}]}}],
}

# Values a field may be replaced with: good ones, unusual ones the Reader path accepts, bad ones.
ANY = [None, "", "x", "web", "Web", "-web", "a" * 64, "web;x", 0, 1, 80, 8080, 70000, -1, True, False, 1.0, 80.5,
       [], ["x"], {}, {"a": "b"}, {"a": 1}, {1: "a"}, "None", "TCP", "UDP", "SCTP", "tcp", "IPv4", "IPv6", "FQDN",
       "ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "Local", "Cluster", "ClientIP",
       "10.96.0.11", "10.96.0.300", "127.0.0.1", "0.0.0.0", "169.254.1.1", "224.0.0.1", "255.255.255.255",
       "fd00::5", "10.244.1.7", ["10.96.0.11"], ["10.96.0.10", "fd00::10"], ["127.0.0.1"], ["10.244.1.9", "x"],
       "8080", "http", "toolongportname1", 30080, "2026-01-02T03:04:05+02:00", "2026-01-02", "yesterday",
       {"kubernetes.io/service-name": "web"}, {"dataplane.io/lb-algorithm": "maglev"}, {"forZones": [{"name": 5}]},
       {"forZones": [{"name": "b"}]}, {"forZones": "a"}, ["a"], [{"name": "b"}], [{"name": "http", "port": 80}]]

SERVICE_PATHS = ["metadata", "metadata.name", "metadata.namespace", "metadata.labels", "metadata.annotations",
                 "metadata.creationTimestamp", "spec", "spec.type", "spec.clusterIP", "spec.clusterIPs",
                 "spec.selector", "spec.ports", "spec.ports.0", "spec.ports.0.name", "spec.ports.0.port",
                 "spec.ports.0.targetPort", "spec.ports.0.protocol", "spec.ports.0.nodePort", "spec.ports.1.name",
                 "spec.ports.1.port", "spec.ports.1.targetPort", "spec.ports.1.protocol", "spec.externalIPs",
                 "spec.sessionAffinity", "spec.externalTrafficPolicy", "spec.internalTrafficPolicy",
                 "spec.loadBalancerSourceRanges", "spec.healthCheckNodePort", "spec.externalName"]
SLICE_PATHS = ["metadata", "metadata.name", "metadata.namespace", "metadata.labels",
               "metadata.labels.kubernetes.io/service-name", "addressType", "ports", "ports.0", "ports.0.name",
               "ports.0.port", "ports.0.protocol", "endpoints", "endpoints.0", "endpoints.0.addresses",
               "endpoints.0.addresses.0", "endpoints.0.conditions", "endpoints.0.conditions.ready",
               "endpoints.0.conditions.serving", "endpoints.0.conditions.terminating", "endpoints.0.nodeName",
               "endpoints.1.zone", "endpoints.1.hostname", "endpoints.1.hints", "endpoints.1.hints.forZones",
               "endpoints.1.addresses.0"]
_DROP = object()


def _set(obj: dict, path: str, value) -> None:
    """Sets (or with _DROP removes) the field at `path`; a path through a non-container is left alone."""
    *parents, last = path.split(".") if "kubernetes.io/" not in path else [*path.split(".")[:-2], path.split(".", 2)[2]]
    node = obj
    for step in parents:
        node = node[int(step)] if isinstance(node, list) and step.isdigit() and int(step) < len(node) \
            else node.get(step) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, list):
        if last.isdigit() and int(last) < len(node):
            if value is _DROP:
                del node[int(last)]
            else:
                node[int(last)] = value
    elif isinstance(node, dict):
        if value is _DROP:
            node.pop(last, None)
        else:
            node[last] = value


# Near misses by field: mostly good values, and the bad ones closest to them.
NAMES = ["web", "web-2", "a" * 63, "a" * 64, "Web", "web.x", "-web", "", None, 5]
PORTS = [1, 80, 65535, 0, 65536, -1, True, "80", 80.0, None]
FLAGS = [True, False, None, 1, 0, "true", 1.0]
NEAR = {
    "name": NAMES, "namespace": NAMES, "nodeName": NAMES + ["node.a", "node_a"], "port": PORTS,
    "targetPort": PORTS + ["http", "8080", "web--x", "toolongportname1", ""], "nodePort": PORTS + [30080],
    "healthCheckNodePort": PORTS, "protocol": ["TCP", "UDP", "SCTP", "tcp", "", None, 6],
    "ready": FLAGS, "serving": FLAGS, "terminating": FLAGS, "zone": ["a", "", None, 5], "hostname": ["h", None, 1],
    "type": ["ClusterIP", "NodePort", None, "LoadBalancer", "clusterip", 7],
    "clusterIP": ["10.96.0.10", "10.96.0.11", "", "None", None, "127.0.0.1", "10.96.0.300", 5],
    "clusterIPs": [["10.96.0.10"], [], None, ["10.96.0.11"], ["10.96.0.10", "fd00::10"], ["None"], "10.96.0.10"],
    "addressType": ["IPv4", "IPv6", "FQDN", None, "ipv4", 4],
    "externalIPs": [[], None, "", ["192.168.1.5"]], "loadBalancerSourceRanges": [[], None, "", ["10.0.0.0/8"]],
    "externalTrafficPolicy": ["Cluster", "Local", None, "local"], "internalTrafficPolicy": ["Cluster", "Local", None],
    "sessionAffinity": ["None", None, "ClientIP", "none"], "externalName": [None, "", "x.example", 5],
    "creationTimestamp": ["2026-01-02T03:04:05Z", "2026-01-02T03:04:05+02:00", "2026-01-02", "", None, 5],
    "0": ["10.244.1.7", "fd00::7", "10.244.1.300", "", None, 7, " 10.244.1.7"],
}


def variants(base: dict, paths: list[str]):
    def value(path: str):
        near = NEAR.get(path.rsplit(".", 1)[-1])
        pool = st.sampled_from([_DROP, *ANY])
        return pool if near is None else st.one_of(st.sampled_from(near), st.sampled_from(near), pool)

    change = st.sampled_from(paths).flatmap(lambda path: st.tuples(st.just(path), value(path)))
    return st.lists(change, max_size=3).map(lambda changes: _apply(base, changes))


def _apply(base: dict, changes) -> dict:
    obj = copy.deepcopy(base)
    for path, value in changes:
        _set(obj, path, copy.deepcopy(value))
    return obj


def _slow(read, obj):
    problems: list[InvalidObject] = []
    try:
        return read(obj, problems), problems
    except (InvalidObject, TypeError, ValueError, AttributeError) as error:
        return error, problems


@settings(max_examples=3000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(variants(SERVICE, SERVICE_PATHS))
def test_fast_service_agrees_or_declines(obj):
    fast = fast_service(obj)
    if fast is not None:
        assert _slow(_read_service, obj) == (fast, [])


@settings(max_examples=3000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(variants(SLICE, SLICE_PATHS))
def test_fast_endpoint_slice_agrees_or_declines(obj):
    fast = fast_endpoint_slice(obj)
    if fast is not None:
        assert _slow(_read_endpoint_slice, obj) == (fast, [])


def _ipv6_slice() -> dict:
    obj = copy.deepcopy(SLICE)
    obj["addressType"] = "IPv6"
    for index, endpoint in enumerate(obj["endpoints"]):
        endpoint["addresses"] = [f"fd00::{index + 5}"]
    return obj


def _node_port_service() -> dict:
    obj = copy.deepcopy(SERVICE)
    obj["spec"]["type"] = "NodePort"
    obj["spec"]["ports"][0]["nodePort"] = 30080
    return obj


# The fast path must really be taken for the common shapes (else the properties above prove nothing).
@pytest.mark.parametrize("read, slow, obj", [
    pytest.param(fast_service, _read_service, SERVICE, id="clusterip-service"),
    pytest.param(fast_service, _read_service, _node_port_service(), id="nodeport-service"),
    pytest.param(fast_endpoint_slice, _read_endpoint_slice, SLICE, id="ipv4-slice"),
    pytest.param(fast_endpoint_slice, _read_endpoint_slice, _ipv6_slice(), id="ipv6-slice"),
])
def test_the_common_shapes_take_the_fast_path(read, slow, obj):
    value = read(obj)
    assert value is not None
    assert value == slow(obj, [])


def test_names_read_twice_share_one_string():
    first, second = copy.deepcopy(SLICE), copy.deepcopy(SLICE)
    a, b = fast_endpoint_slice(first), fast_endpoint_slice(second)
    assert a.namespace is b.namespace and a.endpoints[0].node_name is b.endpoints[0].node_name
