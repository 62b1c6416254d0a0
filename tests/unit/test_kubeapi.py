"""The stand-in API server (dataplane/lab/kubeapi.py) speaks the protocol as kube-apiserver does.

Plain HTTP from the standard library, no Kubernetes client: these are the
facts the API source's tests rely on.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from dataplane.lab.kubeapi import KubeApi, loopback_listener
from dataplane.lab.manifests import endpoint_slice, port, service


@pytest.fixture
def api():
    with KubeApi(loopback_listener(), bookmark_interval=0.2) as server:
        yield server


def get(api: KubeApi, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(api.url + path, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def stream(api: KubeApi, path: str) -> list[dict]:
    """Every event of a watch that the server ends (timeoutSeconds) or breaks off."""
    with urllib.request.urlopen(api.url + path, timeout=5) as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


def test_a_list_has_its_version_and_items_without_kind(api):
    api.apply(service("web", "10.96.0.10", [port("http", 80)], namespace="a"))
    api.apply(service("db", "10.96.0.11", [port("pg", 5432)], namespace="b"))
    status, body = get(api, "/api/v1/services")
    assert status == 200 and body["kind"] == "ServiceList"
    assert body["metadata"]["resourceVersion"] == str(api.resource_version)
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in body["items"]] == [("a", "web"), ("b", "db")]
    assert all("kind" not in item for item in body["items"])
    status, body = get(api, "/api/v1/namespaces/b/services")
    assert [i["metadata"]["name"] for i in body["items"]] == ["db"]


def test_pages_come_from_one_snapshot_and_an_expired_token_is_gone(api):
    for i in range(3):
        api.apply(service(f"s{i}", f"10.96.0.{i + 1}", [port("http", 80)]))
    _, first = get(api, "/api/v1/services?limit=2")
    api.apply(service("late", "10.96.0.9", [port("http", 80)]))
    _, second = get(api, f"/api/v1/services?limit=2&continue={first['metadata']['continue']}")
    assert [i["metadata"]["name"] for i in first["items"] + second["items"]] == ["s0", "s1", "s2"]
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    _, again = get(api, "/api/v1/services?limit=2")
    api.expire()
    status, body = get(api, f"/api/v1/services?limit=2&continue={again['metadata']['continue']}")
    assert (status, body["code"], body["reason"]) == (410, 410, "Expired")


def test_a_watch_sends_the_events_after_its_version_then_bookmarks(api):
    api.apply(service("web", "10.96.0.10", [port("http", 80)]))
    since = api.resource_version
    api.apply(endpoint_slice("web", ["10.244.1.11"], [("http", 80, "TCP")]))  # another kind: not in this watch
    api.apply(service("web", "10.96.0.10", [port("http", 81)]))
    api.delete("Service", "default", "web")
    events = stream(api, f"/api/v1/services?watch=true&resourceVersion={since}&allowWatchBookmarks=true"
                         f"&timeoutSeconds=1")
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["MODIFIED", "DELETED"] and set(kinds[2:]) == {"BOOKMARK"}
    assert events[1]["object"]["metadata"]["resourceVersion"] == str(api.resource_version)
    assert events[-1]["object"] == {"kind": "Service", "apiVersion": "v1",
                                    "metadata": {"resourceVersion": str(api.resource_version)}}


def test_a_watch_without_version_starts_with_the_current_objects(api):
    api.apply(service("web", "10.96.0.10", [port("http", 80)]))
    events = stream(api, "/api/v1/services?watch=1&timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "web")]


def test_a_watch_from_a_compacted_version_gets_an_error_event_410(api):
    api.apply(service("web", "10.96.0.10", [port("http", 80)]))
    old = api.resource_version - 1
    api.apply(service("db", "10.96.0.11", [port("pg", 5432)]))
    api.expire()
    events = stream(api, f"/api/v1/services?watch=1&resourceVersion={old}")
    assert [e["type"] for e in events] == ["ERROR"]
    assert events[0]["object"]["code"] == 410 and events[0]["object"]["kind"] == "Status"


def test_field_selectors_on_name_and_unsupported_fields(api):
    for name in ("node1", "node2"):
        api.apply({"kind": "Node", "metadata": {"name": name}})
    _, body = get(api, "/api/v1/nodes?fieldSelector=metadata.name%3Dnode2")
    assert [i["metadata"]["name"] for i in body["items"]] == ["node2"]
    status, _ = get(api, "/api/v1/nodes?fieldSelector=spec.unschedulable%3Dtrue")
    assert status == 400


def test_restart_keeps_objects_and_versions_and_cut_breaks_streams(api):
    api.apply(service("web", "10.96.0.10", [port("http", 80)]))
    version = api.resource_version
    api.restart()
    _, body = get(api, "/api/v1/services")
    assert body["metadata"]["resourceVersion"] == str(version) and len(body["items"]) == 1

    request = urllib.request.urlopen(api.url + f"/api/v1/services?watch=1&resourceVersion={version}", timeout=5)
    deadline = time.monotonic() + 2
    while api.open_watches() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.cut() == 1
    with pytest.raises(Exception):  # the chunked body ends without its last chunk
        request.read()
