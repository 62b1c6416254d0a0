"""The Kubernetes API source: list, then watch, Services, EndpointSlices and this node's Node.

This is the one module that talks to the API server, and it only reads: the
requests it makes are `API_CALLS` (list and watch on three resources), which
the RBAC rules in deploy/kubernetes/ grant and tests/unit/test_deploy.py checks.

Invariants
- The store holds what the last list and the events after it say. A relist
  (after `410 Gone`) replaces the cache: what the new list lacks is withdrawn.
- Each API object is an origin of its own ("kube:Service:ns/name"), so one
  event costs one object's parse and the rejoin of one Service, whatever the
  cluster's size.
- `synced` is not set, and `watch()` yields nothing, before the first lists
  of Services and EndpointSlices are in the store: a daemon that programmed a
  half-read cluster would drop the Services it adopted from its last run.
- A watch resumes from the last resourceVersion seen (an object's or a
  BOOKMARK's). A watch the server ends is reopened at once; an error is
  retried after a jittered backoff (the first within about 1 s, doubling, at
  most `backoff_cap`); a watch that stays silent for `idle_timeout` (not a
  byte: no event, no bookmark) is abandoned and reopened.
- Objects the API server would reject are logged with their namespace/name
  and skipped; everything else keeps being served.

Why kubernetes_asyncio: its generated calls carry every list/watch parameter
the protocol has (allowWatchBookmarks, timeoutSeconds, limit/continue,
fieldSelector), `_preload_content=False` hands back the raw response so
objects go straight to our own tolerant parsers (no model objects; a typed
decoder would fail a whole page on one odd object), aiohttp gives a per-read
timeout that detects dead watches, and its kubeconfig and in-cluster loaders
(token rotation included) are the official client's. lightkube is lighter
(about 7 MB of imports against 40) but its watch cannot ask for bookmarks.
We drive the watch loop ourselves rather than through its `Watch` helper,
which retries a 410 with the same stale version and reads lines with a
128 KiB limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.config.config_exception import ConfigException
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..model import ObjectSet, ServiceKey, parse_objects
from ..model.endpoints import TRIGGER_TIME_ANNOTATION
from .store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    group: str  # "" for the core group
    version: str
    plural: str

    @property
    def path(self) -> str:
        """The collection's URL path across all namespaces."""
        prefix = "/api/v1" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{prefix}/{self.plural}"


SERVICES = Resource("Service", "", "v1", "services")
ENDPOINT_SLICES = Resource("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices")
NODES = Resource("Node", "", "v1", "nodes")

# Every request this module makes. The ClusterRole grants these (plus `get`, read-only
# like them, as the issue asks) and nothing else.
API_CALLS: tuple[tuple[Resource, str], ...] = tuple(
    (resource, verb) for resource in (SERVICES, ENDPOINT_SLICES, NODES) for verb in ("list", "watch")
)

ZONE_LABEL = "topology.kubernetes.io/zone"
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"  # the cluster autoscaler's, as kube-proxy checks it
JSON = "application/json"  # the only content type asked for and decoded


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Where the API server is and how patiently to talk to it."""

    kubeconfig: str = ""  # a kubeconfig file; its user may carry no credentials
    master: str = ""  # overrides the kubeconfig's server; plain http:// allowed
    page_size: int = 500  # list in pages of this many objects (limit/continue)
    connect_timeout: float = 10.0
    idle_timeout: float = 50.0  # a watch silent this long is abandoned; the issue allows 60 s to reopen
    watch_seconds: tuple[int, int] = (300, 600)  # server-side timeoutSeconds, random in this range (client-go's)
    backoff_first: float = 1.0
    backoff_cap: float = 10.0
    # kube-proxy's clientConnection: the client-side rate limit of requests (qps < 0: none; 0: client-go's
    # defaults, 5 and 10), and the content type (JSON is what is asked for and decoded: see `api_client`).
    qps: float = 5.0
    burst: int = 10
    content_type: str = "application/vnd.kubernetes.protobuf"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What this node's Node object says: its addresses (by type) and labels."""

    name: str
    addresses: tuple[tuple[str, str], ...] = ()  # (type, address): InternalIP, ExternalIP, Hostname
    labels: tuple[tuple[str, str], ...] = ()
    deleting: bool = False  # metadata.deletionTimestamp is set
    taints: tuple[str, ...] = ()  # spec.taints' keys

    @property
    def eligible(self) -> bool:
        """kube-proxy's node eligibility: not being deleted, not marked ToBeDeletedByClusterAutoscaler."""
        return not self.deleting and TO_BE_DELETED_TAINT not in self.taints

    @property
    def ips(self) -> tuple[str, ...]:
        """InternalIP then ExternalIP addresses that are IPs."""
        found = []
        for wanted in ("InternalIP", "ExternalIP"):
            for kind, address in self.addresses:
                if kind == wanted and _is_ip(address) and address not in found:
                    found.append(address)
        return tuple(found)

    @property
    def primary_ip(self) -> str | None:
        """The node's primary address as Kubernetes sees it (kube-proxy's choice): the first InternalIP."""
        return self.ips[0] if self.ips else None

    @property
    def zone(self) -> str | None:
        return dict(self.labels).get(ZONE_LABEL)


