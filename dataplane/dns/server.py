"""The DNS server: UDP and TCP sockets, upstream queries and zone updates, on asyncio.

This is the only module of the package that does I/O. Each received message
goes to `wire.Responder`, a plain function call; this module sends what it
returns, or resolves a `Forward` upstream first.

Invariants:
- The server never dies of a query: every handler catches what it does not
  expect, counts it and keeps serving.
- Answers come from the latest published snapshot that has been applied.
  Small changes are applied on the event loop in O(changed); a large change (the
  first snapshot, a resync of thousands of Services) is built into a fresh Zone
  in a worker thread and swapped in at once, so the loop keeps answering
  meanwhile and no query sees a half-built zone.
- Upstreams never include this server (see upstream.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode

from ..model import Snapshot
from .upstream import Upstream, parse_address, system_upstreams, without_self
from .wire import Forward, Reply, Responder
from .zone import DEFAULT_TTL, Zone, normalize_domain

log = logging.getLogger(__name__)

# Above this many changed Services an update is built off the loop (a 10,000-Service
# zone takes about a tenth of a second to build; a few hundred, a few milliseconds).
INCREMENTAL_LIMIT = 500
UPSTREAM_TIMEOUT = 2.0
MAX_FORWARDS = 512  # UDP queries being resolved upstream at once; beyond, new ones are dropped
MAX_TCP_CLIENTS = 256
TCP_IDLE = 10.0  # seconds a TCP connection may stay silent (RFC 7766 suggests some seconds)


class DnsServer:
    """Serves the cluster zone on `bind` (HOST:PORT) over UDP and TCP.

    `upstreams` None means those of /etc/resolv.conf. Construction raises
    ValueError for a bad address or domain; `start()` raises OSError when the
    sockets cannot be bound.
    """

    def __init__(self, bind: str, domain: str = "cluster.local", ttl: int = DEFAULT_TTL,
                 upstreams: list[Upstream] | None = None, upstream_timeout: float = UPSTREAM_TIMEOUT):
        if ttl < 0 or ttl > 86400:
            raise ValueError(f"--dns-ttl: {ttl} is not between 0 and 86400")
        self.bind = parse_address(bind, what="--dns-bind-address", min_port=0)
        self.domain = normalize_domain(domain)
        self.ttl = ttl
        self.upstream_timeout = upstream_timeout
        self._requested_upstreams = upstreams
        self.upstreams: list[Upstream] = []
        self.responder = Responder(self.domain, ttl, forwarding=False)
        self.stats: Counter[str] = Counter()
        self.zone: Zone | None = None
        self._pending: Snapshot | None = None
        self._applied: Snapshot | None = None
        self._wake = asyncio.Event()
        self._applied_event = asyncio.Event()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._updater: asyncio.Task | None = None
        self._forwards = 0
        self._tcp_clients = 0
        self._last_error_log = 0.0

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked."""
        if self._udp is None:
            return self.bind.host, self.bind.port
        host, port = self._udp.get_extra_info("sockname")[:2]
        return host, port

    async def start(self) -> None:
        """Binds UDP and TCP and starts serving; raises OSError naming the address when it cannot."""
        try:
            host, port = await self._bind()
        except OSError as error:
            raise OSError(f"DNS cannot listen on {self.bind}: {error}") from error
        bound = Upstream(self.bind.host, port)
        requested = self._requested_upstreams
        candidates = list(requested) if requested is not None else system_upstreams()
        self.upstreams, skipped = without_self(candidates, bound)
        for upstream in skipped:
            log.warning("DNS upstream %s is this server itself; not forwarding there", upstream)
        self.responder.forwarding = bool(self.upstreams)
        self._updater = asyncio.create_task(self._update_loop())
        log.info("DNS serving %s on %s (udp, tcp), ttl %d s, upstreams: %s", self.domain, Upstream(host, port),
                 self.ttl, ", ".join(map(str, self.upstreams)) or "none (other names are REFUSED)")

    async def _bind(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        # Port 0: the kernel picks the UDP port, which TCP may already use elsewhere; pick again then.
        for attempt in range(1 if self.bind.port else 20):
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.bind.host, self.bind.port), reuse_port=False
            )
            host, port = self.address
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, host, port, reuse_address=True)
                return host, port
            except OSError:
                self._udp.close()
                self._udp = None
                if self.bind.port or attempt == 19:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._updater is not None:
            self._updater.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    # Zone updates.

    def publish(self, snapshot: Snapshot) -> None:
        """Makes `snapshot` the state to answer from, soon; returns at once. Bursts coalesce."""
        self._pending = snapshot
        self._wake.set()

    async def applied(self) -> None:
        """Waits until the last published snapshot is the one being served."""
        while self._pending is not None or self._applied is None:
            self._applied_event.clear()
            await self._applied_event.wait()

    async def _update_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            snapshot = self._pending
            if snapshot is None:
                continue
            try:
                await self._apply(snapshot)
            except Exception:
                log.exception("DNS zone update failed; still answering from the previous state")
            if self._pending is snapshot:
                self._pending = None
            self._applied = snapshot
            self._applied_event.set()

    async def _apply(self, snapshot: Snapshot) -> None:
        started = time.perf_counter()
        if self.zone is None and len(snapshot.services) <= INCREMENTAL_LIMIT:
            self.zone = Zone(self.domain, self.ttl)
        zone = self.zone
        if zone is not None:
            changed, removed = zone.changes(snapshot)
            if len(changed) + len(removed) <= INCREMENTAL_LIMIT:
                count = zone.apply(snapshot, changed, removed)
                if count or self.responder.zone is not zone:
                    self.responder.set_zone(zone)
                    log.debug("DNS zone: %d services changed in %.1f ms", count,
                              (time.perf_counter() - started) * 1000)
                return
        zone = await asyncio.to_thread(Zone.build, snapshot, self.domain, self.ttl)
        if self.zone is not None and zone.serial <= self.zone.serial:
            zone.serial = (self.zone.serial + 1) & 0xFFFFFFFF
        self.zone = zone
        self.responder.set_zone(zone)
        log.info("DNS zone built: %d services in %.1f ms", len(zone), (time.perf_counter() - started) * 1000)

    # Queries.

    def _udp_query(self, data: bytes, addr, transport: asyncio.DatagramTransport) -> None:
        self.stats["udp"] += 1
        command = self.responder.handle(data, tcp=False)
        if isinstance(command, Reply):
            transport.sendto(command.wire, addr)
        elif isinstance(command, Forward):
            if self._forwards >= MAX_FORWARDS:
                self.stats["forward_dropped"] += 1
                return
            self._spawn(self._udp_forward(command, addr, transport))
        else:
            self.stats["dropped"] += 1

    async def _udp_forward(self, forward: Forward, addr, transport: asyncio.DatagramTransport) -> None:
        self._forwards += 1
        try:
            wire = self.responder.relay(forward, await self._resolve(forward))
            if not transport.is_closing():
                transport.sendto(wire, addr)
        finally:
            self._forwards -= 1

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_clients >= MAX_TCP_CLIENTS:
            self.stats["tcp_refused"] += 1
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TCP_IDLE), "big")
                data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE)
                self.stats["tcp"] += 1
                command = self.responder.handle(data, tcp=True)
                if isinstance(command, Forward):
                    wire = self.responder.relay(command, await self._resolve(command))
                elif isinstance(command, Reply):
                    wire = command.wire
                else:
                    self.stats["dropped"] += 1
                    break
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError):
            pass
        except Exception:
            self._internal_error()
        finally:
            self._tcp_clients -= 1
            writer.close()

    async def _resolve(self, forward: Forward) -> dns.message.Message | None:
        """The first usable upstream answer; a SERVFAIL or REFUSED one only when no upstream does better."""
        self.stats["forwarded"] += 1
        query = forward.upstream_query()
        fallback = None
        for upstream in self.upstreams:
            try:
                if forward.tcp:
                    response = await dns.asyncquery.tcp(query, upstream.host, self.upstream_timeout, upstream.port)
                else:
                    response = await dns.asyncquery.udp(query, upstream.host, self.upstream_timeout, upstream.port,
                                                        ignore_unexpected=True)
                    if response.flags & dns.flags.TC:
                        response = await dns.asyncquery.tcp(query, upstream.host, self.upstream_timeout,
                                                            upstream.port)
            except (dns.exception.DNSException, OSError, EOFError, ValueError) as error:
                self.stats["upstream_errors"] += 1
                log.debug("DNS upstream %s failed for %s: %r", upstream, forward.qname, error)
                continue
            if response.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                fallback = fallback or response
                continue
            return response
        return fallback

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._internal_error(task.exception())

    def _internal_error(self, error: BaseException | None = None) -> None:
        self.stats["internal_errors"] += 1
        now = time.monotonic()
        if now - self._last_error_log > 10:
            self._last_error_log = now
            log.error("DNS: internal error while answering (%d so far)", self.stats["internal_errors"],
                      exc_info=error or True)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            self.server._udp_query(data, addr, self.transport)
        except Exception:
            self.server._internal_error()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (a client that went away): nothing to do.
        self.server.stats["icmp_errors"] += 1
