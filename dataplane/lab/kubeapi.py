"""A small stand-in for kube-apiserver, for tests and benchmarks (not part of the product).

It speaks the Kubernetes REST protocol for the collections the data plane
reads, v1 Services, discovery.k8s.io/v1 EndpointSlices and v1 Nodes, as the
real server does:
- list (all namespaces, one namespace, or one object) with
  `metadata.resourceVersion`, `limit`/`continue` pages from one consistent
  snapshot, `fieldSelector` on metadata.name / metadata.namespace; list items
  carry no kind, as in a real List;
- `?watch=1` chunked streams of JSON lines: synthetic ADDED for every object
  when no resourceVersion is given, else exactly the events after it;
  BOOKMARK every `bookmark_interval` s when `allowWatchBookmarks`; an ERROR
  event with a 410 Status when the version is older than the compaction
  point; the stream ends normally after `timeoutSeconds`;
- POST, PUT and DELETE, so a test changes the cluster as kubectl would; no
  validation, so a test can store objects a real server would refuse.

Test controls (thread-safe methods): `apply`/`delete` change objects;
`cut()` aborts every open watch connection mid-stream; `end_watches()` ends
them normally; `silence()` makes the open watches go quiet (no byte, no
bookmark: a dead connection); `expire()` compacts the history (older
versions get 410 Gone) and sends open watches the ERROR 410 event;
`stop()`/`start()` take the server down and up again, keeping the objects
and the version counter, as etcd would; `requests` records every request
(`accepts`, its Accept header).

Invariants: resourceVersions come from one counter over all kinds (etcd's
revision) and only grow; a watch from version V sees, in order, every event
of its kind after V and then the live ones. Everything runs on the server's
own event loop in a thread; the public methods hand work to it.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Kind:
    kind: str
    api_version: str
    prefix: str  # "/api/v1" or "/apis/<group>/<version>"
    plural: str
    namespaced: bool


KINDS = {
    k.kind: k
    for k in (
        Kind("Service", "v1", "/api/v1", "services", True),
        Kind("EndpointSlice", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1", "endpointslices", True),
        Kind("Node", "v1", "/api/v1", "nodes", False),
    )
}


def status(code: int, reason: str, message: str) -> Obj:
    """A metav1.Status, the body of every error answer."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclass(eq=False)
class _Watch:
    kind: Kind
    selector: Callable[[Obj], bool]
    response: web.StreamResponse
    transport: asyncio.Transport | None
    wake: asyncio.Event
    silent: bool = False
    ending: str = ""  # "", "end", "expire"


