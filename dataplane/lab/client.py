"""Clients that talk to echo servers from inside a namespace.

Invariant: a request never raises for what the network did. Every outcome,
an echo reply or a refusal, a timeout, an unreachable route, a reset, is
returned as an `Outcome` so that tests can table expectations like
"refused within 0.5 s". Programming errors (bad arguments) still raise.

Sockets come from `Netns.socket`, so the calling process stays in its own
namespace while the traffic leaves from the given one.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from .echo import Reply


class Failure(StrEnum):
    REFUSED = "refused"  # TCP RST, or ICMP port unreachable on a connected UDP socket
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"  # ICMP host/net unreachable, no route
    RESET = "reset"  # an established connection was reset
    CLOSED = "closed"  # the peer closed without answering
    GARBLED = "garbled"  # an answer that is not an echo reply


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request got: exactly one of `reply` and `failure` is set."""

    reply: Reply | None
    failure: Failure | None
    elapsed: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reply is not None

    @property
    def pod(self) -> str | None:
        return self.reply.pod if self.reply else None

    def __str__(self) -> str:
        what = str(self.reply) if self.reply else f"{self.failure} {self.detail}".strip()
        return f"{what} ({self.elapsed * 1000:.0f} ms)"


_FAILURES = {
    errno.ECONNREFUSED: Failure.REFUSED,
    errno.ETIMEDOUT: Failure.TIMEOUT,
    errno.EHOSTUNREACH: Failure.UNREACHABLE,
    errno.ENETUNREACH: Failure.UNREACHABLE,
    errno.ECONNRESET: Failure.RESET,
    errno.EPIPE: Failure.RESET,
}


def classify(error: OSError) -> Failure | None:
    """The Failure an OSError stands for, or None for errors that are not the network's doing."""
    if isinstance(error, TimeoutError | socket.timeout):
        return Failure.TIMEOUT
    return _FAILURES.get(error.errno)