def parse_node(obj: dict[str, Any]) -> NodeInfo:
    """A NodeInfo from a v1 Node object; malformed parts are left out, never raised."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    addresses = []
    for item in status.get("addresses") or ():
        if isinstance(item, dict) and isinstance(item.get("type"), str) and isinstance(item.get("address"), str):
            addresses.append((item["type"], item["address"]))
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    taints = [t["key"] for t in spec.get("taints") or () if isinstance(t, dict) and isinstance(t.get("key"), str)]
    return NodeInfo(
        str(meta.get("name") or ""),
        tuple(addresses),
        tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        deleting=bool(meta.get("deletionTimestamp")),
        taints=tuple(sorted(set(taints))),
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class ApiError(Exception):
    """An answer from the API server that is not what was asked for; `status` is the HTTP code (410: Gone)."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")

    @property
    def gone(self) -> bool:
        """The resourceVersion (or continue token) is too old: only a relist helps."""
        return self.status == 410

    @classmethod
    def from_status(cls, status: Any, http_status: int = 0) -> "ApiError":
        """From a metav1.Status object (an ERROR event's object, or an error body)."""
        if not isinstance(status, dict):
            return cls(http_status or 500, str(status)[:200])
        code = status.get("code") if isinstance(status.get("code"), int) else http_status or 500
        reason = status.get("reason") or ""
        message = status.get("message") or ""
        return cls(code, f"{reason}: {message}" if reason else str(message))


@dataclass
class RateLimiter:
    """client-go's client-side token bucket (flowcontrol.NewTokenBucketRateLimiter): `burst` requests
    at once, then `qps` a second, shared by every request of one client. Reservation-based, as
    golang.org/x/time/rate: a request takes a token now and waits until the bucket would have had it.
    qps < 0: no limit (as client-go); 0 and burst 0: client-go's defaults (5, 10)."""

    qps: float = 5.0
    burst: int = 10
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if self.qps == 0:
            self.qps = 5.0
        if self.burst <= 0:
            self.burst = 10
        self._tokens = float(self.burst)
        self._stamp: float | None = None

    def reserve(self) -> float:
        """Takes a token; returns the seconds to wait before the request may go (0: at once)."""
        if self.qps < 0:
            return 0.0
        now = self.clock()
        if self._stamp is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.qps)
        self._stamp = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    async def wait(self, what: str) -> None:
        delay = self.reserve()
        if delay >= 1.0:  # client-go logs long throttling too; it says which limit to raise
            log.info("%s: waiting %.1f s for client-side throttling (clientConnection.qps %g, burst %d)",
                     what, delay, self.qps, self.burst)
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass
class Backoff:
    """Jittered exponential backoff: delays in (d/2, d], d = first, 2*first, ... capped at `cap`."""

    first: float = 1.0
    cap: float = 10.0
    failures: int = 0
    rand: Callable[[], float] = field(default=random.random, repr=False)

    def next(self) -> float:
        ceiling = min(self.cap, self.first * 2 ** min(self.failures, 30))
        self.failures += 1
        return ceiling * (1.0 - 0.5 * self.rand())

    def reset(self) -> None:
        self.failures = 0


