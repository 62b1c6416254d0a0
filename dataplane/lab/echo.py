"""An echo server for a Pod namespace: every answer names the Pod and the peer it saw.

The reply line is `NAME PEER LOCAL`, e.g. `pod1 192.168.50.2:40000 10.244.1.11:80`:
NAME tells which endpoint was chosen, PEER shows whether the source was
masqueraded, LOCAL shows which target port was reached. IPv6 addresses are
bracketed (`[fd00::1]:80`).

- TCP: line based; one reply line per request line, the connection stays open
  until the client closes it (an established flow can outlive a daemon restart).
- UDP: one reply datagram per datagram.
- HTTP: GET answers 200 with the reply line as the body.

Run as `python -m dataplane.lab.echo --name pod1 --tcp 80 --udp 80 --http 8000`.
It prints `ready` on stdout once every socket listens, and exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import http.server
import ipaddress
import signal
import socket
import sys
import threading
from dataclasses import dataclass


def format_addr(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    host = host.removeprefix("::ffff:") if "." in host else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text: str) -> tuple[str, int]:
    """`1.2.3.4:80` or `[fd00::1]:80` -> (host, port); raises ValueError on anything else."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"not HOST:PORT: {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return str(ipaddress.ip_address(host)), int(port)


@dataclass(frozen=True, slots=True)
class Reply:
    """One parsed echo answer."""

    pod: str
    peer: tuple[str, int]
    local: tuple[str, int]

    @classmethod
    def parse(cls, line: str) -> "Reply":
        """Parses `NAME PEER LOCAL`; raises ValueError naming the line when it is anything else."""
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"not an echo reply: {line!r}")
        return cls(parts[0], parse_addr(parts[1]), parse_addr(parts[2]))

    def __str__(self) -> str:
        return f"{self.pod} {format_addr(self.peer)} {format_addr(self.local)}"


def answer(name: str, peer: tuple, local: tuple) -> bytes:
    return f"{name} {format_addr(peer)} {format_addr(local)}\n".encode()


# Linux values; the socket module names them only from Python 3.13 (IP_PKTINFO).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)


def _families() -> list[tuple[int, str]]:
    """IPv4 always; IPv6 too where the namespace has it, on a separate v6-only socket."""
    families = [(socket.AF_INET, "0.0.0.0")]
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        families.append((socket.AF_INET6, "::"))
    except OSError:
        pass
    return families


def _listen(family: int, type: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, type)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    if type == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def _serve_lines(name: str, listener: socket.socket) -> None:
    def handle(connection: socket.socket, peer: tuple) -> None:
        local = connection.getsockname()
        with connection, connection.makefile("rb") as lines:
            for _ in lines:
                connection.sendall(answer(name, peer, local))

    while True:
        connection, peer = listener.accept()
        threading.Thread(target=handle, args=(connection, peer), daemon=True).start()


def _destination(family: int, ancillary: list, port: int) -> tuple[str, int]:
    """The datagram's destination address, from IP_PKTINFO / IPV6_PKTINFO: a wildcard bind does not tell it."""
    for level, kind, data in ancillary:
        if family == socket.AF_INET and (level, kind) == (socket.IPPROTO_IP, IP_PKTINFO):
            return socket.inet_ntop(socket.AF_INET, data[8:12]), port  # struct in_pktinfo: ifindex, spec_dst, addr
        if family == socket.AF_INET6 and (level, kind) == (socket.IPPROTO_IPV6, IPV6_PKTINFO):
            return socket.inet_ntop(socket.AF_INET6, data[:16]), port  # struct in6_pktinfo: addr, ifindex
    return ("0.0.0.0" if family == socket.AF_INET else "::"), port


def _serve_datagrams(name: str, sock: socket.socket) -> None:
    family, port = sock.family, sock.getsockname()[1]
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    while True:
        _, ancillary, _, peer = sock.recvmsg(65535, socket.CMSG_SPACE(64))
        sock.sendto(answer(name, peer, _destination(family, ancillary, port)), peer)


def _http_server(name: str, family: int, host: str, port: int) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = answer(name, self.client_address, self.connection.getsockname())
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

        def server_bind(self):
            if family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            super().server_bind()

    return Server((host, port), Handler)


def start(name: str, tcp: list[int], udp: list[int], http_ports: list[int]) -> None:
    """Binds every socket (raising OSError if one cannot be bound), then serves each in a daemon thread."""
    jobs = []
    for family, host in _families():
        jobs += [(_serve_lines, _listen(family, socket.SOCK_STREAM, host, p)) for p in tcp]
        jobs += [(_serve_datagrams, _listen(family, socket.SOCK_DGRAM, host, p)) for p in udp]
        jobs += [(lambda _, server: server.serve_forever(), _http_server(name, family, host, p)) for p in http_ports]
    for serve, sock in jobs:
        threading.Thread(target=serve, args=(name, sock), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dataplane.lab.echo", description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="the Pod name every reply starts with")
    parser.add_argument("--tcp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--udp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--http", type=int, action="append", default=[], metavar="PORT")
    args = parser.parse_args(argv)

    start(args.name, args.tcp, args.udp, args.http)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    print("ready", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