def _family(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def _attempt(started: float, action: Callable[[], Reply | None]) -> Outcome:
    try:
        reply = action()
    except ValueError as error:
        return Outcome(None, Failure.GARBLED, time.monotonic() - started, str(error))
    except EOFError:
        return Outcome(None, Failure.CLOSED, time.monotonic() - started)
    except OSError as error:
        failure = classify(error)
        if failure is None:
            raise
        return Outcome(None, failure, time.monotonic() - started, error.strerror or "")
    return Outcome(reply, None, time.monotonic() - started)


class _Session:
    """A socket of `kind` in namespace `ns` towards ip:port, optionally bound to `source`."""

    def __init__(self, ns, ip: str, port: int, timeout: float, source: tuple[str, int] | None, kind: int):
        self.ns, self.ip, self.port, self.timeout = ns, ip, port, timeout
        self._sock = ns.socket(_family(ip), kind)
        self._sock.settimeout(timeout)
        if source is not None:
            self._sock.bind(source)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def local(self) -> tuple[str, int]:
        return self._sock.getsockname()[:2]

    def close(self) -> None:
        self._sock.close()


class TcpSession(_Session):
    """One TCP connection from a namespace, kept open across requests until `close()`.

    `connect()` first; then each `request` sends one line and reads one reply line.
    """

    def __init__(self, ns, ip: str, port: int, timeout: float = 1.0, source: tuple[str, int] | None = None):
        super().__init__(ns, ip, port, timeout, source, socket.SOCK_STREAM)
        self._buffer = b""

    def connect(self) -> Outcome | None:
        """Connects; None on success, else the failed Outcome (refused, timeout, unreachable)."""
        started = time.monotonic()

        def go() -> None:
            self._sock.connect((self.ip, self.port))

        outcome = _attempt(started, go)
        return outcome if outcome.failure else None

    def request(self, line: str = "hello") -> Outcome:
        started = time.monotonic()

        def go() -> Reply:
            self._sock.sendall(line.encode() + b"\n")
            while b"\n" not in self._buffer:
                chunk = self._sock.recv(4096)
                if not chunk:
                    raise EOFError
                self._buffer += chunk
            text, _, self._buffer = self._buffer.partition(b"\n")
            return Reply.parse(text.decode(errors="replace"))

        return _attempt(started, go)


class UdpSession(_Session):
    """A connected UDP socket from a namespace: every request leaves from the same source port.

    Connected, so that an ICMP port unreachable for an earlier datagram surfaces as
    `Failure.REFUSED`, as it would for a real client.
    """

    def __init__(self, ns, ip: str, port: int, timeout: float = 1.0, source: tuple[str, int] | None = None):
        super().__init__(ns, ip, port, timeout, source, socket.SOCK_DGRAM)
        self._sock.connect((ip, port))

    def request(self, payload: str = "hello") -> Outcome:
        started = time.monotonic()

        def go() -> Reply:
            self._drain()
            self._sock.send(payload.encode())
            return Reply.parse(self._sock.recv(4096).decode(errors="replace"))

        return _attempt(started, go)

    def _drain(self) -> None:
        """Drops late answers (and errors) left over from earlier requests, so they are not taken for this one's."""
        self._sock.settimeout(0)
        try:
            while True:
                try:
                    self._sock.recv(4096)
                except BlockingIOError:
                    return
                except OSError:
                    continue  # a pending ICMP error, reported once and cleared
        finally:
            self._sock.settimeout(self.timeout)


def tcp_request(ns, ip: str, port: int, timeout: float = 1.0, line: str = "hello",
                source: str | None = None) -> Outcome:
    """Connects from `ns` to ip:port, sends one line, returns the reply or why there was none.

    `timeout` bounds the connect and the read separately; `elapsed` covers both.
    `source`: the local address to send from (any port); None: the kernel's choice.
    """
    with TcpSession(ns, ip, port, timeout, (source, 0) if source else None) as session:
        started = time.monotonic()
        failed = session.connect()
        if failed:
            return failed
        outcome = session.request(line)
    return Outcome(outcome.reply, outcome.failure, time.monotonic() - started, outcome.detail)


def udp_request(ns, ip: str, port: int, timeout: float = 1.0, payload: str = "hello",
                source: str | None = None) -> Outcome:
    """Sends one datagram from a fresh source port in `ns` (from `source` when given); returns the reply
    or why there was none."""
    with UdpSession(ns, ip, port, timeout, (source, 0) if source else None) as session:
        return session.request(payload)


def request(protocol: str, ns, ip: str, port: int, timeout: float = 1.0, source: str | None = None) -> Outcome:
    """`tcp_request` or `udp_request` by protocol name ("TCP"/"UDP", any case), optionally from `source`."""
    match protocol.upper():
        case "TCP":
            return tcp_request(ns, ip, port, timeout, source=source)
        case "UDP":
            return udp_request(ns, ip, port, timeout, source=source)
    raise ValueError(f"unsupported protocol {protocol!r}")


def sample(send: Callable[[], Outcome], want: Iterable[str] = (), tries: int = 100, at_least: int = 0,
           give_up_after: int | None = None) -> list[Outcome]:
    """Calls `send` until every pod in `want` has answered and `at_least` calls were made, at most `tries` times.

    With `want` empty it makes exactly `tries` calls. `give_up_after` failures end
    it early (a broken path costs a few timeouts, not `tries`). Returns every outcome, in order.
    """
    want = set(want)
    seen: set[str] = set()
    outcomes = []
    failures = 0
    for _ in range(tries):
        outcome = send()
        outcomes.append(outcome)
        if outcome.pod:
            seen.add(outcome.pod)
        else:
            failures += 1
        if want and want <= seen and len(outcomes) >= at_least:
            break
        if give_up_after is not None and failures >= give_up_after:
            break
    return outcomes


def tally(outcomes: Iterable[Outcome]) -> Counter:
    """How many outcomes each pod (or failure kind) accounts for."""
    return Counter(o.pod if o.ok else str(o.failure) for o in outcomes)


def http_get(ns, host: str, port: int, path: str = "/", timeout: float = 1.0) -> tuple[int, bytes]:
    """GET http://host:port/path from inside `ns`; returns (status, body). Raises OSError when it cannot connect."""
    sock = ns.socket(_family(host), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    connection.sock = sock
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