async def api_client(settings: ApiSettings) -> client.ApiClient:
    """A client for the configured API server; raises ValueError when no configuration can be loaded.

    `--kubeconfig`, then `--master` overriding its server; neither: in-cluster
    (service-account token, refreshed as the kubelet rotates it).
    """
    configuration = type.__call__(client.Configuration)  # a fresh one, not a copy of the global default
    try:
        if settings.kubeconfig:
            await config.load_kube_config(
                config_file=settings.kubeconfig, client_configuration=configuration, persist_config=False
            )
        elif not settings.master:
            config.load_incluster_config(client_configuration=configuration)
        elif settings.master.startswith("https://"):
            _service_account_credentials(configuration)
    except (ConfigException, OSError) as error:
        where = f"--kubeconfig {settings.kubeconfig}" if settings.kubeconfig else "in-cluster configuration"
        raise ValueError(f"{where}: {error} (give --kubeconfig or --master)") from None
    if settings.master:
        configuration.host = settings.master.rstrip("/")
    if settings.content_type.split(";")[0].strip() != JSON:
        # kube-proxy's default is protobuf; the client's generated calls always send `Accept:
        # application/json`, and no Python codec reads Kubernetes' protobuf envelope. The
        # requests are the same lists and watches either way.
        log.info("clientConnection.contentType %s: the API client asks for and decodes %s instead",
                 settings.content_type, JSON)
    return client.ApiClient(configuration)


SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def _service_account_credentials(configuration: client.Configuration, folder: str = SERVICE_ACCOUNT) -> None:
    """--master https://... without --kubeconfig: this Pod's service-account token and CA, when mounted
    (issue 12: the DaemonSet can then name the control plane instead of the `kubernetes` Service).
    Never sent to a plain http:// master."""
    loader = config.incluster_config.InClusterConfigLoader(
        token_filename=f"{folder}/token", cert_filename=f"{folder}/ca.crt",
        environ={"KUBERNETES_SERVICE_HOST": "unused", "KUBERNETES_SERVICE_PORT": "443"})
    try:
        loader.load_and_set(configuration)
    except ConfigException:
        log.info("--master without --kubeconfig and no service account mounted: no credentials")


class _Api:
    """The three collections' list and watch calls, raw: bodies are parsed here, not by the client's models."""

    def __init__(self, api: client.ApiClient, settings: ApiSettings):
        core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
        self._calls = {
            SERVICES: core.list_service_for_all_namespaces,
            ENDPOINT_SLICES: discovery.list_endpoint_slice_for_all_namespaces,
            NODES: core.list_node,
        }
        self.settings = settings
        self.limiter = RateLimiter(settings.qps, settings.burst)

    async def list_page(self, resource: Resource, field_selector: str, token: str, limit: int | None) -> dict:
        """One page of a list; raises ApiError for an error answer.

        A list takes one token of the rate limit however many pages it has: kube-proxy's informers
        list once, unpaged, from the watch cache (resourceVersion 0), so the same qps admits the
        same lists here."""
        if not token:
            await self.limiter.wait(f"{resource.kind} list")
        kwargs: dict[str, Any] = {
            "_preload_content": False,
            "_request_timeout": (self.settings.connect_timeout, max(60.0, self.settings.idle_timeout)),
        }
        if limit:
            kwargs["limit"] = limit
        if token:
            kwargs["_continue"] = token
        if field_selector:
            kwargs["field_selector"] = field_selector
        response = await self._calls[resource](**kwargs)
        try:
            body = await response.read()
        finally:
            response.release()
        if response.status != 200:
            raise _error(response.status, body)
        page = json.loads(body)
        if not isinstance(page, dict):
            raise ApiError(500, f"{resource.kind} list is not an object")
        return page

    async def watch(self, resource: Resource, field_selector: str, version: str) -> aiohttp.ClientResponse:
        """An open watch stream from `version`; raises ApiError when the server refuses it."""
        await self.limiter.wait(f"{resource.kind} watch")
        kwargs: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "resource_version": version,
            "timeout_seconds": random.randint(*self.settings.watch_seconds),
            "_preload_content": False,
            # sock_read: no byte for idle_timeout s (not even a bookmark) -> TimeoutError.
            "_request_timeout": (self.settings.connect_timeout, self.settings.idle_timeout),
        }
        if field_selector:
            kwargs["field_selector"] = field_selector
        response = await self._calls[resource](**kwargs)
        if response.status != 200:
            try:
                body = await response.read()
            finally:
                response.release()
            raise _error(response.status, body)
        return response


def _error(status: int, body: bytes) -> ApiError:
    try:
        return ApiError.from_status(json.loads(body), status)
    except ValueError:
        return ApiError(status, body[:200].decode("utf-8", "replace"))


