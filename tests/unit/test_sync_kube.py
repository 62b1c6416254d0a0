"""The API source (dataplane/sync/kube.py) against the stand-in API server, through the real client library.

No root: the stand-in (dataplane/lab/kubeapi.py) listens on 127.0.0.1 of
this namespace; kubernetes_asyncio talks real HTTP to it.

Address plan
    Pods        10.244.1.11-13 (node1), 10.244.2.11 (node2)
    ClusterIPs  10.96.0.10 web, 10.96.0.11 db, 10.96.0.12-14 invalid or foreign ones
    node1       InternalIP 192.168.50.1, zone z1
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from dataplane.lab.kubeapi import KubeApi, kubeconfig, loopback_listener
from dataplane.lab.manifests import endpoint_slice, port, service
from dataplane.model import ServiceKey
from dataplane.model.endpoints import TRIGGER_TIME_ANNOTATION
from dataplane.sync.kube import API_CALLS, ApiSettings, Backoff, KubeSource, NodeInfo, RateLimiter, parse_node
from dataplane.sync.store import Store

WEB_PORTS = [port("http", 80)]
SLICE_PORTS = [("http", 8080, "TCP")]
WEB = ServiceKey("default", "web")
DB = ServiceKey("default", "db")

FAST = dict(backoff_first=0.2, backoff_cap=1.0, idle_timeout=5.0)


def node(name: str = "node1", ip: str = "192.168.50.1", zone: str = "z1") -> dict:
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}}


@pytest.fixture
def api():
    server = KubeApi(loopback_listener(), bookmark_interval=0.3).start()
    try:
        yield server
    finally:
        server.close()


def backends(store: Store) -> dict[str, list[str]]:
    """namespace/name -> sorted backend ip:port of every Service in the store."""
    return {
        f"{key.namespace}/{key.name}": sorted(f"{b.ip}:{b.port}" for port_backends in state.backends for b in port_backends)
        for key, state in store.snapshot().services.items()
    }


class Follower:
    """A KubeSource running on this test's loop; collects what watch() yields."""

    def __init__(self, api: KubeApi, node_name: str = "node1", **settings):
        self.store = Store()
        self.nodes: list[NodeInfo | None] = []
        options = {**FAST, **settings}
        options.setdefault("master", api.url)
        self.source = KubeSource(ApiSettings(**options), self.store, node_name, on_node=self.nodes.append)
        self.yielded: list[set[ServiceKey]] = []
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "Follower":
        self.task = asyncio.create_task(self._consume())
        return self

    async def _consume(self) -> None:
        async for changed in self.source.watch():
            self.yielded.append(changed)

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def synced(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.source.synced.wait(), timeout)


