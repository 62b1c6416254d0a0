"""One owner per address and port, in every map (issue 13): the store decides a conflict once,
before rendering, and the loser's claim reaches no map at all.

Order: the older creationTimestamp keeps it; equal or absent (absent sorts last), namespace/name.
The kernel-level proof, with packets, is tests/e2e/test_bad_input.py.

Address plan: see yamlcases.py. good and bad both claim 10.96.0.10:80/TCP.
"""

from __future__ import annotations

import logging

import pytest

from dataplane.config import NodeSettings
from dataplane.model import ServiceKey, parse_objects
from dataplane.nat import layout
from dataplane.nat.render import render
from dataplane.sync.store import Store

SETTINGS = NodeSettings(node_name="node-1")
GOOD, BAD = ServiceKey("shop", "good"), ServiceKey("shop", "bad")


def service(name: str, ip: str = "10.96.0.10", port: int = 80, created: str | None = None, node_port: int | None = None,
            external_ips: tuple[str, ...] = (), extra_port: int | None = None) -> dict:
    ports = [{"name": "http", "port": port, "targetPort": 8080, **({"nodePort": node_port} if node_port else {})}]
    if extra_port:
        ports.append({"name": "other", "port": extra_port, "targetPort": 8080})
    meta = {"name": name, "namespace": "shop", **({"creationTimestamp": created} if created else {})}
    spec = {"clusterIP": ip, "ports": ports, "externalIPs": list(external_ips),
            **({"type": "NodePort"} if node_port else {})}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def endpoints(name: str, *ips: str) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{name}-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": [ip]} for ip in ips]}


def put(store: Store, origin: str, *objs: dict) -> set[ServiceKey]:
    objects, problems = parse_objects(objs, origin)
    assert not problems, problems
    return store.replace(origin, objects)


def elements(store: Store, key: str) -> dict[str, list[str]]:
    """Every map or set entry keyed `key`, by container, in the rendered ruleset."""
    ruleset = render(store.snapshot(), SETTINGS)
    found: dict[str, list[str]] = {}
    for owner, fragment in ruleset.fragments.items():
        for element in fragment.elements:
            if element.key == key or element.key.startswith(f"{key} . "):
                found.setdefault(element.container, []).append(f"{owner}: {element.value}")
    return found


def test_a_service_without_endpoints_cannot_take_the_address_of_one_with_them(caplog):
    store = Store()
    put(store, "good.yaml", service("good", created="2024-01-01T00:00:00Z"), endpoints("good", "10.244.1.5"))
    with caplog.at_level(logging.ERROR):
        put(store, "bad.yaml", service("bad", created="2024-06-01T00:00:00Z"))
    found = elements(store, "10.96.0.10 . tcp . 80")
    # Before: service-ips held good's entry and no-endpoint-services bad's reject (which runs first).
    assert set(found) == {layout.SERVICE_IPS, layout.endpoints_map(1), layout.CLUSTER_IP_PORTS}
    assert all(entry.startswith("shop/good") for entries in found.values() for entry in entries)
    assert store.snapshot().services[BAD].service.ports == ()
    (problem,) = store.problems()["bad.yaml"]
    assert problem == ("bad.yaml: Service shop/bad: spec.ports[0]: is already served (10.96.0.10:80/TCP by Service "
                       "shop/good), which keeps it; this port is left out")
    assert [r.getMessage() for r in caplog.records] == [f"ignoring part of an object: {problem}"]


@pytest.mark.parametrize("good_created, bad_created", [
    pytest.param("2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z", id="older-wins"),
    pytest.param("2024-01-01T02:00:00+02:00", "2024-01-01T00:30:00Z", id="older-wins-across-time-zones"),
    pytest.param("2024-01-01T00:00:00Z", None, id="a-timestamp-beats-none"),
])
@pytest.mark.parametrize("good_first", [True, False], ids=["good-loaded-first", "bad-loaded-first"])
def test_the_older_service_keeps_it_whatever_came_first(good_created, bad_created, good_first):
    store = Store()
    loads = [("good.yaml", service("good", created=good_created)), ("bad.yaml", service("bad", created=bad_created))]
    for origin, obj in loads if good_first else reversed(loads):
        put(store, origin, obj)
    services = store.snapshot().services
    assert [p.port for p in services[GOOD].service.ports] == [80]
    assert services[BAD].service.ports == ()
    assert list(store.problems()) == ["bad.yaml"]


def test_without_timestamps_namespace_and_name_decide():
    store = Store()
    put(store, "z.yaml", service("zeta"))
    put(store, "a.yaml", service("alpha"))
    services = store.snapshot().services
    assert services[ServiceKey("shop", "alpha")].service.ports and not services[ServiceKey("shop", "zeta")].service.ports


def test_the_loser_gets_its_port_back_when_the_winner_leaves():
    store = Store()
    put(store, "good.yaml", service("good", created="2024-01-01T00:00:00Z"))
    put(store, "bad.yaml", service("bad", created="2024-06-01T00:00:00Z"))
    store.snapshot()
    assert store.replace("good.yaml", None) == {GOOD, BAD}
    assert [p.port for p in store.snapshot().services[BAD].service.ports] == [80]
    assert store.problems() == {}