async def _lines(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The stream's lines as they arrive; any length (aiohttp's readline caps lines at 128 KiB)."""
    buffer = bytearray()
    async for chunk in response.content.iter_any():
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            if end > start:
                yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
    if buffer.strip():
        yield bytes(buffer)


_RETRIED = (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)


class _Reflector:
    """Lists then watches one resource, forever, feeding a handler; never dies of an error."""

    def __init__(self, api: _Api, resource: Resource, handler: "_Handler", source: "KubeSource",
                 field_selector: str = ""):
        self.api = api
        self.resource = resource
        self.handler = handler
        self.source = source
        self.field_selector = field_selector
        self.version = ""  # the last resourceVersion seen
        self.listed = asyncio.Event()  # the first list is in the store
        self.backoff = Backoff(source.settings.backoff_first, source.settings.backoff_cap)
        self.phase = "list"  # what is being tried, for the log

    async def run(self) -> None:
        must_list = True
        kind = self.resource.kind
        while True:
            try:
                if must_list:
                    self.phase = "list"
                    await self._list()
                    must_list = False
                self.phase = "watch"
                await self._watch()
            except ApiError as error:
                if error.gone:
                    log.info("%s watch: %s; relisting", kind, error)
                    self.source.metrics.relists.labels(kind).inc()
                    must_list = True
                    continue
                await self._retry(error)
            except asyncio.CancelledError:
                raise
            except _RETRIED as error:
                await self._retry(error)
            except Exception as error:  # a bug must not stop the source: keep serving the last state
                log.exception("%s watch: unexpected error", kind)
                await self._retry(error)

    async def _retry(self, error: BaseException) -> None:
        delay = self.backoff.next()
        self.source.metrics.errors.labels(self.resource.kind).inc()
        what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        log.warning("%s %s: %s; retrying in %.1f s", self.resource.kind, self.phase, what, delay)
        await asyncio.sleep(delay)

    async def _list(self) -> None:
        entries: list[tuple[str, str, Any]] = []
        token, limit = "", self.source.settings.page_size
        while True:
            try:
                page = await self.api.list_page(self.resource, self.field_selector, token, limit)
            except ApiError as error:
                if not (error.gone and token):
                    raise
                log.info("%s list: continue token expired; listing again in one page", self.resource.kind)
                entries, token, limit = [], "", None
                continue
            for obj in page.get("items") or ():
                if isinstance(obj, dict):
                    entries.append(self.handler.prepare(obj))
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                break
            await asyncio.sleep(0)  # keep probes answered while a large list arrives
        self.handler.replace_all(entries)
        self.version = str(meta.get("resourceVersion") or "")
        self.source.heard()
        self.backoff.reset()
        log.info("%s list: %d objects at resourceVersion %s", self.resource.kind, len(entries), self.version)
        self.listed.set()
        self.source.listed()

    async def _watch(self) -> None:
        opened = time.monotonic()
        response = await self.api.watch(self.resource, self.field_selector, self.version)
        self.backoff.reset()
        events = 0
        try:
            async for line in _lines(response):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object")
                self.source.heard()
                if kind == "ERROR":
                    raise ApiError.from_status(obj)
                if not isinstance(obj, dict):
                    raise ValueError(f"{kind} event without an object")
                self.source.metrics.events.labels(self.resource.kind, str(kind)).inc()
                if kind in ("ADDED", "MODIFIED"):
                    self.handler.upsert(obj)
                elif kind == "DELETED":
                    self.handler.delete(obj)
                elif kind != "BOOKMARK":
                    log.warning("%s watch: ignoring event of type %r", self.resource.kind, kind)
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self.version = str(version)
                events += 1
        finally:
            response.close()
        if events == 0 and time.monotonic() - opened < 1.0:
            # A server (or proxy) that ends every watch at once would otherwise be hammered.
            raise ApiError(500, "watch ended at once without an event")
        log.debug("%s watch ended by the server after %d events; reopening", self.resource.kind, events)


class _Handler:
    """Turns one resource's objects into store updates."""

    def prepare(self, obj: dict) -> tuple[str, str, Any]:
        raise NotImplementedError

    def replace_all(self, entries: list[tuple[str, str, Any]]) -> None:
        raise NotImplementedError

    def upsert(self, obj: dict) -> None:
        raise NotImplementedError

    def delete(self, obj: dict) -> None:
        raise NotImplementedError