async def eventually(check, timeout: float = 5.0, what: str = "condition") -> float:
    """Polls `check()` until true; returns the seconds it took; fails the test after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def watch_requests(api: KubeApi, plural: str) -> list[dict]:
    return [q for _, path, q in api.requests if path.endswith(f"/{plural}") and q.get("watch") in ("1", "true", "True")]


def list_requests(api: KubeApi, plural: str) -> list[dict]:
    return [q for _, path, q in api.requests if path.endswith(f"/{plural}") and "watch" not in q]


def web_cluster(api: KubeApi, ips=("10.244.1.11", "10.244.1.12")) -> None:
    api.apply(service("web", "10.96.0.10", WEB_PORTS))
    api.apply(endpoint_slice("web", ips, SLICE_PORTS))


def run(coroutine):
    return asyncio.run(coroutine)


# ---- pure parts ------------------------------------------------------------------------------

@pytest.mark.parametrize("rand, delays", [
    (lambda: 0.0, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]),  # the longest: doubling, capped at 10 s
    (lambda: 1.0, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]),  # the shortest: half of it
])
def test_backoff_doubles_from_about_one_second_capped_at_ten(rand, delays):
    backoff = Backoff(1.0, 10.0, rand=rand)
    assert [backoff.next() for _ in delays] == delays
    backoff.reset()
    assert backoff.next() == delays[0]


@pytest.mark.parametrize("obj, expected", [
    (node(), NodeInfo("node1", (("InternalIP", "192.168.50.1"), ("Hostname", "node1")),
                      (("topology.kubernetes.io/zone", "z1"),))),
    ({"metadata": {"name": "n"}, "status": {"addresses": [{"type": "InternalIP"}, "junk"]}}, NodeInfo("n")),
    ({"metadata": "junk"}, NodeInfo("")),
])
def test_parse_node_keeps_what_is_well_formed(obj, expected):
    assert parse_node(obj) == expected


def test_node_info_primary_ip_and_zone():
    info = parse_node(node(ip="192.168.50.1"))
    assert (info.primary_ip, info.zone, info.ips) == ("192.168.50.1", "z1", ("192.168.50.1",))
    assert NodeInfo("n", (("Hostname", "n"),)).primary_ip is None


# ---- list, then watch --------------------------------------------------------------------------

def test_lists_then_follows_create_change_delete(api):
    web_cluster(api)

    async def scenario():
        async with Follower(api) as f:
            await f.synced()
            assert backends(f.store) == {"default/web": ["10.244.1.11:8080", "10.244.1.12:8080"]}
            api.apply(endpoint_slice("web", ["10.244.1.13"], SLICE_PORTS))
            await eventually(lambda: backends(f.store)["default/web"] == ["10.244.1.13:8080"], what="change")
            api.apply(service("db", "10.96.0.11", [port("pg", 5432)]))
            await eventually(lambda: "default/db" in backends(f.store), what="create")
            api.delete("Service", "default", "web")
            await eventually(lambda: "default/web" not in backends(f.store), what="delete")
            await eventually(lambda: {WEB, DB} <= set().union(*f.yielded), what="yielded")
        assert len(list_requests(api, "services")) == 1  # one list, then only watches
        watches = watch_requests(api, "services")
        assert watches and all(q.get("allowWatchBookmarks") in ("true", "True") for q in watches)

    run(scenario())


def test_nothing_is_yielded_or_synced_before_both_first_lists(api):
    api.stop()  # the API server is unreachable at start
    web_cluster(api)

    async def scenario():
        async with Follower(api) as f:
            await asyncio.sleep(1.0)
            assert not f.source.synced.is_set() and f.yielded == []
            assert backends(f.store) == {}
            api.start()
            await f.synced(timeout=5.0)  # retries every <= 1 s here (backoff_cap)
            assert backends(f.store) == {"default/web": ["10.244.1.11:8080", "10.244.1.12:8080"]}

    run(scenario())


def test_a_slice_before_its_service_is_kept_and_several_slices_merge(api):
    api.apply(endpoint_slice("web", ["10.244.1.11"], SLICE_PORTS, name="web-a"))

    async def scenario():
        async with Follower(api) as f:
            await f.synced()
            assert backends(f.store) == {}
            api.apply(endpoint_slice("web", ["10.244.2.11"], SLICE_PORTS, name="web-b", node="node2"))
            api.apply(service("web", "10.96.0.10", WEB_PORTS))
            await eventually(lambda: backends(f.store).get("default/web") == ["10.244.1.11:8080", "10.244.2.11:8080"],
                             what="merged slices")
            api.delete("EndpointSlice", "default", "web-a")
            await eventually(lambda: backends(f.store)["default/web"] == ["10.244.2.11:8080"], what="slice deleted")

    run(scenario())


def test_lists_in_pages(api):
    for i in range(5):
        api.apply(service(f"svc{i}", f"10.96.1.{i}", WEB_PORTS))

    async def scenario():
        async with Follower(api, page_size=2) as f:
            await f.synced()
            assert len(backends(f.store)) == 5
        pages = list_requests(api, "services")
        assert [q.get("limit") for q in pages] == ["2", "2", "2"]
        assert [bool(q.get("continue")) for q in pages] == [False, True, True]

    run(scenario())


# ---- kube-proxy's clientConnection: qps, burst, contentType --------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("qps, burst, gaps, waits", [
    (5, 10, [0] * 12, [0] * 10 + [0.2, 0.4]),  # kube-proxy's defaults: 10 at once, then one each 0.2 s
    (2, 1, [0, 0, 0], [0, 0.5, 1.0]),
    (2, 1, [0, 0.5, 0.5], [0, 0, 0]),  # a token comes back every 1/qps s
    (2, 3, [0, 10, 0, 0, 0], [0, 0, 0, 0, 0.5]),  # a quiet bucket refills to burst, not beyond
    (-1, 1, [0] * 5, [0] * 5),  # negative qps: no limit (client-go)
    (0, 0, [0] * 11, [0] * 10 + [0.2]),  # 0: client-go's defaults
])
def test_the_rate_limiter_is_client_gos_token_bucket(qps, burst, gaps, waits):
    clock = _Clock()
    limiter = RateLimiter(qps, burst, clock=clock)
    got = []
    for gap in gaps:
        clock.now += gap
        got.append(round(limiter.reserve(), 6))
    assert got == waits


def test_qps_and_burst_bound_the_requests_to_the_api_server(api):
    """Every list and watch open takes a token; with qps 4 and burst 1 the 3 lists and 3 watches of a
    start cannot all go within 1 s, with burst 10 they go at once."""
    web_cluster(api)
    api.apply(node())

    async def start_time(**settings) -> float:
        started = time.monotonic()
        async with Follower(api, **settings) as f:
            await f.synced()
            await eventually(lambda: len(watch_requests(api, "nodes")) >= 1, what="the Node watch")
        return time.monotonic() - started

    assert run(start_time(qps=4.0, burst=1)) >= 5 / 4 - 0.05  # the 6th request waits 5 tokens of 0.25 s
    api.requests.clear()
    assert run(start_time(qps=0.5, burst=10)) < 1.5  # without the burst, the 6 would take 10 s


def test_the_client_asks_for_json_whatever_the_content_type(api, caplog):
    web_cluster(api)

    async def scenario(content_type: str):
        async with Follower(api, content_type=content_type) as f:
            await f.synced()

    with caplog.at_level(logging.INFO):
        run(scenario("application/json"))
        assert "contentType" not in caplog.text
        run(scenario("application/vnd.kubernetes.protobuf"))  # kube-proxy's default
    assert "asks for and decodes application/json instead" in caplog.text
    assert api.accepts and set(api.accepts) == {"application/json"}


# ---- watch semantics ---------------------------------------------------------------------------

def test_a_cut_watch_resumes_from_the_last_version_and_a_change_is_live_within_3_s(api):
    web_cluster(api)

    async def scenario():
        async with Follower(api, backoff_first=1.0, backoff_cap=10.0) as f:
            await f.synced()
            await eventually(lambda: api.open_watches() == 3, what="watches open")
            version = f.source._reflectors[0].version
            api.cut()
            api.apply(service("db", "10.96.0.11", [port("pg", 5432)]))
            took = await eventually(lambda: "default/db" in backends(f.store), timeout=3.0, what="change after a cut")
            assert took < 3.0
            resumed = watch_requests(api, "services")[-1]
            assert int(resumed["resourceVersion"]) >= int(version)
        assert len(list_requests(api, "services")) == 1, "a cut watch must resume, not relist"

    run(scenario())


def test_a_watch_the_server_ends_is_reopened_at_once(api):
    web_cluster(api)

    async def scenario():
        async with Follower(api, backoff_first=5.0, backoff_cap=10.0) as f:
            await f.synced()
            await asyncio.sleep(1.0)  # past the guard against servers that end watches at once
            before = len(watch_requests(api, "services"))
            api.end_watches()
            await eventually(lambda: len(watch_requests(api, "services")) > before, timeout=0.5, what="reopened")
            api.apply(service("db", "10.96.0.11", [port("pg", 5432)]))
            await eventually(lambda: "default/db" in backends(f.store), timeout=1.0, what="change")

    run(scenario())


def test_bookmarks_move_the_version_a_watch_resumes_from(api):
    web_cluster(api)

    async def scenario():
        async with Follower(api) as f:
            await f.synced()
            api.apply(node("other-node"))  # moves the global version; the Services watch only gets bookmarks
            latest = api.resource_version
            await eventually(lambda: f.source._reflectors[0].version == str(latest), timeout=2.0, what="bookmark")
            assert f.source.seconds_since_heard() < 1.0
            api.cut()
            await eventually(lambda: watch_requests(api, "services")[-1].get("resourceVersion") == str(latest),
                             timeout=3.0, what="resumed from the bookmark")

    run(scenario())


def test_gone_in_the_stream_relists_and_the_relist_replaces_the_cache(api):
    web_cluster(api)
    api.apply(service("db", "10.96.0.11", [port("pg", 5432)]))
    api.apply(endpoint_slice("db", ["10.244.2.11"], [("pg", 5432, "TCP")]))

    async def scenario():
        async with Follower(api) as f:
            await f.synced()
            await eventually(lambda: api.open_watches() == 3, what="watches open")
            api.silence()  # what happens next never reaches the client as events
            api.delete("Service", "default", "db")
            api.apply(endpoint_slice("web", ["10.244.1.13"], SLICE_PORTS))
            api.expire()  # ERROR 410 to the open watches
            took = await eventually(
                lambda: backends(f.store) == {"default/web": ["10.244.1.13:8080"]}, timeout=10.0, what="relisted")
            assert took < 10.0
            assert f.source.metrics.relists.labels("Service")._value.get() >= 1

    run(scenario())


def test_a_slice_changed_behind_a_relist_still_carries_its_trigger_time(api):
    """kube-proxy's informer delivers what a relist finds changed as updates, trigger time included;
    an unchanged slice in the same list is no change and gives none."""
    web_cluster(api)
    api.apply(endpoint_slice("db", ["10.244.2.11"], [("pg", 5432, "TCP")]))
    triggered = []

    async def scenario():
        async with Follower(api) as f:
            f.source.on_endpoint_slice = triggered.append
            await f.synced()
            await eventually(lambda: api.open_watches() == 3, what="watches open")
            triggered.clear()  # the first list: every slice is new (TriggerTimes skips times before the start)
            api.silence()
            changed = endpoint_slice("web", ["10.244.1.13"], SLICE_PORTS)
            changed["metadata"]["annotations"] = {TRIGGER_TIME_ANNOTATION: "2026-12-02T10:00:00Z"}
            api.apply(changed)
            api.expire()  # the change reaches the client through the relist only
            await eventually(lambda: backends(f.store).get("default/web") == ["10.244.1.13:8080"], timeout=10.0,
                             what="relisted")

    run(scenario())
    # the changed web slice, once; not the unchanged db slice the relist also returned
    assert [t["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] for t in triggered] == ["2026-12-02T10:00:00Z"]


def test_gone_on_reconnect_after_an_api_server_restart_relists(api):
    web_cluster(api)
    api.apply(service("db", "10.96.0.11", [port("pg", 5432)]))

    async def scenario():
        async with Follower(api) as f:
            await f.synced()
            api.stop()
            api.delete("Service", "default", "db")
            api.expire()
            await asyncio.sleep(0.5)
            assert "default/db" in backends(f.store)  # while down: the last known state
            api.start()
            await eventually(lambda: "default/db" not in backends(f.store), timeout=10.0, what="relisted")
        assert len(list_requests(api, "services")) == 2

    run(scenario())


def test_a_silent_connection_is_abandoned_and_reopened(api):
    web_cluster(api)

    async def scenario():
        async with Follower(api, idle_timeout=1.0) as f:
            await f.synced()
            await eventually(lambda: api.open_watches() == 3, what="watches open")
            api.silence()
            api.apply(service("db", "10.96.0.11", [port("pg", 5432)]))
            took = await eventually(lambda: "default/db" in backends(f.store), timeout=4.0, what="reopened")
            assert took >= 0.9  # it came through a new connection, after the idle timeout

    run(scenario())


# ---- objects -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, ports, cluster_ip, field", [
    ("bad-port", [port("http", 70000)], "10.96.0.12", "port"),
    ("bad-ip", WEB_PORTS, "10.96.0.300", "clusterIP"),
    ("bad-protocol", [port("http", 80, protocol="BOGUS")], "10.96.0.14", "protocol"),
])
def test_objects_the_api_server_would_reject_are_logged_and_skipped(api, caplog, name, ports, cluster_ip, field):
    web_cluster(api)
    api.apply(service(name, cluster_ip, ports, namespace="team"))

    async def scenario():
        async with Follower(api) as f:
            await f.synced()
            assert set(backends(f.store)) == {"default/web"}
            assert list(f.source.errors) == [f"kube:Service:team/{name}"]
            api.apply(service(name, "10.96.0.15", WEB_PORTS, namespace="team"))  # fixed
            await eventually(lambda: f"team/{name}" in backends(f.store), what="fixed object served")
            assert f.source.errors == {}

    with caplog.at_level(logging.ERROR, logger="dataplane.sync.kube"):
        run(scenario())
    assert any(f"team/{name}" in r.getMessage() and field in r.getMessage() for r in caplog.records)


def test_services_of_another_proxy_are_skipped(api):
    web_cluster(api)
    foreign = service("other", "10.96.0.13", WEB_PORTS)
    foreign["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "someone-else"}
    api.apply(foreign)

    async def scenario():
        async with Follower(api) as f:
            await f.synced()
            assert set(backends(f.store)) == {"default/web"}
            api.apply(service("other", "10.96.0.13", WEB_PORTS))  # label removed: ours now
            await eventually(lambda: "default/other" in backends(f.store), what="adopted")

    run(scenario())


def test_the_own_node_object_is_followed_and_a_missing_one_is_a_warning(api, caplog):
    web_cluster(api)
    api.apply(node("node2", "192.168.50.9"))

    async def scenario():
        async with Follower(api, node_name="node1") as f:
            await f.synced()
            await eventually(lambda: f.source._reflectors[2].listed.is_set(), what="node listed")
            assert f.source.node is None
            api.apply(node("node1", "192.168.50.1", zone="z1"))
            await eventually(lambda: f.source.node is not None, what="node seen")
            assert (f.source.node.primary_ip, f.source.node.zone) == ("192.168.50.1", "z1")
            assert f.nodes[-1] == f.source.node
        node_watches = watch_requests(api, "nodes")
        assert node_watches and all(q["fieldSelector"] == "metadata.name=node1" for q in node_watches)

    with caplog.at_level(logging.WARNING, logger="dataplane.sync.kube"):
        run(scenario())
    assert any("Node node1 not found" in r.getMessage() for r in caplog.records)


# ---- configuration and the requests made -------------------------------------------------------

def test_a_kubeconfig_with_a_token_and_a_master_that_overrides_its_server(tmp_path):
    with KubeApi(loopback_listener(), token="s3cret") as api:
        web_cluster(api)
        good = tmp_path / "good.yaml"
        good.write_text(kubeconfig(api.url, token="s3cret"))
        elsewhere = tmp_path / "elsewhere.yaml"
        elsewhere.write_text(kubeconfig("http://127.0.0.1:1", token="s3cret"))

        async def synced_with(**settings) -> bool:
            async with Follower(api, **settings) as f:
                try:
                    await f.synced(timeout=2.0)
                except asyncio.TimeoutError:
                    return False
                return backends(f.store) == {"default/web": ["10.244.1.11:8080", "10.244.1.12:8080"]}

        assert run(synced_with(kubeconfig=str(good), master=""))
        assert run(synced_with(kubeconfig=str(elsewhere), master=api.url))
        assert not run(synced_with(kubeconfig="", master=api.url))  # no credentials: 401, retried


def test_a_kubeconfig_without_credentials_and_a_bad_one(tmp_path, api):
    web_cluster(api)
    plain = tmp_path / "plain.yaml"
    plain.write_text(kubeconfig(api.url))

    async def scenario():
        async with Follower(api, kubeconfig=str(plain), master="") as f:
            await f.synced()
        with pytest.raises(ValueError, match="kubeconfig"):
            await KubeSource(ApiSettings(kubeconfig=str(tmp_path / "missing.yaml")), Store(), "n").connect()

    run(scenario())


def test_every_request_is_a_list_or_watch_of_the_declared_resources(api):
    web_cluster(api)
    api.apply(node())
    allowed = {(r.path, verb) for r, verb in API_CALLS}

    async def scenario():
        async with Follower(api) as f:
            await f.synced()
            api.cut()
            api.expire()
            await asyncio.sleep(1.5)

    run(scenario())
    seen = {(path, "watch" if q.get("watch") else "list") for method, path, q in api.requests if method == "GET"}
    assert {method for method, _, _ in api.requests} == {"GET"}
    assert seen == allowed


@pytest.mark.parametrize("argv, expected", [
    (["run", "--source", "kube"], ApiSettings()),
    (["run", "--source", "kube", "--master", "http://10.0.0.1:8080"], ApiSettings(master="http://10.0.0.1:8080")),
    (["run", "--source", "kube", "--kubeconfig", "/k"], ApiSettings(kubeconfig="/k")),
    (["run", "--source", "/etc/m"], None),
])
def test_api_flags(argv, expected):
    from dataplane.cli import _parser, api_settings

    assert api_settings(_parser().parse_args(argv)) == expected


def test_api_flags_without_source_kube_are_an_error():
    from dataplane.cli import _parser, api_settings

    with pytest.raises(ValueError, match="--source kube"):
        api_settings(_parser().parse_args(["run", "--master", "http://x"]))


def test_the_defaults_meet_the_issues_deadlines():
    settings = ApiSettings()
    worst_first_retry = Backoff(settings.backoff_first, settings.backoff_cap, rand=lambda: 0.0).next()
    assert worst_first_retry <= 1.0  # a cut watch: first retry within about 1 s
    assert settings.backoff_cap <= 10.0  # live within 20 s of the API server coming back
    assert settings.idle_timeout + worst_first_retry < 60.0  # a silent connection reopened within 60 s


def test_the_manifest_daemon_does_not_pay_for_the_api_client():
    import subprocess
    import sys

    code = "import sys, dataplane.cli, dataplane.daemon.app; print('kubernetes_asyncio' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"  # about 40 MB of models, only for --source kube