class KubeApi:
    """The stand-in server. `KubeApi(listen).start()`; `listen()` returns a bound socket (called at each start)."""

    def __init__(self, listen: Callable[[], socket.socket], bookmark_interval: float = 1.0, token: str = ""):
        self.listen = listen
        self.bookmark_interval = bookmark_interval
        self.token = token  # when set, requests need "Authorization: Bearer <token>"
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query)
        self.accepts: list[str] = []  # each request's Accept header, in the order of `requests`
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {kind: {} for kind in KINDS}
        self._log: list[tuple[int, str, str, Obj]] = []  # (version, kind, event type, object)
        self._version = 100
        self._compacted = 0  # versions at or below this are gone
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}  # continue token -> (version, rest)
        self._watches: set[_Watch] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kubeapi", daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "KubeApi":
        """Starts serving on a fresh socket from `listen()`; returns self."""
        self._call(self._start())
        return self

    def stop(self) -> None:
        """Stops serving: closes the listener, aborts every connection. Objects and versions stay."""
        self._call(self._stop())

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stops the server and its thread. Idempotent."""
        if self._thread.is_alive():
            self.stop()
            self._call(self._cancel_tasks())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> "KubeApi":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    # ---- the cluster -----------------------------------------------------------------------

    def apply(self, obj: Obj) -> Obj:
        """Creates or replaces an object (kind from obj["kind"]); returns it as stored, with its new version."""
        return self._call(self._apply(copy.deepcopy(obj)))

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Deletes an object; False when there was none."""
        return self._call(self._delete(kind, namespace if KINDS[kind].namespaced else "", name))

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return copy.deepcopy(self._objects[kind].get((namespace if KINDS[kind].namespaced else "", name)))

    @property
    def resource_version(self) -> int:
        return self._version

    # ---- faults ----------------------------------------------------------------------------

    def cut(self) -> int:
        """Aborts every open watch connection mid-stream (no final chunk); returns how many."""
        return self._call(self._each_watch(lambda w: w.transport and w.transport.abort()))

    def end_watches(self) -> int:
        """Ends every open watch normally, as at timeoutSeconds; returns how many."""
        return self._call(self._each_watch(lambda w: setattr(w, "ending", "end")))

    def silence(self) -> int:
        """Open watches go quiet for good (no event, no bookmark, connection kept): a dead peer."""
        return self._call(self._each_watch(lambda w: setattr(w, "silent", True)))

    def expire(self) -> int:
        """Compacts the history: every version so far is too old (410). Open watches get ERROR 410 and end."""
        return self._call(self._expire())

    def open_watches(self) -> int:
        return len(self._watches)

    # ---- internals: all on the server's loop -----------------------------------------------

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    async def _start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        sock = self.listen()
        await web.SockSite(runner, sock).start()
        self.address = sock.getsockname()[:2]
        self._runner = runner

    async def _stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for watch in list(self._watches):
            if watch.transport is not None:
                watch.transport.abort()
        await runner.cleanup()

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _each_watch(self, action) -> int:
        for watch in list(self._watches):
            action(watch)
            watch.wake.set()
        return len(self._watches)

    async def _expire(self) -> int:
        self._compacted = self._version
        self._log.clear()
        self._snapshots.clear()
        return await self._each_watch(lambda w: setattr(w, "ending", "expire"))

    def _record(self, kind: str, event: str, obj: Obj) -> None:
        self._log.append((self._version, kind, event, obj))
        for watch in self._watches:
            watch.wake.set()

    async def _apply(self, obj: Obj) -> Obj:
        kind = KINDS[obj["kind"]]
        obj["apiVersion"] = kind.api_version
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (meta.get("namespace", ""), meta["name"])
        old = self._objects[kind.kind].get(key)
        self._version += 1
        meta["resourceVersion"] = str(self._version)
        meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._objects[kind.kind][key] = obj
        self._record(kind.kind, "MODIFIED" if old else "ADDED", obj)
        return copy.deepcopy(obj)

    async def _delete(self, kind: str, namespace: str, name: str) -> bool:
        old = self._objects[kind].pop((namespace, name), None)
        if old is None:
            return False
        self._version += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._version)  # a DELETED event carries the deletion's version
        self._record(kind, "DELETED", gone)
        return True

    # ---- HTTP ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.method, request.path, query))
        self.accepts.append(request.headers.get("Accept", ""))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return _json(401, status(401, "Unauthorized", "Unauthorized"))
        route = _route(request.path)
        if route is None:
            return _json(404, status(404, "NotFound", f"the server could not find the requested resource {request.path}"))
        kind, namespace, name = route
        if request.method == "GET":
            if _bool(query.get("watch", "")):
                return await self._watch(request, kind, namespace, name, query)
            if name:
                obj = self._objects[kind.kind].get((namespace, name))
                if obj is None:
                    return _json(404, status(404, "NotFound", f'{kind.plural} "{name}" not found'))
                return _json(200, obj)
            return self._list(kind, namespace, query)
        if request.method in ("POST", "PUT"):
            try:
                obj = await request.json()
            except ValueError:
                return _json(400, status(400, "BadRequest", "the body is not JSON"))
            obj["kind"] = kind.kind
            meta = obj.setdefault("metadata", {})
            if namespace:
                meta["namespace"] = namespace
            exists = (meta.get("namespace", ""), meta.get("name")) in self._objects[kind.kind]
            if request.method == "POST" and exists:
                return _json(409, status(409, "AlreadyExists", f'{kind.plural} "{meta.get("name")}" already exists'))
            if request.method == "PUT" and not exists:
                return _json(404, status(404, "NotFound", f'{kind.plural} "{name}" not found'))
            return _json(201 if request.method == "POST" else 200, await self._apply(obj))
        if request.method == "DELETE" and name:
            if not await self._delete(kind.kind, namespace, name):
                return _json(404, status(404, "NotFound", f'{kind.plural} "{name}" not found'))
            return _json(200, status(200, "", "") | {"status": "Success"})
        return _json(405, status(405, "MethodNotAllowed", f"{request.method} is not supported here"))

    def _list(self, kind: Kind, namespace: str, query: dict[str, str]) -> web.Response:
        token = query.get("continue", "")
        if token:
            snapshot = self._snapshots.pop(token, None)
            if snapshot is None or snapshot[0] <= self._compacted:
                return _json(410, status(410, "Expired", "The provided continue parameter is too old to display a "
                                         "consistent list result. You can start a new list without the continue "
                                         "parameter."))
            version, items = snapshot
        else:
            try:
                selector = _field_selector(query.get("fieldSelector", ""), namespace)
            except ValueError as error:
                return _json(400, status(400, "BadRequest", str(error)))
            version = self._version
            items = [_list_item(o) for _, o in sorted(self._objects[kind.kind].items()) if selector(o)]
        limit = int(query.get("limit") or 0)
        meta: Obj = {"resourceVersion": str(version)}
        if limit and len(items) > limit:
            items, rest = items[:limit], items[limit:]
            next_token = base64.urlsafe_b64encode(json.dumps({"rv": version, "id": uuid.uuid4().hex}).encode()).decode()
            self._snapshots[next_token] = (version, rest)
            meta["continue"] = next_token
            meta["remainingItemCount"] = len(rest)
        return _json(200, {"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": meta,
                           "items": items})

    async def _watch(self, request: web.Request, kind: Kind, namespace: str, name: str,
                     query: dict[str, str]) -> web.StreamResponse:
        try:
            selector = _field_selector(query.get("fieldSelector", ""), namespace, name)
        except ValueError as error:
            return _json(400, status(400, "BadRequest", str(error)))
        since = query.get("resourceVersion", "")
        bookmarks = _bool(query.get("allowWatchBookmarks", ""))
        timeout = float(query.get("timeoutSeconds") or 1800)
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Transfer-Encoding": "chunked"})
        await response.prepare(request)
        watch = _Watch(kind, selector, response, request.transport, asyncio.Event())
        self._watches.add(watch)
        try:
            if since in ("", "0"):
                cursor = self._version
                for _, obj in sorted(self._objects[kind.kind].items()):
                    if selector(obj):
                        await _send(response, "ADDED", obj)
            else:
                cursor = int(since)
                if cursor < self._compacted:
                    await _send(response, "ERROR", status(
                        410, "Expired", f"too old resource version: {cursor} ({self._compacted})"))
                    await response.write_eof()
                    return response
            deadline = time.monotonic() + timeout
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                watch.wake.clear()  # before looking: what is recorded while we send wakes the next round
                if watch.ending == "expire":
                    await _send(response, "ERROR", status(
                        410, "Expired", f"too old resource version: {cursor} ({self._compacted})"))
                    break
                if watch.ending == "end":
                    break
                if request.transport is None or request.transport.is_closing():
                    break  # the client went away
                if not watch.silent:
                    upto = self._version  # sending yields: later events wait for the next round
                    start = bisect.bisect_right(self._log, cursor, key=lambda entry: entry[0])
                    for version, event_kind, event, obj in self._log[start:]:
                        if version > upto:
                            break
                        if event_kind == kind.kind and selector(obj):
                            await _send(response, event, obj)
                    cursor = max(cursor, upto)
                now = time.monotonic()
                if now >= deadline:
                    if bookmarks and not watch.silent:
                        await _send(response, "BOOKMARK", _bookmark(kind, cursor))
                    break
                if bookmarks and not watch.silent and now >= next_bookmark:
                    await _send(response, "BOOKMARK", _bookmark(kind, cursor))
                    next_bookmark = now + self.bookmark_interval
                wait = min(deadline - now, 1.0)  # at least once a second: has the client gone?
                if bookmarks:
                    wait = min(wait, max(0.0, next_bookmark - now))
                try:
                    await asyncio.wait_for(watch.wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the connection was cut (by a test, or by the client)
        finally:
            self._watches.discard(watch)
        return response


def _bool(text: str) -> bool:
    """Go's strconv.ParseBool, as the API server parses query flags (clients send "true" or "True")."""
    return text in ("1", "t", "T", "TRUE", "true", "True")


def _send_line(event: str, obj: Obj) -> bytes:
    return json.dumps({"type": event, "object": obj}, separators=(",", ":")).encode() + b"\n"


async def _send(response: web.StreamResponse, event: str, obj: Obj) -> None:
    await response.write(_send_line(event, obj))


def _bookmark(kind: Kind, version: int) -> Obj:
    return {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": {"resourceVersion": str(version)}}


def _list_item(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _json(code: int, body: Obj) -> web.Response:
    return web.Response(status=code, body=json.dumps(body).encode(), content_type="application/json")


def _route(path: str) -> tuple[Kind, str, str] | None:
    """(kind, namespace, name) for a collection or object path; None when it is not one we serve."""
    for kind in KINDS.values():
        if not path.startswith(kind.prefix + "/"):
            continue
        parts = path[len(kind.prefix) + 1:].strip("/").split("/")
        namespace = ""
        if kind.namespaced and len(parts) >= 3 and parts[0] == "namespaces":
            namespace, parts = parts[1], parts[2:]
        if parts and parts[0] == kind.plural and len(parts) <= 2:
            return kind, namespace, parts[1] if len(parts) == 2 else ""
    return None


def _field_selector(text: str, namespace: str = "", name: str = "") -> Callable[[Obj], bool]:
    """metadata.name / metadata.namespace, `=`, `==` or `!=`, comma-separated; raises ValueError otherwise."""
    tests: list[tuple[str, bool, str]] = []
    if namespace:
        tests.append(("namespace", True, namespace))
    if name:
        tests.append(("name", True, name))
    for term in filter(None, (t.strip() for t in text.split(","))):
        for op, equal in (("!=", False), ("==", True), ("=", True)):
            if op in term:
                field, value = term.split(op, 1)
                break
        else:
            raise ValueError(f"invalid field selector {term!r}")
        if field not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f'field label not supported: {field}')
        tests.append((field.split(".")[1], equal, value))

    def matches(obj: Obj) -> bool:
        meta = obj.get("metadata", {})
        return all((meta.get(f, "") == v) == equal for f, equal, v in tests)

    return matches


def loopback_listener(port: int = 0) -> Callable[[], socket.socket]:
    """A `listen` for KubeApi on 127.0.0.1 of this namespace; restarts reuse the first port picked."""
    chosen = [port]

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", chosen[0]))
        chosen[0] = sock.getsockname()[1]
        sock.listen(128)
        return sock

    return listen


def netns_listener(ns, port: int = 6443, host: str = "127.0.0.1") -> Callable[[], socket.socket]:
    """A `listen` for KubeApi inside lab namespace `ns` (a `Netns`): a socket made there, bound to host:port."""

    def listen() -> socket.socket:
        sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        return sock

    return listen


def kubeconfig(server: str, token: str = "") -> str:
    """A kubeconfig (YAML is a superset of JSON) for `server`; the user carries `token`, or nothing."""
    user: Obj = {"token": token} if token else {}
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": server}}],
        "users": [{"name": "lab", "user": user}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}],
    }, indent=2) + "\n"