_UNCHANGED = object()  # a listed object whose resourceVersion we already hold


class _ObjectHandler(_Handler):
    """Services and EndpointSlices: each object one origin in the store."""

    def __init__(self, resource: Resource, source: "KubeSource"):
        self.resource = resource
        self.source = source
        self.versions: dict[str, str] = {}  # origin -> resourceVersion in the store

    def _identify(self, obj: dict) -> tuple[str, str]:
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        origin = f"kube:{self.resource.kind}:{meta.get('namespace') or ''}/{meta.get('name') or ''}"
        return origin, str(meta.get("resourceVersion") or "")

    def _parse(self, origin: str, obj: dict) -> ObjectSet:
        obj.setdefault("kind", self.resource.kind)  # a list's items carry no kind
        objects, problems = parse_objects([obj], "the API server")
        # The one error path (Store.report): logged once per change, counted in dataplane_invalid_objects.
        self.source.store.report(origin, problems or None)
        return objects

    def prepare(self, obj: dict) -> tuple[str, str, Any]:
        origin, version = self._identify(obj)
        if version and self.versions.get(origin) == version:
            return origin, version, _UNCHANGED
        # A changed EndpointSlice in a list (a relist after 410 Gone) is a change as a watch event is;
        # kube-proxy's informer delivers it as an update, trigger time included. Only what the hook
        # reads is kept until the list is in the store.
        trigger = _trigger_part(obj) if self.resource is ENDPOINT_SLICES else None
        return origin, version, (self._parse(origin, obj), trigger)

    def replace_all(self, entries: list[tuple[str, str, Any]]) -> None:
        listed = {origin for origin, _, _ in entries}
        for origin in [o for o in self.versions if o not in listed]:
            self._withdraw(origin)
        for origin, version, prepared in entries:
            if prepared is not _UNCHANGED:
                objects, trigger = prepared
                self.versions[origin] = version
                self.source.changed(self.source.store.replace(origin, objects))
                if trigger is not None:
                    self._triggered(trigger)

    def upsert(self, obj: dict) -> None:
        origin, version = self._identify(obj)
        self.versions[origin] = version
        self.source.changed(self.source.store.replace(origin, self._parse(origin, obj)))
        if self.resource is ENDPOINT_SLICES:
            self._triggered(obj)

    def _triggered(self, endpoint_slice: dict) -> None:
        if self.source.on_endpoint_slice is not None:
            self.source.on_endpoint_slice(endpoint_slice)  # its last-change-trigger-time (network programming)

    def delete(self, obj: dict) -> None:
        self._withdraw(self._identify(obj)[0])

    def _withdraw(self, origin: str) -> None:
        self.versions.pop(origin, None)
        self.source.store.report(origin, None)
        self.source.changed(self.source.store.replace(origin, None))


def _trigger_part(endpoint_slice: dict) -> dict:
    """The parts of an EndpointSlice the trigger-time hook reads: the annotation and addressType."""
    meta = endpoint_slice.get("metadata") if isinstance(endpoint_slice.get("metadata"), dict) else {}
    annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
    return {"metadata": {"annotations": {TRIGGER_TIME_ANNOTATION: annotations.get(TRIGGER_TIME_ANNOTATION)}},
            "addressType": endpoint_slice.get("addressType")}


class _NodeHandler(_Handler):
    """This node's Node object (the watch selects it by name)."""

    def __init__(self, source: "KubeSource"):
        self.source = source

    def prepare(self, obj: dict) -> tuple[str, str, Any]:
        return "", "", parse_node(obj)

    def replace_all(self, entries: list[tuple[str, str, Any]]) -> None:
        nodes = [node for _, _, node in entries if node.name == self.source.node_name]
        if not nodes:
            log.warning("Node %s not found in the API: no node addresses or topology labels from it "
                        "(is --hostname-override right?)", self.source.node_name)
        self.source.set_node(nodes[0] if nodes else None)

    def upsert(self, obj: dict) -> None:
        node = parse_node(obj)
        if node.name == self.source.node_name:
            self.source.set_node(node)

    def delete(self, obj: dict) -> None:
        if parse_node(obj).name == self.source.node_name:
            log.warning("Node %s was deleted from the API", self.source.node_name)
            self.source.set_node(None)