def test_the_loser_gets_its_port_back_when_the_winner_moves_away():
    store = Store()
    put(store, "good.yaml", service("good", created="2024-01-01T00:00:00Z"))
    put(store, "bad.yaml", service("bad", created="2024-06-01T00:00:00Z"))
    assert put(store, "good.yaml", service("good", ip="10.96.0.11", created="2024-01-01T00:00:00Z")) == {GOOD, BAD}
    assert [p.port for p in store.snapshot().services[BAD].service.ports] == [80]


def test_a_winner_that_appears_later_takes_it_and_the_old_holder_is_reported():
    store = Store()
    put(store, "bad.yaml", service("bad", created="2024-06-01T00:00:00Z"))
    store.snapshot()
    assert put(store, "good.yaml", service("good", created="2024-01-01T00:00:00Z")) == {GOOD, BAD}
    assert store.snapshot().services[BAD].service.ports == ()


def test_only_the_contested_port_is_left_out():
    store = Store()
    put(store, "good.yaml", service("good", created="2024-01-01T00:00:00Z"))
    put(store, "bad.yaml", service("bad", ip="10.96.0.20", external_ips=("10.96.0.10",), extra_port=443,
                                   created="2024-06-01T00:00:00Z"))
    (port,) = store.snapshot().services[BAD].service.ports
    assert port.port == 443
    assert elements(store, "10.96.0.20 . tcp . 80") == {}
    assert elements(store, "10.96.0.20 . tcp . 443")


def test_a_contested_nodeport_is_left_out_and_the_addresses_stay():
    store = Store()
    put(store, "good.yaml", service("good", created="2024-01-01T00:00:00Z", node_port=30080))
    put(store, "bad.yaml", service("bad", ip="10.96.0.20", created="2024-06-01T00:00:00Z", node_port=30080))
    (port,) = store.snapshot().services[BAD].service.ports
    assert (port.port, port.node_port) == (80, None)
    assert [e.split(":")[0] for e in elements(store, "tcp . 30080")[layout.NO_ENDPOINT_NODEPORTS]] == ["shop/good"]
    (problem,) = store.problems()["bad.yaml"]
    assert "spec.ports[0].nodePort: is already served (NodePort 30080/TCP by Service shop/good)" in problem


def test_a_conflict_is_logged_once_however_often_the_store_changes(caplog):
    store = Store()
    put(store, "good.yaml", service("good", created="2024-01-01T00:00:00Z"))
    with caplog.at_level(logging.ERROR):
        put(store, "bad.yaml", service("bad", created="2024-06-01T00:00:00Z"))
        for generation in range(3):  # unrelated changes, and the rivals' own endpoints
            put(store, "other.yaml", service("other", ip="10.96.0.30", port=80 + generation))
            put(store, "eps.yaml", endpoints("good", f"10.244.1.{generation + 1}"), endpoints("bad", "10.244.1.9"))
            store.snapshot()
    assert len([r for r in caplog.records if "shop/bad" in r.getMessage()]) == 1
    assert len(store.problems()["bad.yaml"]) == 1


def test_a_service_defined_twice_is_reported_against_the_ignored_file():
    store = Store()
    put(store, "a.yaml", service("good"))
    put(store, "b.yaml", service("good", port=81))
    assert store.snapshot().services[GOOD].service.ports[0].port == 81
    assert store.problems() == {"a.yaml": ["a.yaml: Service shop/good: metadata.name: is also defined in b.yaml, "
                                           "which is used; this one is ignored"]}
    store.replace("b.yaml", None)
    assert store.problems() == {}


def test_one_owner_at_10000_services_costs_no_quadratic_work():
    store = Store()
    objs = [service(f"s{i}", ip=f"10.96.{i // 250}.{i % 250 + 1}") for i in range(10_000)]
    objects, _ = parse_objects(objs, "all.yaml")
    assert len(store.replace("all.yaml", objects)) == 10_000
    assert store.problems() == {}


def test_ten_thousand_services_on_one_address_and_port_cost_no_quadratic_work():
    """A hostile folder: every Service claims the same ClusterIP:port, in the worst order for the
    winner (each newcomer older than the last). Deciding stays fast, and only the oldest serves."""
    import time
    from datetime import datetime, timedelta

    store = Store()
    started = time.perf_counter()
    for i in range(10_000):
        created = (datetime(2030, 1, 1) - timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        put(store, f"s{i}.yaml", service(f"s{i}", created=created))
    snapshot = store.snapshot()
    elapsed = time.perf_counter() - started
    served = [key for key, state in snapshot.services.items() if state.service.ports]
    assert served == [ServiceKey("shop", "s9999")]
    assert sum(len(p) for p in store.problems().values()) == 9_999
    assert elapsed < 20, f"{elapsed:.1f} s"