class KubeMetrics:
    def __init__(self, registry: CollectorRegistry | None, since_heard: Callable[[], float]):
        registry = registry if registry is not None else CollectorRegistry()
        self.since_heard = Gauge(
            "dataplane_api_seconds_since_last_event",
            "Seconds since the API server last sent anything: a list, an event or a bookmark (-1: never)",
            registry=registry)
        self.since_heard.set_function(since_heard)
        self.events = Counter("dataplane_api_watch_events_total", "Watch events received",
                              ["resource", "type"], registry=registry)
        self.relists = Counter("dataplane_api_relists_total", "Relists after 410 Gone", ["resource"],
                               registry=registry)
        self.errors = Counter("dataplane_api_errors_total", "Failed lists and watches (each retried)",
                              ["resource"], registry=registry)


class KubeSource:
    """Feeds a Store from the Kubernetes API; the daemon's counterpart of ManifestSource.

    `connect()` once (raises ValueError for a configuration that does not
    load), then `async for changed in watch()`: it runs the list-watch loops
    and yields the Services changed by each batch of events, from the moment
    `synced` is set on. `node` is this node's Node, or None while unknown;
    `on_node` is called whenever it changes.
    """

    def __init__(self, settings: ApiSettings, store: Store, node_name: str,
                 registry: CollectorRegistry | None = None, on_node: Callable[[NodeInfo | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.store = store
        self.node_name = node_name
        self.node: NodeInfo | None = None
        self.on_node = on_node
        self.on_endpoint_slice: Callable[[dict], None] | None = None  # each EndpointSlice event, raw
        self.synced = asyncio.Event()
        self._clock = clock
        self._last_heard: float | None = None
        self._pending: set[ServiceKey] = set()
        self._wake = asyncio.Event()
        self._client: client.ApiClient | None = None
        self._reflectors: list[_Reflector] = []
        self.metrics = KubeMetrics(registry, self.seconds_since_heard)

    @property
    def errors(self) -> dict[str, list[str]]:
        """Origin -> why its object was skipped or partly ignored (the store's conflicts included)."""
        return self.store.problems()

    async def connect(self) -> None:
        """Loads the client configuration; raises ValueError when it cannot be loaded. Does no request."""
        if self._client is None:
            self._client = await api_client(self.settings)

    def seconds_since_heard(self) -> float:
        return -1.0 if self._last_heard is None else self._clock() - self._last_heard

    def heard(self) -> None:
        self._last_heard = self._clock()

    def changed(self, keys: set[ServiceKey]) -> None:
        if keys:
            self._pending |= keys
            self._wake.set()

    def listed(self) -> None:
        # The Node does not gate: a missing Node (or no RBAC for it) must not keep Services unprogrammed.
        required = [r for r in self._reflectors if r.resource in (SERVICES, ENDPOINT_SLICES)]
        if not self.synced.is_set() and all(r.listed.is_set() for r in required):
            self.synced.set()
            self._wake.set()

    def set_node(self, node: NodeInfo | None) -> None:
        if node == self.node:
            return
        self.node = node
        if node is not None:
            log.info("Node %s: addresses %s, zone %s%s", node.name,
                     ", ".join(f"{t}={a}" for t, a in node.addresses) or "none", node.zone or "none",
                     "" if node.eligible else " (being deleted or marked ToBeDeletedByClusterAutoscaler)")
        if self.on_node is not None:
            self.on_node(node)

    async def watch(self) -> AsyncIterator[set[ServiceKey]]:
        """Runs the list-watch loops; yields changed Services, forever, once `synced`."""
        await self.connect()
        api = _Api(self._client, self.settings)
        self._reflectors = [
            _Reflector(api, SERVICES, _ObjectHandler(SERVICES, self), self),
            _Reflector(api, ENDPOINT_SLICES, _ObjectHandler(ENDPOINT_SLICES, self), self),
            _Reflector(api, NODES, _NodeHandler(self), self, field_selector=f"metadata.name={self.node_name}"),
        ]
        tasks = [asyncio.create_task(r.run(), name=f"watch-{r.resource.plural}") for r in self._reflectors]
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self.synced.is_set() and self._pending:
                    changed, self._pending = self._pending, set()
                    yield changed
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    async def close(self) -> None:
        if self._client is not None:
            api, self._client = self._client, None
            await api.close()
